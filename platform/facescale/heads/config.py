"""Typed config for the margin head and the classifier that applies it."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from facescale.heads.adaface import AdaFaceLoss
from facescale.heads.curricularface import CurricularFaceLoss
from facescale.heads.magface import MagFaceLoss
from facescale.heads.margin import MARGIN_PRESETS, CombinedMarginLoss

# Keys that only some margin types read; a non-default value for another type is an error, not a silent no-op
# (compared by value, not by "was it set", so a dumped config with every default still loads).
_TYPE_KEYS = {
    "m1": {"arcface", "cosface", "combined"},
    "m3": {"arcface", "cosface", "combined"},
    "straight_through": {"arcface", "cosface", "combined"},
    "m2": {"arcface", "cosface", "combined", "curricularface"},
    "l_a": {"magface"}, "u_a": {"magface"}, "l_m": {"magface"}, "u_m": {"magface"}, "lambda_g": {"magface"},
    "t_momentum": {"curricularface"},
    "m": {"adaface"}, "h": {"adaface"}, "t_alpha": {"adaface"},
}


class MarginConfig(BaseModel):
    """Margin loss on cosine logits. ``type`` picks preset margins; explicit m1/m2/m3 override them.

    ``magface`` (Meng et al., CVPR 2021) reads ``l_a, u_a, l_m, u_m, lambda_g``; ``curricularface`` (Huang et al.,
    CVPR 2020) reads ``m2`` (its angular margin, default 0.5) and ``t_momentum``; ``adaface`` (Kim et al., CVPR 2022)
    reads ``m``, ``h`` and ``t_alpha`` (the EMA rate of the embedding-norm statistics).
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["arcface", "cosface", "combined", "magface", "curricularface", "adaface"] = "arcface"
    s: float = Field(64.0, gt=0)
    m1: float | None = None
    m2: float | None = None
    m3: float | None = None
    straight_through: bool = False
    l_a: float = Field(10.0, gt=0)
    u_a: float = Field(110.0, gt=0)
    l_m: float = Field(0.45, ge=0)
    u_m: float = Field(0.8, ge=0)
    lambda_g: float = Field(35.0, ge=0)
    t_momentum: float = Field(0.01, gt=0, le=1)
    m: float = Field(0.4, ge=0, lt=math.pi)
    h: float = Field(0.333, gt=0)
    t_alpha: float = Field(0.01, gt=0, le=1)

    @model_validator(mode="after")
    def _keys_match_type(self) -> MarginConfig:
        for key in sorted(_TYPE_KEYS):
            if self.type not in _TYPE_KEYS[key] and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"margin key {key!r} does not apply to margin type {self.type!r}")
        return self


class FFCConfig(BaseModel):
    """``classifier.ffc``: the F²C dynamic class pool (``facescale.heads.ffc``; Wang et al., CVPR 2022).

    ``pool_size`` is a number of identity slots, or a fraction in (0, 1) of the training set's identities (the
    paper uses 1 %, 0.1 %, 0.01 %). The gallery loader yields ``ids_per_batch`` identities x ``images_per_id``
    images per rank and step; the pool must hold at least ``ids_per_batch`` x world size identities.
    """

    model_config = ConfigDict(extra="forbid")

    pool_size: int | float = 0.01
    momentum: float = Field(0.99, ge=0, lt=1)  # the gallery network's EMA momentum
    top_k: int | None = Field(None, ge=1)  # hard negatives per out-of-pool probe; None: the reference's 3..10
    ids_per_batch: int = Field(64, ge=1)
    images_per_id: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _pool_size_range(self) -> FFCConfig:
        if isinstance(self.pool_size, float) and not 0.0 < self.pool_size < 1.0:
            raise ValueError(f"classifier.ffc.pool_size: a fraction must lie in (0, 1), got {self.pool_size} "
                             "(an absolute number of identities is an integer)")
        if isinstance(self.pool_size, int) and self.pool_size < 1:
            raise ValueError(f"classifier.ffc.pool_size must be >= 1, got {self.pool_size}")
        return self


class ClassifierConfig(BaseModel):
    """Which classifier turns embeddings into a loss.

    ``partial_fc`` shards the class centers over the ranks (``facescale.parallel.PartialFC``); its optimizer state
    is stored per ``state_dtype`` (``None``: the default, int8 block-quantised momentum / first moment) and
    ``second_moment`` (AdamW); ``dense_state`` is the arcface_torch v2 baseline (dense gradient, fp32 state).
    ``center_dtype`` stores the centers in fp32 or bf16 (bf16: half the bytes, fp32 math, stochastically rounded
    updates; needs the sparse optimizers, so not with ``dense_state``).

    ``subcenters`` (both types) gives each class K centers (``facescale.heads.subcenter``). Every margin type works
    with them: margins see the max-pooled class cosines ``[B, C]``, and their state is per row or a scalar
    (CurricularFace's ``t``, AdaFace's norm EMA), never per center.

    ``ffc`` (F²C, Wang et al., CVPR 2022) replaces the class weights by a dynamic pool of gallery features
    (``classifier.ffc``, ``facescale.heads.ffc``): memory independent of the number of identities.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["linear", "partial_fc", "ffc"] = "linear"
    margin: MarginConfig = MarginConfig()
    ffc: FFCConfig = FFCConfig()  # classifier.type: ffc only
    sample_rate: float = Field(1.0, gt=0, le=1)
    # PFC v2 inter-class conflict filter; the paper's threshold is 0.4.
    inter_class_filter: float | None = Field(None, ge=-1, le=1)
    state_dtype: Literal["fp32", "bf16", "int8"] | None = None
    second_moment: Literal["full", "row"] = "row"
    dense_state: bool = False
    center_dtype: Literal["fp32", "bf16"] = "fp32"
    # Sub-center ArcFace (Deng et al., ECCV 2020): K centers per class, the class cosine is the max over them.
    subcenters: int = Field(1, ge=1)
    # The paper's cleaning step: from this epoch on only each class's dominant sub-center counts and samples
    # farther than drop_angle_deg from it are dropped from the loss.
    drop_non_dominant_after_epochs: int | None = Field(None, ge=0)
    drop_angle_deg: float = Field(75.0, gt=0, le=180)

    @model_validator(mode="after")
    def _partial_fc_keys(self) -> ClassifierConfig:
        pfc_only = ["sample_rate", "inter_class_filter", "state_dtype", "second_moment", "dense_state", "center_dtype"]
        changed = [k for k in pfc_only if getattr(self, k) != type(self).model_fields[k].default]
        if self.type != "partial_fc" and changed:
            keys = ", ".join(changed)
            raise ValueError(f"classifier keys {keys} apply only to classifier type 'partial_fc'")
        if self.center_dtype == "bf16" and self.dense_state:
            raise ValueError("classifier.center_dtype: bf16 needs the sparse row optimizers (stochastic rounding); "
                             "classifier.dense_state: true (the dense v2 baseline) keeps fp32 centers")
        if self.type != "ffc" and self.ffc != FFCConfig():
            raise ValueError("classifier.ffc applies only to classifier type 'ffc'")
        if self.type == "ffc" and self.margin.type not in ("arcface", "cosface", "combined"):
            raise ValueError(f"classifier.type ffc supports margin types arcface, cosface and combined, not "
                             f"{self.margin.type!r} (its statistics are not defined over a class pool)")
        if self.type == "ffc" and self.subcenters != 1:
            raise ValueError("classifier.subcenters does not apply to classifier type 'ffc' (the pool holds two "
                             "prototypes per identity already)")
        if self.drop_non_dominant_after_epochs is not None and self.subcenters == 1:
            raise ValueError("classifier.drop_non_dominant_after_epochs needs classifier.subcenters > 1")
        if self.drop_angle_deg != 75.0 and self.drop_non_dominant_after_epochs is None:
            raise ValueError("classifier.drop_angle_deg applies only with classifier.drop_non_dominant_after_epochs")
        return self


def build_margin(cfg: MarginConfig) -> nn.Module:
    """Builds the margin callable named by ``cfg``."""
    if cfg.type == "magface":
        return MagFaceLoss(s=cfg.s, l_a=cfg.l_a, u_a=cfg.u_a, l_m=cfg.l_m, u_m=cfg.u_m, lambda_g=cfg.lambda_g)
    if cfg.type == "adaface":
        return AdaFaceLoss(s=cfg.s, m=cfg.m, h=cfg.h, t_alpha=cfg.t_alpha)
    if cfg.type == "curricularface":
        return CurricularFaceLoss(s=cfg.s, m=0.5 if cfg.m2 is None else cfg.m2, t_momentum=cfg.t_momentum)
    m1, m2, m3 = MARGIN_PRESETS.get(cfg.type, (1.0, 0.0, 0.0))
    return CombinedMarginLoss(
        s=cfg.s,
        m1=m1 if cfg.m1 is None else cfg.m1,
        m2=m2 if cfg.m2 is None else cfg.m2,
        m3=m3 if cfg.m3 is None else cfg.m3,
        straight_through=cfg.straight_through,
    )
