"""The ``distill`` section of a training config: how a student stage uses its teacher."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from facescale.heads.distillation import DEFAULT_ALPHA, DistillForm


class DistillConfig(BaseModel):
    """Angular distillation against cached teacher embeddings; off while ``teacher_cache`` is unset."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    teacher_cache: str | None = Field(None, description="teacher-embedding cache directory (made by the pipeline)")
    alpha: float = Field(DEFAULT_ALPHA, ge=0, description="weight of the distillation term (paper: 7)")
    form: DistillForm = "eq5"
