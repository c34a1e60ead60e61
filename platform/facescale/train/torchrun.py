"""A training run under torchrun, without Ray: every torchrun process is a worker of the same loop.

::

    torchrun --nproc-per-node 4 [--nnodes 2 --rdzv-endpoint host:29500 --rdzv-id job1] \
        -m facescale train --config F scaling.launcher=torchrun [overrides]

Every rank checks the inputs (each node sees its own paths), joins the process group (``env://``: torchrun's
``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``) and runs :func:`facescale.train.loop.run_worker`. Rank 0
also does what the Ray driver does: it creates the MLflow run, names the run's storage root
(``<scaling.storage_path>/facescale-<run id>``), hands both to the other ranks (one broadcast after the process
group is up), and at the end raises a non-finite stop, ends the MLflow run and returns the results.

Differences from Ray Train: nothing restarts a failed worker (continue with ``train.resume_from``), and the node
path check of ``train/launch.py`` does not run (it needs Ray to reach the nodes), so on several nodes the data,
storage and tracking paths must be shared by every node (or be ``s3://``, an MLflow server) -- the user's word.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch.distributed as dist

from facescale.config import ConfigError, FaceScaleConfig, dump_config
from facescale.console import is_verbose
from facescale.data import load_manifest
from facescale.parallel.dist import broadcast_object
from facescale.tracking.mlflow_run import end_run, log_dataset_input, resolve_local_uri, start_run
from facescale.train.context import TORCHRUN_VARIABLES, in_torchrun, init_process_group, torchrun_context
from facescale.train.hooks import WorkerHooks
from facescale.train.launch import TrainResult, absolute_paths, check_inputs, final_metrics, raise_if_stopped
from facescale.train.loop import run_worker

log = logging.getLogger("facescale.launch")

LAUNCH_HINT = ("torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT --rdzv-id ID] -m facescale train "
               "--config F scaling.launcher=torchrun [overrides]")


def check_torchrun_environment() -> None:
    """Refuses ``scaling.launcher=torchrun`` in a process that torchrun did not start.

    Raises:
        ConfigError: Naming the missing variables and how to launch.
    """
    if not in_torchrun():
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        raise ConfigError(f"scaling.launcher=torchrun: this process was not started by torchrun ({', '.join(missing)} "
                          f"not set); launch it as `{LAUNCH_HINT}`, or use scaling.launcher=ray")


def _open_run(cfg: FaceScaleConfig, world_size: int, tags: dict[str, str] | None) -> dict[str, Any]:
    """Rank 0: the MLflow run and the payload every rank's loop takes (as the Ray driver builds it)."""
    cfg, storage = absolute_paths(cfg)
    cfg.scaling.num_workers = world_size  # torchrun's count: what the run's params and results table show
    tracking_uri = resolve_local_uri(cfg.tracking_uri())
    run_id = start_run(tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_root, cfg.tracking.run_name,
                       cfg.model_dump(mode="json"), dump_config(cfg), tags={"facescale.launcher": "torchrun",
                                                                            **(tags or {})})
    log.info("MLflow run %s at %s (torchrun, %d workers)", run_id, tracking_uri, world_size)
    log_dataset_input(tracking_uri, run_id, cfg.data.root, load_manifest(cfg.data.root))
    return {"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": tracking_uri,
            "run_root": f"{storage.rstrip('/')}/facescale-{run_id}", "verbose": is_verbose()}


def _share_run(cfg: FaceScaleConfig, rank: int, world_size: int, tags: dict[str, str] | None) -> dict[str, Any]:
    """The payload on every rank: rank 0 opens the run; a failure there is raised on every rank, not waited for."""
    payload: dict[str, Any] = {}
    error: Exception | None = None
    if rank == 0:
        try:
            payload = _open_run(cfg, world_size, tags)
        except Exception as exn:  # any failure: told to every rank, then re-raised below
            error, payload = exn, {"error": f"{type(exn).__name__}: {exn}"}
    payload = broadcast_object(payload, 0, None)  # the run's id, tracking URI, storage root and resolved config
    if error is not None:
        raise error
    if "error" in payload:
        raise RuntimeError(f"rank 0 could not start the run: {payload['error']}")
    return payload


def run_torchrun(cfg: FaceScaleConfig, tags: dict[str, str] | None = None,
                 hooks: WorkerHooks | None = None) -> TrainResult | None:
    """Runs this torchrun process's share of a training run.

    Args:
        cfg: Validated config with ``scaling.launcher: torchrun``.
        tags: Extra MLflow tags for the run.
        hooks: What the caller adds to the loop (``train/hooks.py``): the teacher reader, a test's planted faults.

    Returns:
        On rank 0 the run's id, final metrics and last checkpoint; None on the other ranks.

    Raises:
        ConfigError: Outside torchrun.
        NonFiniteError: On rank 0, when the run stopped on a non-finite value (the message names the step).
    """
    check_torchrun_environment()
    check_inputs(cfg)  # on every rank: each node checks the paths it sees
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        log.warning("torchrun restarted the workers: this attempt is a new MLflow run from scratch; FaceScale's "
                    "automatic resume is Ray Train's (scaling.launcher=ray), here use train.resume_from")
    use_gpu = cfg.scaling.use_gpu
    init_process_group(use_gpu)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        payload = _share_run(cfg, rank, world_size, tags)
        ctx = torchrun_context(payload["run_root"], use_gpu)
        t0, ok = time.perf_counter(), False
        try:
            run_worker(ctx, payload, hooks)
            if rank == 0:
                raise_if_stopped(payload["tracking_uri"], payload["run_id"])
            ok = True
        finally:
            if rank == 0:
                end_run(payload["tracking_uri"], payload["run_id"], ok)
        if rank != 0:
            return None
        metrics, final = final_metrics(ctx.run_root)
        return TrainResult(payload["run_id"], payload["tracking_uri"], metrics, final, time.perf_counter() - t0,
                           FaceScaleConfig.model_validate(payload["config"]))
    finally:
        dist.destroy_process_group()
