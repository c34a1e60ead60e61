"""Runs a recursive-distillation pipeline: stage after stage on Ray Train, each a nested MLflow run.

Re-running with the same pipeline run id resumes: a stage whose child run is marked complete is skipped (its model
and checkpoint are reused), an interrupted stage continues in its own MLflow run from its latest committed checkpoint
(the stage's Ray run name, hence its checkpoint directory, is stable, and the workers resume from it), and the
teacher-embedding cache is reused when it was made by the same teacher for the same data.

Where things live: teacher caches under ``cache_dir`` (default ``<scaling.storage_path>/teacher_cache``), an
``s3://`` prefix or a directory every node mounts; a given init model under ``<storage_path>/<pipeline run id>/init``
(uploaded when the storage is ``s3://``); the comparison plots in the parent MLflow run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facescale.config import ConfigError, FaceScaleConfig
from facescale.data import load_manifest
from facescale.distill.cache import teacher_hooks
from facescale.distill.cache_build import build_teacher_cache
from facescale.distill.pipeline import (
    SCRATCH,
    SCRATCH_STAGES,
    TEACHER,
    PipelineSpec,
    dump_spec,
    generation_name,
    generation_of,
    pfe_stage_configs,
    pfe_stages,
    split_stage,
    stage_name,
    student_epochs,
)
from facescale.distill.pipeline import stage_configs as build_stage_configs
from facescale.distill.report import comparison_metrics, plot_accuracy, stage_table, summary_table
from facescale.eval.plots import plot_roc
from facescale.tracking.lineage import TAG_BASE_STAGE, TAG_EPOCHS, TAG_SEED, PipelineLineage, StageRecord, safe_name
from facescale.tracking.mlflow_run import resolve_local_uri
from facescale.tracking.models import LoadedBackbone, ModelResolveError, load_backbone
from facescale.train.launch import check_inputs, init_ray, run_training
from facescale.train.node_check import PathSpec, check_paths_on_nodes, is_local

log = logging.getLogger("facescale.distill")


@dataclass
class PipelineResult:
    """What a pipeline run reports: per-stage records, which stages were skipped, the champion."""

    pipeline_run_id: str
    parent_run_id: str
    tracking_uri: str
    registered_model: str
    records: dict[str, StageRecord]
    skipped: list[str]
    champion: str | None
    teacher_cache_built: bool | None
    wall_time_s: float
    stage_times_s: dict[str, float] = field(default_factory=dict)
    pfe_records: dict[str, StageRecord] = field(default_factory=dict)  # gen-2-pfe, ...: PFE heads on stage models
    plots: list[Path] = field(default_factory=list)


def default_run_id(spec: PipelineSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _checkpoint_identity(directory: str) -> str:
    """``checkpoint-<sha256 of model.pt>`` of a checkpoint directory, local or ``s3://`` (same bytes, same id).

    Raises:
        ConfigError: When there is no ``model.pt`` to identify the model by (e.g. an MLflow model directory without
            a model id), or the URL scheme is neither local nor ``s3://``.
    """
    digest = hashlib.sha256()
    if directory.startswith("s3://"):
        from facescale import storage  # lazy: boto3 only for s3:// (DESIGN.md)

        url = directory.rstrip("/") + "/model.pt"
        try:
            with storage.open_read(url) as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
        except storage.StorageError as exn:
            raise ConfigError(f"{directory}: cannot identify the model by {url}: {exn}") from exn
    elif "://" in directory and not directory.startswith("file://"):
        raise ConfigError(f"{directory}: a model without an MLflow model id is identified by its model.pt, which is "
                          "read from a local directory or s3:// only")  # fmt: skip
    else:
        path = Path(directory.removeprefix("file://"))
        path = path if path.name == "model.pt" else path / "model.pt"
        if not path.is_file():
            raise ConfigError(f"{directory}: no model.pt to identify this model by (give a models:/ URI instead)")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return f"checkpoint-{digest.hexdigest()[:16]}"


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)


def _resolve(uri: str, what: str, tracking_uri: str) -> LoadedBackbone:
    try:
        return load_backbone(uri, tracking_uri=tracking_uri)
    except ModelResolveError as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def _save_init(loaded: LoadedBackbone, directory: Path) -> str:
    """Writes a given model's weights as a checkpoint directory that ``train.init_from`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    arch = {"backbone": loaded.backbone, "embedding_size": loaded.embedding_size}
    torch.save({"backbone": loaded.module.state_dict(), "arch": arch}, directory / "model.pt")
    return str(directory)


class PipelineRunner:
    """Validates a pipeline up front, then runs (or resumes) its stages.

    Args:
        spec: The validated pipeline spec.
        pipeline_run_id: Id of this pipeline run; the same id resumes it.
        source: Where the spec came from (named in errors).
    """

    def __init__(self, spec: PipelineSpec, pipeline_run_id: str | None = None, source: str = "<pipeline>") -> None:
        self.spec = spec
        self.pipeline_run_id = pipeline_run_id or default_run_id(spec)
        self.configs = build_stage_configs(spec, source)
        first = next(iter(self.configs.values()))
        self.base: FaceScaleConfig = first
        self.tracking_uri = resolve_local_uri(first.tracking_uri())
        self.registered_model = spec.registered_model or spec.name
        storage = first.scaling.storage_path
        # The run storage: a local directory (shared by the nodes, as Ray Train requires) or a URL such as s3://.
        self.remote_storage = "://" in storage
        self.storage = storage.rstrip("/") if self.remote_storage else str(Path(storage).resolve())
        if self.remote_storage and not storage.startswith("s3://"):  # caches and init models go to s3:// only
            if spec.cache_dir is None:
                raise ConfigError(f"{source}: scaling.storage_path is {storage}: set cache_dir (an s3:// URL, or a "
                                  "filesystem every node mounts)")  # fmt: skip
            if spec.init != SCRATCH:
                raise ConfigError(f"{source}: init {spec.init} is uploaded to scaling.storage_path, which must then "
                                  f"be local or s3://, not {storage}")  # fmt: skip
        cache = spec.cache_dir or f"{self.storage}/teacher_cache"
        # Teacher caches: under an s3:// prefix (nodes share no disk), or a local directory every node mounts.
        self.cache_root = cache.rstrip("/") if cache.startswith("s3://") else str(Path(cache).resolve())
        for cfg in self.configs.values():
            check_inputs(cfg)  # dataset manifest and verification files, before anything starts
        self.pfe_configs = pfe_stage_configs(spec, self.configs, source)  # validated before anything runs
        self.manifest = load_manifest(first.data.root)
        # Models given by URI resolve now: a typo costs a second, not a teacher training.
        self.teacher: LoadedBackbone | None = None
        if spec.teacher.model_uri:
            self.teacher = _resolve(spec.teacher.model_uri, "teacher.model_uri", self.tracking_uri)
            self._check_student_size(self.teacher.embedding_size, "the teacher's")
        self._cache: tuple[str, str] | None = None
        self.init: LoadedBackbone | None = None
        if spec.init != "scratch":
            self.init = _resolve(spec.init, "init", self.tracking_uri)
            student = self._first_generation().model
            if (self.init.backbone, self.init.embedding_size) != (student.backbone, student.embedding_size):
                raise ConfigError(f"init: {spec.init} is {self.init.backbone} with embedding "
                                  f"{self.init.embedding_size}; the student is {student.backbone} with embedding "
                                  f"{student.embedding_size}")  # fmt: skip

    def _first_generation(self) -> FaceScaleConfig:
        """gen-1's config (of the first seed under ``seeds``: the seeds differ only in ``train.seed``)."""
        return next(c for s, c in self.configs.items() if split_stage(s)[0] == generation_name(1))

    def _check_student_size(self, teacher_size: int, what: str) -> None:
        for stage, cfg in self.configs.items():
            if stage.startswith("gen-") and cfg.model.embedding_size != teacher_size:
                raise ConfigError(f"stage {stage!r}: model.embedding_size {cfg.model.embedding_size} differs from "
                                  f"{what} embedding size {teacher_size}; distillation compares embeddings directly")

    def run(self) -> PipelineResult:
        """Runs every stage that is not already complete; returns the per-stage records."""
        t0 = time.perf_counter()
        cfg = self.base
        init_ray(cfg)
        if is_local(self.cache_root):  # built by Ray tasks on any node, read by every worker: must be shared
            check_paths_on_nodes([PathSpec("cache_dir", self.cache_root, "shared_dir", self.spec.cache_dir or "")],
                                 cfg.scaling.per_worker_resources(), cfg.scaling.num_workers)
        lineage = PipelineLineage(self.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_root,
                                  self.pipeline_run_id, self.spec.name, self.registered_model)
        lineage.open_parent({"facescale.pipeline": self.spec.name, "facescale.dataset_digest": self.manifest.digest,
                             "facescale.registered_model": self.registered_model}, dump_spec(self.spec))
        log.info("pipeline %s: run id %s, stages %s", self.spec.name, self.pipeline_run_id, self.spec.stage_names())
        result = PipelineResult(self.pipeline_run_id, lineage.parent_run_id, self.tracking_uri, self.registered_model,
                                {}, [], None, None, 0.0)
        ok = False
        try:
            for stage in self.spec.stage_names():
                done = lineage.finished_stage(stage)
                if done is not None:
                    log.info("stage %s: already complete (run %s), skipped", stage, done.run_id)
                    result.records[stage], result.skipped = done, [*result.skipped, stage]
                    self._run_pfe_stages(stage, lineage, result)
                    continue
                s0 = time.perf_counter()
                result.records[stage] = self._run_stage(stage, lineage, result)
                result.stage_times_s[stage] = time.perf_counter() - s0
                lineage.set_champion(list(result.records.values()), self.spec.student_stages())
                self._run_pfe_stages(stage, lineage, result)
            champion = lineage.set_champion(list(result.records.values()), self.spec.student_stages())
            result.champion = champion.stage if champion else None
            self._compare(lineage, result)
            ok = True
        finally:
            lineage.end(ok)
        result.wall_time_s = time.perf_counter() - t0
        return result

    def _run_pfe_stages(self, stage: str, lineage: PipelineLineage, result: PipelineResult) -> None:
        """The PFE stages on ``stage``'s model (``pfe.after``): a child run each, registered like a stage."""
        from facescale.pfe.train import run_pfe

        for pfe_stage, source_stage in pfe_stages(self.spec).items():
            if source_stage != stage:
                continue
            done = lineage.finished_stage(pfe_stage)
            if done is not None:
                log.info("stage %s: already complete (run %s), skipped", pfe_stage, done.run_id)
                result.pfe_records[pfe_stage] = done
                continue
            tags = {"facescale.pipeline_run_id": self.pipeline_run_id, TAG_BASE_STAGE: split_stage(pfe_stage)[0],
                    "facescale.generation": generation_of(stage)}
            res = run_pfe(self.pfe_configs[pfe_stage], f"models:/{result.records[stage].model_id}", stage=pfe_stage,
                          tags=tags, parent_run_id=lineage.parent_run_id)
            result.pfe_records[pfe_stage] = lineage.complete_stage(pfe_stage, res.run_id, str(res.model_id), "",
                                                                   res.metrics)

    def _teacher_identity(self, records: dict[str, StageRecord]) -> tuple[str, LoadedBackbone | None, str]:
        """(model id, loaded teacher if already loaded, where to load it from)."""
        if self.teacher is not None:
            model_id = self.teacher.model_id or _checkpoint_identity(self.spec.teacher.model_uri or "")
            return model_id, self.teacher, self.spec.teacher.model_uri or ""
        rec = records[TEACHER]
        # A local checkpoint loads without a download; one in remote storage comes through MLflow.
        return rec.model_id, None, rec.checkpoint if "://" not in rec.checkpoint else f"models:/{rec.model_id}"

    def _ensure_cache(self, records: dict[str, StageRecord], result: PipelineResult) -> tuple[str, str]:
        """(teacher model id, cache directory); built or checked once per pipeline run."""
        if self._cache is not None:
            return self._cache
        model_id, loaded, where = self._teacher_identity(records)
        cache_dir = _join(self.cache_root, f"{model_id}-{self.manifest.digest[:12]}")
        if loaded is None:
            loaded = _resolve(where, "teacher checkpoint", self.tracking_uri)
        cfg = self._first_generation()
        _, built = build_teacher_cache(loaded.module, model_id, self.manifest, cache_dir, loaded.embedding_size,
                                       cfg.scaling, cfg.train.eval_batch_size, cfg.data.on_error)
        result.teacher_cache_built = built
        self._cache = (model_id, cache_dir)
        return self._cache

    def _init_for(self, stage: str, records: dict[str, StageRecord]) -> tuple[str | None, str]:
        """(``train.init_from`` directory or URL, init model id tag) of a student stage.

        A given init model is written as a checkpoint under the run storage, ``<storage>/<pipeline run id>/init``:
        a local directory there (which every node sees, as Ray Train's storage must be), or uploaded to s3:// so that
        workers on any node read it.
        """
        base, seed = split_stage(stage)
        if base in SCRATCH_STAGES:
            return None, "none"
        generation = int(generation_of(base))
        if generation > 1:
            prev = records[stage_name(generation_name(generation - 1), seed)]  # the same seed's previous generation
            return prev.checkpoint, prev.model_id
        if self.init is None:
            return None, "none"
        identity = self.init.model_id or _checkpoint_identity(self.spec.init)
        if not self.remote_storage:
            return _save_init(self.init, Path(self.storage) / self.pipeline_run_id / "init"), identity
        from facescale import storage  # lazy: boto3 only for s3:// (DESIGN.md)

        uri = f"{self.storage}/{self.pipeline_run_id}/init"
        with tempfile.TemporaryDirectory(prefix="facescale-init-") as tmp:
            storage.upload_file(Path(_save_init(self.init, Path(tmp))) / "model.pt", f"{uri}/model.pt")
        return uri, identity

    def _run_stage(self, stage: str, lineage: PipelineLineage, result: PipelineResult) -> StageRecord:
        cfg = self.configs[stage].model_copy(deep=True)
        teacher_id = "none"
        base, _ = split_stage(stage)
        if base not in (TEACHER, *SCRATCH_STAGES):
            teacher_id, cfg.distill.teacher_cache = self._ensure_cache(result.records, result)
        init_from, init_id = (None, "none") if stage == TEACHER else self._init_for(stage, result.records)
        cfg.train.init_from = init_from
        tags = {"facescale.stage": stage, "facescale.generation": generation_of(stage), "facescale.backbone":
                cfg.model.backbone,
                "facescale.teacher_model_id": teacher_id, "facescale.init_model_id": init_id,
                "facescale.dataset_digest": self.manifest.digest, "facescale.pipeline_run_id": self.pipeline_run_id,
                TAG_BASE_STAGE: base, TAG_SEED: str(cfg.train.seed),
                TAG_EPOCHS: str(student_epochs(self.configs, stage)) if stage != TEACHER else str(cfg.train.epochs)}
        resume_run = lineage.interrupted_stage(stage)
        if resume_run:
            log.info("stage %s: resuming interrupted run %s", stage, resume_run)
        log.info("stage %s: %s, init %s, teacher %s", stage, cfg.model.backbone, init_id, teacher_id)
        res = run_training(cfg, tags=tags, parent_run_id=lineage.parent_run_id, run_id=resume_run,
                           ray_run_name=f"{self.pipeline_run_id}-{safe_name(stage)}", hooks=teacher_hooks(cfg))
        model_id = res.metrics.get("model_id")
        if not model_id or not res.checkpoint_path:
            raise RuntimeError(f"stage {stage}: the run logged no model or checkpoint (tracking.log_model must be on)")
        return lineage.complete_stage(stage, res.run_id, str(model_id), res.checkpoint_path, res.metrics)

    def _compare(self, lineage: PipelineLineage, result: PipelineResult) -> None:
        """The parent run's comparison: table, per-stage metrics, accuracy bars and overlaid ROC curves."""
        records = [result.records[s] for s in self.spec.stage_names()]
        if self.remote_storage:  # the plots go to MLflow; the driver keeps its copies in a temporary directory
            out_dir = Path(tempfile.mkdtemp(prefix=f"facescale-{self.pipeline_run_id}-"))
        else:
            out_dir = Path(self.storage) / self.pipeline_run_id
            out_dir.mkdir(parents=True, exist_ok=True)
        plots = [plot_accuracy(records, out_dir / "accuracy_by_stage.png", title=f"{self.spec.name}: held-out "
                               "verification by stage")]  # mean ± std over seeds under `seeds`
        curves: dict[str, Any] = {}
        for rec in records:
            for name, curve in lineage.curves(rec).items():
                curves[f"{rec.stage} · {name}"] = curve
        if curves:
            plots.append(plot_roc(curves, out_dir / "roc_by_stage.png", title=f"{self.spec.name}: ROC by stage"))
        lineage.log_comparison(stage_table(records, result.champion), comparison_metrics(records), plots,
                               summary=summary_table(records) if self.spec.seeds is not None else None)
        result.plots = plots


def run_pipeline(spec: PipelineSpec, pipeline_run_id: str | None = None, source: str = "<pipeline>") -> PipelineResult:
    """Validates and runs (or resumes) a pipeline; see :class:`PipelineRunner`."""
    return PipelineRunner(spec, pipeline_run_id, source).run()


__all__ = ["PipelineResult", "PipelineRunner", "default_run_id", "run_pipeline"]
