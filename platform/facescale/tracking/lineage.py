"""MLflow lineage of a distillation pipeline: a parent run, one nested child run per stage, registered versions.

What the MLflow UI then shows:

- the parent run (tag ``facescale.pipeline_run_id``) with the pipeline spec, a comparison table
  (``comparison.json``), per-stage metrics and plots (held-out accuracy per stage, ROC curves overlaid);
- one child run per stage (teacher, scratch, scratch-matched, gen-1, gen-2, ...; ``gen-1/seed1`` and so on when the
  pipeline has ``seeds``) tagged with ``facescale.generation``, ``facescale.stage``, ``facescale.stage_base`` (the
  stage without its seed), ``facescale.seed`` (the stage's ``train.seed``), ``facescale.student_epochs`` (epochs of
  student training behind the model), ``facescale.teacher_model_id``, ``facescale.init_model_id``,
  ``facescale.dataset_digest``, ``facescale.pipeline_run_id``, each with its LoggedModel (source run = the child);
- one registered model whose versions are the stages, with aliases named after the stages (``teacher``,
  ``scratch``, ``gen-1``, ``gen-1-seed1`` -- an alias cannot hold ``/`` --, ...) and ``champion``: among the
  students, the stage with the best held-out accuracy averaged over its seeds, and of that stage the seed whose
  model scored best (the stage is chosen on the mean, so seed noise does not pick the method).

A stage counts as done when its child run carries ``facescale.stage_complete=true``: that tag is set after the model
is registered, so a crash anywhere before it re-runs (and resumes) the stage.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from facescale.tracking.mlflow_run import get_or_create_experiment, reopen_run

log = logging.getLogger("facescale.lineage")


def safe_name(stage: str) -> str:
    """A stage name as an alias or directory name: ``gen-1/seed1`` → ``gen-1-seed1`` (aliases allow ``[\\w-]``)."""
    return stage.replace("/", "-")

TAG_PREFIX = "facescale."
TAG_PIPELINE_RUN_ID = "facescale.pipeline_run_id"
TAG_STAGE = "facescale.stage"
TAG_COMPLETE = "facescale.stage_complete"
TAG_MODEL_ID = "facescale.model_id"
TAG_CHECKPOINT = "facescale.checkpoint"
TAG_SEED = "facescale.seed"
TAG_BASE_STAGE = "facescale.stage_base"
TAG_EPOCHS = "facescale.student_epochs"
CHAMPION = "champion"


@dataclass
class StageRecord:
    """A finished stage as the pipeline needs it for the next stages and the comparison."""

    stage: str
    run_id: str
    model_id: str
    checkpoint: str
    version: str
    metrics: dict[str, float]
    tags: dict[str, str]

    @property
    def accuracy(self) -> float:
        """Held-out accuracy averaged over the verification sets (NaN when there are none)."""
        values = [v for k, v in self.metrics.items() if k.startswith("val/") and k.endswith("/accuracy")]
        return sum(values) / len(values) if values else float("nan")

    @property
    def base_stage(self) -> str:
        """The stage without its seed (``gen-1`` of ``gen-1/seed1``)."""
        return self.tags.get(TAG_BASE_STAGE, self.stage.split("/seed")[0])

    @property
    def seed(self) -> int | None:
        """The stage's ``train.seed`` (None for a run recorded before seeds were tagged)."""
        value = self.tags.get(TAG_SEED)
        return int(value) if value not in (None, "") else None


class PipelineLineage:
    """The MLflow side of one pipeline run: finds or creates its parent run, records and registers stages.

    Args:
        tracking_uri: Absolute tracking URI.
        experiment: Experiment name.
        artifact_root: Artifact location for a new experiment in a local store.
        pipeline_run_id: The user-visible id of the pipeline run; re-using it resumes the pipeline.
        pipeline_name: Name of the pipeline (the parent run's name).
        registered_model: Registered model that receives one version per stage.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str, pipeline_run_id: str,
                 pipeline_name: str, registered_model: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_id = get_or_create_experiment(self.client, experiment, artifact_root)
        self.pipeline_run_id = pipeline_run_id
        self.pipeline_name = pipeline_name
        self.registered_model = registered_model
        self.parent_run_id = ""

    def open_parent(self, tags: Mapping[str, str], spec_yaml: str) -> bool:
        """Finds the parent run of this pipeline run id (resumed: True) or creates it (False)."""
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`{TAG_PIPELINE_RUN_ID}` = '{self.pipeline_run_id}' "
                                       f"AND tags.`{TAG_STAGE}` = 'pipeline'")  # fmt: skip
        if runs:
            self.parent_run_id = runs[0].info.run_id
            reopen_run(self.tracking_uri, self.parent_run_id)
            log.info("resuming pipeline run %s (MLflow run %s)", self.pipeline_run_id, self.parent_run_id)
            return True
        all_tags = {**tags, TAG_PIPELINE_RUN_ID: self.pipeline_run_id, TAG_STAGE: "pipeline"}
        run = self.client.create_run(self.experiment_id, run_name=self.pipeline_name, tags=all_tags)
        self.parent_run_id = run.info.run_id
        self.client.log_text(self.parent_run_id, spec_yaml, "pipeline.yaml")
        return False

    def stage_runs(self) -> dict[str, Any]:
        """The latest child run of each stage of this pipeline run."""
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`{TAG_PIPELINE_RUN_ID}` = '{self.pipeline_run_id}' "
                                       f"AND tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                                       order_by=["attributes.start_time ASC"])  # fmt: skip
        return {run.data.tags[TAG_STAGE]: run for run in runs if TAG_STAGE in run.data.tags}

    def finished_stage(self, stage: str) -> StageRecord | None:
        """The record of ``stage`` when an earlier submission completed it, else None."""
        run = self.stage_runs().get(stage)
        if run is None or run.data.tags.get(TAG_COMPLETE) != "true":
            return None
        tags = run.data.tags
        return StageRecord(stage, run.info.run_id, tags[TAG_MODEL_ID], tags[TAG_CHECKPOINT],
                           tags.get("facescale.model_version", ""), dict(run.data.metrics), dict(tags))

    def interrupted_stage(self, stage: str) -> str | None:
        """The MLflow run id of an earlier, unfinished attempt at ``stage`` (to resume into), else None."""
        run = self.stage_runs().get(stage)
        if run is None or run.data.tags.get(TAG_COMPLETE) == "true":
            return None
        return run.info.run_id

    def complete_stage(self, stage: str, run_id: str, model_id: str, checkpoint: str,
                       metrics: Mapping[str, Any]) -> StageRecord:
        """Registers the stage's model as a new version with the stage's alias, then marks the stage complete."""
        try:
            self.client.get_registered_model(self.registered_model)
        except MlflowException:
            self.client.create_registered_model(self.registered_model,
                                                description=f"FaceScale pipeline {self.pipeline_name}")
        run_tags = self.client.get_run(run_id).data.tags
        version_tags = {k: v for k, v in run_tags.items() if k.startswith(TAG_PREFIX)} | {TAG_MODEL_ID: model_id}
        # Source `models:/<model id>` is how MLflow 3 registers a LoggedModel (as `mlflow.register_model` does).
        # NOTE: a local (sqlite) registry looks the LoggedModel up through the *global* tracking URI, hence
        # set_tracking_uri; and MLflow 3.17's OSS stores do not keep ModelVersion.model_id, so the model id is
        # also a version tag (and is in the source URI).
        mlflow.set_tracking_uri(self.tracking_uri)
        mv = self.client.create_model_version(self.registered_model, source=f"models:/{model_id}", run_id=run_id,
                                              model_id=model_id, tags=version_tags)
        self.client.set_registered_model_alias(self.registered_model, safe_name(stage), mv.version)
        for key, value in {TAG_MODEL_ID: model_id, TAG_CHECKPOINT: checkpoint, "facescale.model_version": mv.version,
                           TAG_COMPLETE: "true"}.items():
            self.client.set_tag(run_id, key, value)
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        record = StageRecord(stage, run_id, model_id, checkpoint, str(mv.version), numeric, dict(run_tags))
        log.info("stage %s: model %s registered as %s version %s (alias %s)", stage, model_id,
                 self.registered_model, mv.version, safe_name(stage))
        return record

    def set_champion(self, records: list[StageRecord], students: set[str]) -> StageRecord | None:
        """Points the ``champion`` alias at the best student; see :func:`pick_champion`."""
        best = pick_champion(records, students)
        if best is not None:
            self.client.set_registered_model_alias(self.registered_model, CHAMPION, best.version)
        return best

    def curves(self, record: StageRecord) -> dict[str, dict[str, Any]]:
        """The verification curves (``verification/<set>.json``) that the stage's run logged."""
        out: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.client.download_artifacts(record.run_id, "verification", tmp)
            except MlflowException:
                return out
            for path in sorted(Path(local).glob("*.json")):
                out[path.stem] = json.loads(path.read_text())
        return out

    def log_comparison(self, table: dict[str, list[Any]], metrics: Mapping[str, float],
                       plots: list[Path], summary: dict[str, list[Any]] | None = None) -> None:
        """Logs the stage comparison into the parent run: table (one row per stage run), the mean ± std over seeds
        per stage (``comparison_by_stage.json``, when given), per-stage metrics, plots."""
        self.client.log_table(self.parent_run_id, data=table, artifact_file="comparison.json")
        if summary is not None:
            self.client.log_table(self.parent_run_id, data=summary, artifact_file="comparison_by_stage.json")
        for key, value in metrics.items():
            self.client.log_metric(self.parent_run_id, key, float(value))
        for png in plots:
            self.client.log_artifact(self.parent_run_id, str(png), "plots")

    def end(self, ok: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(self.parent_run_id, status=status)


def pick_champion(records: list[StageRecord], students: set[str]) -> StageRecord | None:
    """The champion among the student records: the stage (without seed) with the best mean held-out accuracy over its
    seeds, then that stage's best-scoring seed. Without seeds this is simply the best student. Records of stages
    still missing a seed compete on the seeds they have (the alias is set again after every stage)."""
    candidates = [r for r in records if r.stage in students and r.accuracy == r.accuracy]
    if not candidates:
        return None
    by_stage: dict[str, list[StageRecord]] = {}
    for rec in candidates:
        by_stage.setdefault(rec.base_stage, []).append(rec)
    best_stage = max(by_stage.values(), key=lambda recs: sum(r.accuracy for r in recs) / len(recs))
    return max(best_stage, key=lambda r: r.accuracy)
