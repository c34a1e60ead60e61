"""Recursive knowledge distillation as a declarative pipeline: the spec, and the stage configs it expands to.

Recursive knowledge distillation (VarGFaceNet, arXiv:1910.04985, section 3.4): generation 1 of the student is
distilled from the teacher; generation k > 1 starts from generation k-1's weights and is distilled again from the
same teacher. Stages, in order:

    teacher          trained here with the teacher's config, or taken from an existing MLflow model
                     (``teacher.model_uri``)
    scratch          the student trained without distillation for one generation's budget (its own
                     ``train.epochs``) -- the baseline of gen-1 (``scratch_baseline.one_generation``)
    scratch-matched  the student trained without distillation for as many epochs as the last generation has had in
                     total (``scratch_baseline.epochs: match``: gen-k after the epochs of gen-1 .. gen-k) or an
                     explicit number -- the budget-matched baseline of the last generation
    gen-1            student distilled from the teacher, starting from ``init`` (``scratch`` = random weights, or a
                     model)
    gen-k            student distilled from the teacher, starting from gen-(k-1)

Recursive distillation trains gen-k for k times the student's epochs, so "gen-2 beats scratch" mixes distillation
with training longer; ``scratch-matched`` separates the two. ``scratch_baseline: true`` (the old spelling) is
``{one_generation: true}`` and ``false`` is no baseline.

``seeds: [0, 1, 2]`` runs every student stage once per seed (``train.seed`` set per stage; gen-k of seed s starts
from gen-(k-1) of seed s), named ``<stage>/seed<s>`` (``gen-1/seed1``); the teacher and its embedding cache are made
once. Without ``seeds`` each stage runs once under its plain name with the config's ``train.seed``.

Every stage's config is ``base_config`` → ``config`` → the teacher's or student's ``config`` → ``stages[<stage>]``
(nested mappings, merged in that order; keys of ``stages`` are plain stage names, applied to every seed), validated
as a whole ``FaceScaleConfig`` before anything runs. Paths in them are relative to the working directory (the
repository root under ``ray job submit --working-dir .``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from facescale.config import ConfigError, FaceScaleConfig, format_validation, load_config, merge_trees
from facescale.heads.distillation import DEFAULT_ALPHA, DistillForm
from facescale.models import list_backbones
from facescale.pfe.config import PFERunConfig

TEACHER, SCRATCH, SCRATCH_MATCHED = "teacher", "scratch", "scratch-matched"
PFE_SUFFIX = "-pfe"  # a PFE stage is named after the stage whose model it wraps: gen-2-pfe
SCRATCH_STAGES = (SCRATCH, SCRATCH_MATCHED)


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


class ScratchBaselineSpec(_Strict):
    """The students trained without distillation (``scratch_baseline``); ``true``/``false`` still parse (below)."""

    one_generation: bool = Field(True, description="stage `scratch`: the student's own config, one generation's "
                                 "budget (the baseline of gen-1)")
    epochs: Literal["match"] | int | None = Field(None, description="stage `scratch-matched`: 'match' = the total "
                                                  "epochs of the last generation (gen-1 + ... + gen-k), or a number; "
                                                  "null = no such stage")

    @field_validator("epochs")
    @classmethod
    def _positive(cls, value: Literal["match"] | int | None) -> Literal["match"] | int | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"scratch_baseline.epochs: 'match' or a positive number of epochs, not {value}")
        return value


class PFEStageSpec(_Strict):
    """``pfe``: a PFE uncertainty head (``facescale pfe``, Shi & Jain, ICCV 2019) on the model of each listed stage.

    Stage ``<stage>-pfe`` (``gen-2-pfe``, ``gen-2-pfe/seed1`` under ``seeds``) runs right after its stage, with that
    stage's config merged with ``config``; it is registered like a stage (alias ``gen-2-pfe``) and is no student.
    """

    after: list[str] = Field(min_length=1, description="plain stage names (gen-2, teacher, scratch; every seed) "
                             "whose models get a PFE head")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the PFE runs' config on top of "
                                   "the stage's, e.g. {pfe: {steps: 500}}")


class PipelineSpec(_Strict):
    """A recursive-distillation pipeline (``pipelines/*.yaml``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base_config: str | None = Field(None, description="training config YAML every stage starts from")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides for every stage")
    teacher: TeacherSpec
    student: StudentSpec
    generations: int = Field(2, ge=1)
    scratch_baseline: ScratchBaselineSpec = ScratchBaselineSpec()
    seeds: list[int] | None = Field(None, min_length=1, description="run every student stage once per seed "
                                    "(`<stage>/seed<s>`); unset: once, with the config's train.seed")
    init: str = Field("scratch", description="generation 1 starts from 'scratch' or from this model URI/checkpoint")
    distill: DistillSpec = DistillSpec()
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict, description="overrides per stage name")
    pfe: PFEStageSpec | None = Field(None, description="PFE uncertainty heads on the models of some stages")
    registered_model: str | None = Field(None, description="registered model of the stages (default: name)")
    cache_dir: str | None = Field(None, description="teacher-embedding caches: an s3://bucket/prefix, or a directory "
                                  "every node mounts at that path (default: <storage_path>/teacher_cache)")

    @field_validator("cache_dir")
    @classmethod
    def _cache_location(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("s3://"):
            raise ValueError(f"cache_dir {value!r}: teacher caches live on s3:// or in a local directory")
        return value

    @field_validator("scratch_baseline", mode="before")
    @classmethod
    def _bool_spelling(cls, value: Any) -> Any:
        # The original spelling, a bool: true = the one-generation scratch baseline only, false = none.
        if isinstance(value, bool):
            return {"one_generation": value, "epochs": None}
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"seeds: each seed once, got {value}")
        return value

    @model_validator(mode="after")
    def _known_names(self) -> PipelineSpec:
        known = set(list_backbones())
        for where, name in (("teacher.backbone", self.teacher.backbone), ("student.backbone", self.student.backbone)):
            if name is not None and name not in known:
                raise ValueError(f"{where}: unknown backbone {name!r}; known: {', '.join(sorted(known))}")
        unknown = set(self.stages) - set(self.base_stage_names())
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {sorted(unknown)}; this pipeline has "
                             f"{self.base_stage_names()} (plain names, applied to every seed)")
        unknown = set(self.pfe.after) - set(self.base_stage_names()) if self.pfe else set()
        if unknown:
            raise ValueError(f"pfe.after: unknown stage(s) {sorted(unknown)}; this pipeline has "
                             f"{self.base_stage_names()} (plain names, applied to every seed)")
        return self

    def base_stage_names(self) -> list[str]:
        """The stages without seeds, in run order: teacher, scratch, scratch-matched, gen-1, ..."""
        names = [] if self.teacher.model_uri else [TEACHER]
        names += [SCRATCH] if self.scratch_baseline.one_generation else []
        names += [SCRATCH_MATCHED] if self.scratch_baseline.epochs is not None else []
        return names + [generation_name(g) for g in range(1, self.generations + 1)]

    def stage_names(self) -> list[str]:
        """Stages (with their seed, under ``seeds``) in the order they run: the teacher, then seed after seed."""
        bases = self.base_stage_names()
        teacher = [TEACHER] if TEACHER in bases else []
        students = [b for b in bases if b != TEACHER]
        if self.seeds is None:
            return teacher + students
        return teacher + [stage_name(b, s) for s in self.seeds for b in students]

    def student_stages(self) -> set[str]:
        """The (seeded) stage names that are students: the candidates for ``champion``."""
        return {s for s in self.stage_names() if s != TEACHER}


def stage_name(base: str, seed: int | None) -> str:
    """``gen-1`` and seed 1 → ``gen-1/seed1``; no seed → ``gen-1``."""
    return base if seed is None else f"{base}/seed{seed}"


def split_stage(stage: str) -> tuple[str, int | None]:
    """``gen-1/seed1`` → (``gen-1``, 1); ``gen-1`` → (``gen-1``, None)."""
    match = re.fullmatch(r"(.+)/seed(-?\d+)", stage)
    return (match.group(1), int(match.group(2))) if match else (stage, None)


def base_stage(stage: str) -> str:
    return split_stage(stage)[0]


def generation_name(generation: int) -> str:
    return f"gen-{generation}"


def generation_of(stage: str) -> str:
    """The ``facescale.generation`` tag: ``teacher``, ``scratch`` (both scratch baselines) or the generation number."""
    base = base_stage(stage)
    match = re.fullmatch(r"gen-(\d+)", base)
    return match.group(1) if match else (SCRATCH if base in SCRATCH_STAGES else base)


def student_epochs(configs: dict[str, FaceScaleConfig], stage: str) -> int:
    """Epochs of student training behind ``stage``'s model: gen-k counts gen-1 .. gen-k (it starts from gen-(k-1));
    a scratch baseline counts its own. (``init`` other than scratch adds what that model had; not counted here.)"""
    base, seed = split_stage(stage)
    if not base.startswith("gen-"):
        return configs[stage].train.epochs
    return sum(configs[stage_name(generation_name(g), seed)].train.epochs
               for g in range(1, int(generation_of(base)) + 1))


def pfe_stage_name(stage: str) -> str:
    """The PFE stage on ``stage``'s model: ``gen-2`` → ``gen-2-pfe``, ``gen-2/seed1`` → ``gen-2-pfe/seed1``."""
    base, seed = split_stage(stage)
    return stage_name(f"{base}{PFE_SUFFIX}", seed)


def pfe_stages(spec: PipelineSpec) -> dict[str, str]:
    """Each PFE stage and the stage whose model it wraps, in run order (empty without ``pfe``)."""
    if spec.pfe is None:
        return {}
    return {pfe_stage_name(s): s for s in spec.stage_names() if base_stage(s) in spec.pfe.after}


def pfe_stage_configs(spec: PipelineSpec, configs: dict[str, FaceScaleConfig],
                      source: str = "<pipeline>") -> dict[str, PFERunConfig]:
    """Every PFE stage's validated config: its stage's config (``configs`` from :func:`stage_configs`) merged with
    ``pfe.config``, run name = the PFE stage.

    Raises:
        ConfigError: Naming the PFE stage and the key, when a merged config is invalid.
    """
    out: dict[str, PFERunConfig] = {}
    for pfe_stage, stage in pfe_stages(spec).items():
        tree = merge_trees(configs[stage].model_dump(mode="json"), spec.pfe.config if spec.pfe else {})
        tree = merge_trees(tree, {"tracking": {"run_name": pfe_stage}})
        try:
            out[pfe_stage] = PFERunConfig.model_validate(tree)
        except ValidationError as exc:
            raise ConfigError(format_validation(exc, f"{source}, stage {pfe_stage!r}")) from exc
    return out


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
    # scratch-matched comes before the generations in run order, but its epochs follow theirs: it is built last.
    order = [s for s in spec.stage_names() if base_stage(s) != SCRATCH_MATCHED]
    order += [s for s in spec.stage_names() if base_stage(s) == SCRATCH_MATCHED]
    for stage in order:
        base_name, seed = split_stage(stage)
        if stage == TEACHER:
            tree = merge_trees(merge_trees(base, spec.teacher.config), {"model": {"backbone": spec.teacher.backbone}})
        else:
            tree = merge_trees(merge_trees(base, spec.student.config), {"model": {"backbone": spec.student.backbone}})
        tree = merge_trees(tree, spec.stages.get(base_name, {}))
        tree = merge_trees(tree, {"tracking": {"run_name": stage}})
        if seed is not None:
            tree = merge_trees(tree, {"train": {"seed": seed}})
        if base_name == SCRATCH_MATCHED:
            tree = merge_trees(tree, {"train": _matched_budget(spec, configs, seed, source)})
        if base_name not in (TEACHER, *SCRATCH_STAGES):
            tree = merge_trees(tree, {"distill": {"alpha": spec.distill.alpha, "form": spec.distill.form}})
        try:
            configs[stage] = FaceScaleConfig.model_validate(tree)
        except ValidationError as exc:
            raise ConfigError(format_validation(exc, f"{source}, stage {stage!r}")) from exc
    configs = {s: configs[s] for s in spec.stage_names()}
    shared = {(c.tracking_uri(), c.tracking.experiment, c.data.root) for c in configs.values()}
    if len(shared) > 1:
        raise ConfigError(f"{source}: stages must share tracking URI, experiment and data.root; got {sorted(shared)}")
    if TEACHER in configs:
        want = configs[TEACHER].model.embedding_size
        for stage, cfg in configs.items():
            if stage != TEACHER and base_stage(stage) not in SCRATCH_STAGES and cfg.model.embedding_size != want:
                raise ConfigError(f"{source}: stage {stage!r} has model.embedding_size {cfg.model.embedding_size} "
                                  f"but the teacher's is {want}; distillation compares embeddings directly")
    return configs


def _matched_budget(spec: PipelineSpec, configs: dict[str, FaceScaleConfig], seed: int | None,
                    source: str) -> dict[str, Any]:
    """``train`` overrides of scratch-matched: ``epochs`` (and ``max_steps`` where the generations set it)."""
    wanted = spec.scratch_baseline.epochs
    if wanted != "match":
        return {"epochs": wanted}
    last = stage_name(generation_name(spec.generations), seed)
    gens = [configs[stage_name(generation_name(g), seed)].train for g in range(1, spec.generations + 1)]
    budget: dict[str, Any] = {"epochs": student_epochs(configs, last)}
    if any(t.max_steps for t in gens):  # a step budget bounds the generations: match that instead
        if not all(t.max_steps for t in gens):
            raise ConfigError(f"{source}: scratch_baseline.epochs: match needs train.max_steps on every generation "
                              "or on none")
        budget["max_steps"] = sum(t.max_steps or 0 for t in gens)
    return budget


def dump_spec(spec: PipelineSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
