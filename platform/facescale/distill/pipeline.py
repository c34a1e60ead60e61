"""Recursive knowledge distillation as a declarative pipeline: the spec, and the stage configs it expands to.

Recursive knowledge distillation (VarGFaceNet, arXiv:1910.04985, section 3.4): generation 1 of the student is
distilled from the teacher; generation k > 1 starts from generation k-1's weights and is distilled again from the
same teacher. Stages, in order:

    teacher     trained here with the teacher's config, or taken from an existing MLflow model (``teacher.model_uri``)
    scratch     the student trained without distillation -- the baseline (``scratch_baseline``)
    gen-1       student distilled from the teacher, starting from ``init`` (``scratch`` = random weights, or a model)
    gen-k       student distilled from the teacher, starting from gen-(k-1)

Every stage's config is ``base_config`` → ``config`` → the teacher's or student's ``config`` → ``stages[<stage>]``
(nested mappings, merged in that order), validated as a whole ``FaceScaleConfig`` before anything runs. Paths in
them are relative to the working directory (the repository root under ``ray job submit --working-dir .``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from facescale.config import ConfigError, FaceScaleConfig, format_validation, load_config, merge_trees
from facescale.distill.loss import DEFAULT_ALPHA, DistillForm
from facescale.models import list_backbones

TEACHER, SCRATCH = "teacher", "scratch"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherSpec(_Strict):
    """Train the teacher in the pipeline (``config``), or use an existing model (``model_uri``)."""

    model_uri: str | None = Field(None, description="models:/name@alias, models:/m-<id>, runs:/<id>/model, or a "
                                  "checkpoint directory")
    backbone: str | None = Field(None, description="backbone to train (when no model_uri)")
    config: dict[str, Any] = Field(default_factory=dict, description="config overrides of the teacher stage")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if self.model_uri and (self.backbone or self.config):
            raise ValueError("teacher: give either model_uri (an existing teacher) or backbone/config (train one)")
        if not self.model_uri and not self.backbone:
            raise ValueError("teacher: give model_uri (an existing teacher) or backbone (train one)")
        return self


class StudentSpec(_Strict):
    """The student architecture and the config overrides of every student stage."""

    backbone: str
    config: dict[str, Any] = Field(default_factory=dict)


class DistillSpec(_Strict):
    """Loss settings of the distilled generations (VarGFaceNet: eq. 5, alpha 7)."""

    alpha: float = Field(DEFAULT_ALPHA, ge=0)
    form: DistillForm = "eq5"


class PipelineSpec(_Strict):
    """A recursive-distillation pipeline (``pipelines/*.yaml``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base_config: str | None = Field(None, description="training config YAML every stage starts from")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides for every stage")
    teacher: TeacherSpec
    student: StudentSpec
    generations: int = Field(2, ge=1)
    scratch_baseline: bool = True
    init: str = Field("scratch", description="generation 1 starts from 'scratch' or from this model URI/checkpoint")
    distill: DistillSpec = DistillSpec()
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict, description="overrides per stage name")
    registered_model: str | None = Field(None, description="registered model of the stages (default: name)")
    cache_dir: str | None = Field(None, description="teacher-embedding caches: an s3://bucket/prefix, or a directory "
                                  "every node mounts at that path (default: <storage_path>/teacher_cache)")

    @field_validator("cache_dir")
    @classmethod
    def _cache_location(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("s3://"):
            raise ValueError(f"cache_dir {value!r}: teacher caches live on s3:// or in a local directory")
        return value

    @model_validator(mode="after")
    def _known_names(self) -> PipelineSpec:
        known = set(list_backbones())
        for where, name in (("teacher.backbone", self.teacher.backbone), ("student.backbone", self.student.backbone)):
            if name is not None and name not in known:
                raise ValueError(f"{where}: unknown backbone {name!r}; known: {', '.join(sorted(known))}")
        unknown = set(self.stages) - set(self.stage_names())
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {sorted(unknown)}; this pipeline has {self.stage_names()}")
        return self

    def stage_names(self) -> list[str]:
        """Stages in the order they run."""
        names = [] if self.teacher.model_uri else [TEACHER]
        names += [SCRATCH] if self.scratch_baseline else []
        return names + [generation_name(g) for g in range(1, self.generations + 1)]

    def student_stages(self) -> set[str]:
        return {SCRATCH} | {generation_name(g) for g in range(1, self.generations + 1)}


def generation_name(generation: int) -> str:
    return f"gen-{generation}"


def generation_of(stage: str) -> str:
    """The ``facescale.generation`` tag: ``teacher``, ``scratch`` or the generation number."""
    match = re.fullmatch(r"gen-(\d+)", stage)
    return match.group(1) if match else stage


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Loads and validates a pipeline spec (unknown keys and bad values raise ``ConfigError`` naming them)."""
    return load_config(path, overrides, model=PipelineSpec)


def stage_configs(spec: PipelineSpec, source: str = "<pipeline>") -> dict[str, FaceScaleConfig]:
    """Every stage's validated training config, keyed by stage name (the pipeline's own keys are filled in later:
    ``distill.teacher_cache``, ``train.init_from``).

    Raises:
        ConfigError: Naming the stage and the key, when a stage's merged config is invalid or a student's
            embedding size differs from a trained teacher's.
    """
    base: dict[str, Any] = {}
    if spec.base_config:
        base = load_config(spec.base_config).model_dump(mode="json")
    base = merge_trees(base, spec.config)
    configs: dict[str, FaceScaleConfig] = {}
    for stage in spec.stage_names():
        if stage == TEACHER:
            tree = merge_trees(merge_trees(base, spec.teacher.config), {"model": {"backbone": spec.teacher.backbone}})
        else:
            tree = merge_trees(merge_trees(base, spec.student.config), {"model": {"backbone": spec.student.backbone}})
        tree = merge_trees(tree, spec.stages.get(stage, {}))
        tree = merge_trees(tree, {"tracking": {"run_name": stage}})
        if stage not in (TEACHER, SCRATCH):
            tree = merge_trees(tree, {"distill": {"alpha": spec.distill.alpha, "form": spec.distill.form}})
        try:
            configs[stage] = FaceScaleConfig.model_validate(tree)
        except ValidationError as exc:
            raise ConfigError(format_validation(exc, f"{source}, stage {stage!r}")) from exc
    shared = {(c.tracking_uri(), c.tracking.experiment, c.data.root) for c in configs.values()}
    if len(shared) > 1:
        raise ConfigError(f"{source}: stages must share tracking URI, experiment and data.root; got {sorted(shared)}")
    if TEACHER in configs:
        want = configs[TEACHER].model.embedding_size
        for stage, cfg in configs.items():
            if stage != TEACHER and stage != SCRATCH and cfg.model.embedding_size != want:
                raise ConfigError(f"{source}: stage {stage!r} has model.embedding_size {cfg.model.embedding_size} "
                                  f"but the teacher's is {want}; distillation compares embeddings directly")
    return configs


def dump_spec(spec: PipelineSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
