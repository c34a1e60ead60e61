"""MLflow for training runs: the driver creates the run, rank 0 of the workers logs into it.

Rank checks live here, not in the training loop: every worker holds a :class:`Tracker`, and only rank 0's
actually talks to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunStatus
from mlflow.tracking import MlflowClient

from facescale.console import MLFLOW_PYTORCH_LOGGER, quiet_logger

if TYPE_CHECKING:
    from facescale.data import Manifest

log = logging.getLogger("facescale.tracking")

MLFLOW_PARAM_VALUE_MAX = 6000  # MLflow 3 param value length limit
# The MLflow 3 UI opens an experiment on its GenAI overview (traces) unless this tag says what the experiment is.
# Key and value as the UI sets them (mlflow/server/js: setExperimentTag "mlflow.experimentKind"; ExperimentKind
# CUSTOM_MODEL_DEVELOPMENT = "custom_model_development", shown as "Machine learning").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
# MLflow 3.17's UI opens every experiment on its GenAI overview unless the browser has switched to "Model training"
# (a sidebar toggle kept in the browser) or the link carries this query parameter; the experiment tag above is
# what the UI reads where that toggle is off. Links facescale prints carry the parameter.
UI_TRAINING_QUERY = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves an embedded (sqlite/file) store by default
DATASET_DIGEST_LEN = 12  # MLflow stores at most 36 characters; 12 hex digits, as `facescale data` prints the digest
NONFINITE_METRIC = "train/nonfinite_metrics"  # how many metric values MLflow refused (NaN/inf) were dropped
NONFINITE_TAG = "facescale.nonfinite_metrics"  # "name@first step,..." of the dropped metrics


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded store ``sqlite:///<cwd>/mlruns.db`` (absolute).

    The one definition of the default: ``FaceScaleConfig.tracking_uri`` (when ``tracking.uri`` is unset),
    ``tracking.models`` and ``facescale eval`` all resolve it here.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns.db').resolve()}"


def resolve_local_uri(uri: str) -> str:
    """Makes a relative sqlite/file tracking URI absolute, so Ray workers (other cwd) hit the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") or "://" in uri:
        return uri
    return Path(uri).resolve().as_uri()


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link that opens the MLflow UI on the experiment's training runs (or on one run), not on GenAI traces.

    For an embedded store (sqlite, files) the link is to ``mlflow ui`` on its default address.
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    page = f"experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/#/{page}?{UI_TRAINING_QUERY}"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: str) -> str:
    """Experiment id for ``name``; a new one stores artifacts under ``artifact_root`` (local dir or URI).

    The experiment is marked a model-training one (:data:`EXPERIMENT_KIND_TAG`), also when it exists without the
    tag, so the UI opens on its runs; a kind someone chose in the UI is left as it is.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if not exp.tags.get(EXPERIMENT_KIND_TAG):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING)
        return exp.experiment_id
    if "://" not in artifact_root:
        location = Path(artifact_root).resolve().as_uri()
    else:
        location = artifact_root
    # A tracking server with --serve-artifacts picks its own location; only pass ours for local stores.
    is_server = client.tracking_uri.startswith(("http://", "https://"))
    return client.create_experiment(name, artifact_location=None if is_server else location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING})


def dataset_entity(root: str, manifest: Manifest) -> Dataset:
    """The MLflow dataset of a shard set: named after its directory, digest and counts from its manifest.

    Args:
        root: ``data.root`` (a local path, absolute, or an ``s3://`` prefix): the dataset's source.
        manifest: The shard set's manifest (DESIGN.md: shard URLs, samples, classes, content digest).
    """
    source_type = "s3" if root.startswith("s3://") else "local"
    name = root.rstrip("/").rsplit("/", 1)[-1] or root
    profile = {"num_samples": manifest.num_samples, "num_classes": manifest.num_classes,
               "num_shards": len(manifest.shards), "image_size": list(manifest.image_size),
               "digest": manifest.digest, "creator": manifest.creator}
    return Dataset(name=name, digest=manifest.digest[:DATASET_DIGEST_LEN], source_type=source_type,
                   source=json.dumps({"uri": root}), profile=json.dumps(profile))


def log_dataset_input(tracking_uri: str, run_id: str, root: str, manifest: Manifest, context: str = "training") -> None:
    """Logs the run's training data as an MLflow dataset input (the runs list shows it; ``context`` tags its use)."""
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(
        dataset_entity(root, manifest), tags=[InputTag("mlflow.data.context", context)])])


def start_run(tracking_uri: str, experiment: str, artifact_root: str, run_name: str | None,
              params: Mapping[str, Any], config_yaml: str, tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """Creates a RUNNING MLflow run with params and the resolved config; returns its id."""
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment, artifact_root)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = list(flatten(params).items())
    for start in range(0, len(items), 100):  # MLflow's batch limit is 100 params
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:MLFLOW_PARAM_VALUE_MAX])
                                         for k, v in items[start:start + 100]])
    client.log_text(run_id, config_yaml, "config.yaml")
    return run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Marks an existing run RUNNING again (a resumed pipeline stage logs into the run it started)."""
    MlflowClient(tracking_uri).update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def end_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    """Marks the run FINISHED or FAILED."""
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


class Tracker:
    """Per-worker handle on the run; everything is a no-op except on rank 0.

    Args:
        tracking_uri: Absolute tracking URI.
        run_id: Run created by the driver.
        rank: This worker's global rank.
    """

    def __init__(self, tracking_uri: str, run_id: str, rank: int) -> None:
        self.enabled = rank == 0
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri) if self.enabled else None
        self._nonfinite: dict[str, int] | None = None  # dropped metric name -> first step (read from the run once)
        self._nonfinite_count = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs finite values; a NaN/inf one (MLflow would store it, and plots break) is dropped and counted.

        Each dropped value adds one to ``train/nonfinite_metrics`` (logged with the batch), the run's
        ``facescale.nonfinite_metrics`` tag lists each dropped metric with the step it first was, and the first
        drop of each name is a warning.
        """
        if not self.enabled:
            return
        ts = int(1000 * time.time())
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if np.isfinite(v)]
        dropped = [k for k, v in metrics.items() if not np.isfinite(v)]
        if dropped:
            batch.append(Metric(NONFINITE_METRIC, float(self._count_nonfinite(dropped, step)), ts, step))
        for start in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def _count_nonfinite(self, names: list[str], step: int) -> int:
        """Counts dropped values and tags new names; returns the run's total so far (also over restarts)."""
        if self._nonfinite is None:  # the first drop of this attempt: continue what an earlier attempt recorded
            run = self._client.get_run(self.run_id)
            self._nonfinite = {}
            for item in filter(None, run.data.tags.get(NONFINITE_TAG, "").split(",")):
                name, _, first = item.rpartition("@")
                self._nonfinite[name] = int(first) if first.isdigit() else 0
            self._nonfinite_count = int(run.data.metrics.get(NONFINITE_METRIC, 0))
        new = [n for n in names if n not in self._nonfinite]
        for name in new:
            self._nonfinite[name] = step
            log.warning("metric %s is not finite at step %d: not logged to MLflow (counted in %s, named in tag %s; "
                        "later ones are counted without a warning)", name, step, NONFINITE_METRIC, NONFINITE_TAG)
        if new:
            self.set_tag(NONFINITE_TAG, ",".join(f"{n}@{s}" for n, s in self._nonfinite.items()))
        self._nonfinite_count += len(names)
        return self._nonfinite_count

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._client.set_tag(self.run_id, key, value[:5000])  # MLflow's tag value limit is 8000

    def last_step(self, metric: str) -> int:
        """The highest step at which ``metric`` was logged in this run (0 if never; always 0 off rank 0)."""
        if not self.enabled:
            return 0
        return max((m.step for m in self._client.get_metric_history(self.run_id, metric)), default=0)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, json.dumps(data, indent=2, default=float), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: Any, name: str = "model", image_size: tuple[int, int] = (112, 112),
                  registered_model_name: str | None = None, metadata: Mapping[str, Any] | None = None) -> str | None:
        """Logs the backbone as an MLflow 3 LoggedModel linked to this run; returns its model id.

        ``metadata`` (``{"backbone": name, "embedding_size": n}``) goes into the MLmodel file, so a loader knows
        the architecture without running the model.
        """
        if not self.enabled:
            return None
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.tracking_uri)
        example = np.zeros((1, 3, *image_size), dtype=np.float32)
        was_training = model.training
        model.eval()
        try:
            # Pickle format: loads back as the nn.Module (train mode, any batch size) wherever facescale is
            # installed; MLflow 3's default pt2 export would freeze it to the example's shape and eval mode. MLflow
            # warns of pickle on every such call (logger mlflow.pytorch; no argument turns it off but pt2): the
            # choice is deliberate, so that logger is quiet for this call only (not under --verbose).
            # Explicit requirements skip MLflow's slow subprocess-based inference of them.
            with mlflow.start_run(run_id=self.run_id), quiet_logger(MLFLOW_PYTORCH_LOGGER):
                info = mlflow.pytorch.log_model(model, name=name, input_example=example,
                                                serialization_format="pickle",
                                                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                                registered_model_name=registered_model_name,
                                                metadata=dict(metadata or {}))
        finally:
            model.train(was_training)
        return info.model_id
