"""What the per-worker loop needs from whoever launched it: who this worker is, where it trains, where it reports.

The loop (:func:`facescale.train.loop.run_worker`) is launcher-agnostic; it talks only to a
:class:`WorkerContext`. Two launchers build one:

- **Ray Train** (``scaling.launcher: ray``, the default): :func:`ray_context` inside a Ray Train worker. Metrics
  go to Ray as well (``ray.train.report``), and Ray restarts the worker group after a failure
  (``scaling.max_failures``).
- **torchrun** (``scaling.launcher: torchrun``): :func:`torchrun_context` from the environment torchrun sets
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``GROUP_RANK``). Metrics go to MLflow only (rank 0's Tracker), and
  nothing restarts a failed worker: a run continues through ``train.resume_from``.

Neither needs the other's package: this module imports Ray only inside :func:`ray_context`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class WorkerContext:
    """One worker's place in the run.

    Attributes:
        rank: Global rank.
        world_size: Number of workers.
        local_rank: Rank among the workers of this node.
        node_rank: This node's index among the run's nodes.
        device: The training device (``cuda:<index>`` or ``cpu``).
        run_root: The run's storage root (local directory or ``s3://``): its checkpoints live under it.
        launcher: ``"ray"`` or ``"torchrun"`` (for messages).
    """

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    device: torch.device
    run_root: str
    launcher: str = "torchrun"

    def report(self, metrics: dict[str, Any]) -> None:
        """Hands a logging window's metrics to the launcher (MLflow logging is the Tracker's, not this)."""


@dataclass
class RayContext(WorkerContext):
    """A Ray Train worker: ranks from ``ray.train.get_context()``, metrics also to ``ray.train.report``."""

    launcher: str = "ray"

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)


def ray_context(run_root: str, use_gpu: bool) -> RayContext:
    """The context of this Ray Train worker.

    Args:
        run_root: The run's storage root, from the driver.
        use_gpu: ``scaling.use_gpu``: the worker's GPU as Ray Train assigned it, else the CPU.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    return RayContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ctx.get_node_rank(),
                      device, run_root)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend of the workers' process group (Ray Train's and torchrun's alike).

    On GPU the group has both backends: NCCL for CUDA tensors and gloo for the CPU tensors that small host-side
    collectives may still hand it (``facescale.parallel.dist`` places tensors on the group's device either way).
    """
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def init_process_group(use_gpu: bool) -> None:
    """Joins the process group from torchrun's environment (``env://``), on ``cuda:LOCAL_RANK`` when ``use_gpu``.

    The current CUDA device is set first: NCCL binds it, and ``facescale.parallel.dist`` runs host values of an
    NCCL-only group there.
    """
    if use_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=process_group_backend(use_gpu), init_method="env://")


def in_torchrun(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """True in a process that torchrun (or another launcher with its environment variables) started."""
    env = os.environ if environ is None else environ
    return all(name in env for name in TORCHRUN_VARIABLES)


def torchrun_context(run_root: str, use_gpu: bool) -> WorkerContext:
    """The context of this torchrun worker, from torchrun's environment.

    Args:
        run_root: The run's storage root (rank 0's, shared with every rank).
        use_gpu: ``scaling.use_gpu``: ``cuda:LOCAL_RANK`` (made the current device), else the CPU.
    """
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    return WorkerContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank,
                         int(os.environ.get("GROUP_RANK", "0")), device, run_root)
