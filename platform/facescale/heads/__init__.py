"""Margin losses on cosine logits and the single-rank classifier."""

from facescale.heads.classifier import NormalizedLinearClassifier
from facescale.heads.curricularface import CurricularFaceLoss
from facescale.heads.magface import MagFaceLoss
from facescale.heads.margin import IGNORE_LABEL, MARGIN_PRESETS, CombinedMarginLoss

__all__ = ["CombinedMarginLoss", "CurricularFaceLoss", "IGNORE_LABEL", "MARGIN_PRESETS", "MagFaceLoss",
           "NormalizedLinearClassifier"]
