"""Margin losses on cosine logits and the single-rank classifier."""

from facescale.heads.adaface import AdaFaceLoss
from facescale.heads.classifier import NormalizedLinearClassifier
from facescale.heads.curricularface import CurricularFaceLoss
from facescale.heads.magface import MagFaceLoss
from facescale.heads.margin import IGNORE_LABEL, MARGIN_PRESETS, CombinedMarginLoss
from facescale.heads.subcenter import SubCenters

__all__ = ["AdaFaceLoss", "CombinedMarginLoss", "CurricularFaceLoss", "IGNORE_LABEL", "MARGIN_PRESETS", "MagFaceLoss",
           "NormalizedLinearClassifier", "SubCenters"]
