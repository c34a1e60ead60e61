"""Knowledge distillation: the angular distillation loss, the teacher-embedding cache, recursive pipelines."""

from facescale.distill.config import DistillConfig
from facescale.heads.distillation import DEFAULT_ALPHA, angular_distillation_loss

__all__ = ["DEFAULT_ALPHA", "DistillConfig", "angular_distillation_loss"]
