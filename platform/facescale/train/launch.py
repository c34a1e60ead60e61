"""Driver side of a training run: validate inputs, create the MLflow run, start Ray, run the TorchTrainer.

Everything that can be checked before Ray starts is checked here (config, dataset manifest, verification
files), so a typo costs a second, not a cluster start. The torchrun launcher (``train/torchrun.py``) shares the
parts that know nothing of Ray: the input checks, the paths made absolute, the process-group backend, the end of
a run (stop reason, final metrics) and the results table. Ray itself is imported only by the functions that use it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from facescale.checkpoint.committed import resolve_checkpoint, verify_checkpoint
from facescale.config import ConfigError, FaceScaleConfig, dump_config
from facescale.console import RunProgress, is_verbose, ray_runtime_env, ray_train_log_level
from facescale.data import ManifestError, load_manifest
from facescale.tracking.mlflow_run import (
    end_run,
    log_dataset_input,
    reopen_run,
    resolve_local_uri,
    start_run,
    ui_url,
)
from facescale.train.context import process_group_backend
from facescale.train.hooks import WorkerHooks
from facescale.train.node_check import PathSpec, check_paths_on_nodes, is_local
from facescale.train.step import STOP_TAG, NonFiniteError

log = logging.getLogger("facescale.launch")


@dataclass
class TrainResult:
    """What a finished run reports back to the caller."""

    run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    wall_time_s: float
    config: FaceScaleConfig


def check_inputs(cfg: FaceScaleConfig) -> None:
    """Fails fast, naming the path, when the dataset or a verification file is missing or malformed.

    Raises:
        ConfigError: ``data.root`` holds no readable dataset manifest (the message names the key and the path).
        FileNotFoundError: A verification file, checkpoint or teacher cache is missing (named).
    """
    try:
        load_manifest(cfg.data.root)
    except ManifestError as exc:  # a wrong input, like a wrong key: one line and exit 2 in the CLI
        raise ConfigError(f"data.root: {exc}") from exc
    for path in cfg.data.val_bins:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.val_bins: verification file not found: {path}")
    resume = cfg.train.resume_from
    if resume and resolve_checkpoint(resume) is None:  # an uncommitted checkpoint raises, naming what is missing
        raise FileNotFoundError(f"train.resume_from: {resume} holds no committed checkpoint")
    init = cfg.train.init_from
    if init and "://" not in init and not (Path(init) / "model.pt").is_file():
        raise FileNotFoundError(f"train.init_from: {init} is not a training checkpoint (no model.pt)")


def init_ray(cfg: FaceScaleConfig) -> None:
    """Connects to ``scaling.address`` or $RAY_ADDRESS, else starts a local Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    # The setup hook quiets the Ray Train controller and its placement-group cleaner (facescale/console.py).
    runtime_env = ray_runtime_env(is_verbose())
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # A laptop run: keep Ray on the loopback interface and without the dashboard.
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env=runtime_env)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path and "://" not in path else path


def absolute_paths(cfg: FaceScaleConfig) -> tuple[FaceScaleConfig, str]:
    """A copy of ``cfg`` with its local paths absolute (as this process sees them), and the storage root.

    Returns:
        The copy, and ``scaling.storage_path`` made absolute (a URL stays as it is).
    """
    cfg = cfg.model_copy(deep=True)
    cfg.data.root = _absolute(cfg.data.root) or cfg.data.root  # s3:// roots stay URLs
    cfg.data.val_bins = [str(Path(p).resolve()) for p in cfg.data.val_bins]
    cfg.train.resume_from = _absolute(cfg.train.resume_from)
    cfg.train.init_from = _absolute(cfg.train.init_from)
    cfg.distill.teacher_cache = _absolute(cfg.distill.teacher_cache)
    storage = cfg.scaling.storage_path
    return cfg, storage if "://" in storage else str(Path(storage).resolve())


def raise_if_stopped(tracking_uri: str, run_id: str) -> None:
    """Raises the workers' deliberate stop (a non-finite policy decision), which they record as an MLflow tag.

    Raises:
        NonFiniteError: Naming the step and what was not finite.
    """
    stop = MlflowClient(tracking_uri).get_run(run_id).data.tags.get(STOP_TAG)  # set by the workers
    if stop:
        raise NonFiniteError(stop)


def final_metrics(run_root: str) -> tuple[dict[str, Any], str | None]:
    """The run's final metrics and its last committed checkpoint: the workers' last commit carries the metrics."""
    final = resolve_checkpoint(run_root)
    return (dict(verify_checkpoint(final)["meta"].get("metrics") or {}) if final else {}), final


def local_path_specs(given: FaceScaleConfig, cfg: FaceScaleConfig, storage: str) -> list[PathSpec]:
    """Every local path the run's workers read or write, with what each node must find there.

    Args:
        given: The config as the user wrote it (paths shown in messages as written).
        cfg: The same config with local paths made absolute on the driver.
        storage: ``scaling.storage_path`` made absolute (or a URL).
    """
    specs = []
    if is_local(cfg.data.root):
        specs.append(PathSpec("data.root", cfg.data.root, "dataset", given.data.root))
    specs += [PathSpec("data.val_bins", path, "file", shown) for shown, path in zip(given.data.val_bins,
                                                                                   cfg.data.val_bins)]
    if is_local(storage):
        specs.append(PathSpec("scaling.storage_path", storage, "shared_dir", given.scaling.storage_path))
    if is_local(cfg.train.init_from):
        specs.append(PathSpec("train.init_from", str(Path(cfg.train.init_from, "model.pt")), "file",
                              given.train.init_from or ""))
    if is_local(cfg.train.resume_from) and (found := resolve_checkpoint(cfg.train.resume_from)):
        specs.append(PathSpec("train.resume_from", str(Path(found, "checkpoint.json")), "file",
                              given.train.resume_from or ""))
    if is_local(cfg.distill.teacher_cache):
        specs.append(PathSpec("distill.teacher_cache", str(Path(cfg.distill.teacher_cache, "cache.json")), "file",
                              given.distill.teacher_cache or ""))
    uri = resolve_local_uri(cfg.tracking_uri())
    if uri.startswith(("sqlite:///", "file:")):  # every node's workers log (rank 0; system metrics per node)
        where = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:") else uri.removeprefix("file://")
        specs.append(PathSpec("tracking.uri", str(Path(where).parent if uri.startswith("sqlite:") else where),
                              "shared_dir", cfg.tracking_uri()))
        if is_local(cfg.tracking.artifact_root):
            specs.append(PathSpec("tracking.artifact_root", str(Path(cfg.tracking.artifact_root).resolve()),
                                  "shared_dir", cfg.tracking.artifact_root))
    return specs


def run_training(cfg: FaceScaleConfig, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                 run_id: str | None = None, ray_run_name: str | None = None,
                 hooks: WorkerHooks | None = None) -> TrainResult:
    """Runs one training job end to end and returns its metrics.

    Args:
        cfg: Validated config.
        tags: Extra MLflow tags for the run.
        parent_run_id: Nest the run under this MLflow run (pipelines).
        run_id: Continue logging into this existing MLflow run (a pipeline stage that is resumed) instead of
            creating one.
        ray_run_name: Ray Train run name (default ``facescale-<run id>``); the run's checkpoints live under
            ``<scaling.storage_path>/<name>/``, and the workers resume from the newest committed one there, so a
            stable name makes an interrupted run resumable by simply running it again.
        hooks: What the caller adds to the loop (``train/hooks.py``): the teacher reader of a distillation stage,
            a test's planted faults; pickled to every worker.

    Returns:
        The run's id, final metrics and last checkpoint.
    """
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from facescale.train.loop import train_worker

    check_inputs(cfg)
    given = cfg
    cfg, storage = absolute_paths(cfg)
    init_ray(cfg)
    # Before the MLflow run exists: a path some node cannot see costs seconds and leaves nothing behind.
    check_paths_on_nodes(local_path_specs(given, cfg, storage), cfg.scaling.per_worker_resources(),
                         cfg.scaling.num_workers)
    tracking_uri = resolve_local_uri(cfg.tracking_uri())
    if run_id is None:
        run_id = start_run(tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_root, cfg.tracking.run_name,
                           cfg.model_dump(mode="json"), dump_config(cfg), tags=tags, parent_run_id=parent_run_id)
        log_dataset_input(tracking_uri, run_id, cfg.data.root, load_manifest(cfg.data.root))
    else:
        reopen_run(tracking_uri, run_id)  # a resumed stage: its dataset input was logged when it started
    log.info("MLflow run %s at %s", run_id, tracking_uri)
    verbose = is_verbose()
    name = ray_run_name or f"facescale-{run_id}"
    run_root = f"{storage.rstrip('/')}/{name}"  # the run's checkpoints (facescale.checkpoint.store) live here
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": tracking_uri,
                           "run_root": run_root, "verbose": verbose, "hooks": hooks},
        torch_config=TorchConfig(backend=process_group_backend(cfg.scaling.use_gpu)),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **cfg.scaling.resources_per_worker}),
        # Checkpoints are committed by the workers themselves (atomically, with retention), not through Ray's
        # checkpoint upload: a restarted worker group resumes from the newest committed one in run_root.
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             logging_config=LoggingConfig(log_level=ray_train_log_level(verbose))),
    )
    global_batch = cfg.train.batch_size * cfg.scaling.num_workers * cfg.train.grad_accum_steps
    t0 = time.perf_counter()
    ok = False
    try:
        with RunProgress(tracking_uri, run_id, global_batch):  # the driver's progress line, read from MLflow
            result = trainer.fit()
        if result.error is not None:
            raise result.error
        raise_if_stopped(tracking_uri, run_id)
        ok = True
    finally:
        end_run(tracking_uri, run_id, ok)
    metrics, final = final_metrics(run_root)
    return TrainResult(run_id, tracking_uri, metrics, final, time.perf_counter() - t0, cfg)


def format_results(res: TrainResult) -> str:
    """A results table and where to look in MLflow."""
    m = res.metrics
    rows = [("backbone", res.config.model.backbone), ("workers", str(res.config.scaling.num_workers)),
            ("optimizer steps", str(m.get("step"))), ("final loss", f"{m.get('train/loss', float('nan')):.4f}"),
            ("wall time", f"{res.wall_time_s:.0f} s")]
    if m.get("summary"):  # the workers' end-of-run summary (train/loop.py)
        summary = json.loads(m["summary"])
        rows += [("throughput", f"{summary['samples_per_s_median']:.1f} samples/s"),
                 ("time per phase", "  ".join(f"{k} {100 * v:.0f}%" for k, v in summary["breakdown"].items())),
                 ("non-finite steps skipped", str(summary["nonfinite_skipped"])),
                 ("resumes", str(summary["resumes"]))]
    for key in sorted(m):
        if key.startswith("val/") and key.endswith("/accuracy"):
            name = key.split("/")[1]
            rows.append((f"{name} accuracy", f"{100 * m[key]:.2f}% ± {100 * m[f'val/{name}/accuracy_std']:.2f}"))
            rows.append((f"{name} threshold", f"{m[f'val/{name}/threshold']:.2f}"))
    width = max(len(k) for k, _ in rows)
    lines = ["", "FaceScale training results", "-" * (width + 30)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += ["-" * (width + 30), f"MLflow run:  {res.run_id}  (tracking URI {res.tracking_uri})"]
    if res.tracking_uri.startswith("sqlite:"):
        lines.append(f"Open the UI:  .venv/bin/mlflow ui --backend-store-uri {res.tracking_uri} --port 5000")
    experiment_id = MlflowClient(res.tracking_uri).get_run(res.run_id).info.experiment_id
    lines.append(f"The run:      {ui_url(res.tracking_uri, experiment_id, res.run_id)}")
    if res.checkpoint_path:
        lines.append(f"Checkpoint:  {res.checkpoint_path}")
    return "\n".join(lines)
