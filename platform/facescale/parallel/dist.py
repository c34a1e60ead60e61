"""Process-group helpers: the one module of FaceScale that calls ``torch.distributed`` collectives.

Every helper takes an explicit ``group``. ``None`` means the default group when ``torch.distributed`` is
initialised, and a single process (rank 0 of 1, collectives become no-ops) when it is not, so the same
Partial FC and loop code runs on a laptop without a process group.

Every helper also puts its tensors where the group's backend takes them (DESIGN.md, "Cluster rules"): a tensor
already on a device the group serves goes as it is; any other is copied to :func:`collective_device`, reduced
there, and copied back into the caller's tensor, so in-place helpers stay in place. This matters on GPU: Ray
Train's ``nccl`` group serves CUDA tensors only, and NCCL refuses a CPU tensor; a ``cpu:gloo,cuda:nccl`` group
serves both (gloo for CPU, NCCL for CUDA). Host scalars (logged losses, flags) prefer the CPU where the group has
a CPU backend, so they skip two copies.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

# torch >= 2.11 renamed the flat-tensor collectives; keep working on either name.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's rendezvous, or a local server in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    """True when collectives over ``group`` actually talk to other processes."""
    return group is not None or (dist.is_available() and dist.is_initialized())


def rank_and_world_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without a process group."""
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def backend_device_types(group: dist.ProcessGroup | None) -> dict[str, str]:
    """``{device type: backend}`` of ``group``, e.g. ``{"cpu": "gloo", "cuda": "nccl"}``; ``{"cpu": ...}`` alone
    without a process group.

    Read from ``dist.get_backend_config``, not ``dist.get_backend``: in torch 2.13 ``get_backend`` returns the
    string given to ``init_process_group`` as it was (``"cpu:gloo,cuda:nccl"`` for a dual group, and
    ``"undefined"`` when no backend was named), while ``get_backend_config`` always spells the resolved
    ``device:backend`` pairs (``"nccl"`` -> ``"cuda:nccl"``, ``"gloo"`` -> ``"cpu:gloo,cuda:gloo"``).
    """
    if not is_distributed(group):
        return {"cpu": "none"}
    pairs = (item.split(":", 1) for item in dist.get_backend_config(group).split(",") if ":" in item)
    return {device.strip(): backend.strip() for device, backend in pairs}


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device a collective over ``group`` runs host values on.

    The CPU when the group has a CPU backend (gloo) or there is no process group; else the current device of the
    group's accelerator (``cuda:<torch.cuda.current_device()>`` for an NCCL-only group: the loop set it to the
    worker's GPU before the group's first collective).
    """
    types = backend_device_types(group)
    if "cpu" in types:
        return torch.device("cpu")
    if "cuda" in types:
        return torch.device("cuda", torch.cuda.current_device())
    kind = next(iter(types))  # another accelerator (xpu, ...): its current device
    return torch.device(kind, torch.accelerator.current_device_index())


def _placement(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective over ``group`` takes ``tensor``: its own device if the group serves that type."""
    return tensor.device if tensor.device.type in backend_device_types(group) else collective_device(group)


def _in_place(tensor: torch.Tensor, group: dist.ProcessGroup | None,
              collective: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """Runs an in-place ``collective`` on ``tensor`` where the group takes it; the result lands in ``tensor``."""
    device = _placement(tensor, group)
    staged = tensor if device == tensor.device else tensor.to(device)
    collective(staged)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def all_gather_rows(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenates equally sized ``[B, ...]`` tensors from every rank into ``[W * B, ...]`` (no autograd).

    The result is on ``local``'s device.
    """
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return local
    staged = local.contiguous().to(_placement(local, group))
    out = staged.new_empty((world_size * staged.shape[0], *staged.shape[1:]))
    # NOTE: all-gather of every rank's rows, in rank order: each rank gets the whole [W * B, ...] batch.
    _all_gather_flat(out, staged, group=group)
    return out.to(local.device)


def reduce_scatter_rows(global_rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sums ``[W * B, ...]`` over ranks and returns this rank's ``[B, ...]`` block (no autograd).

    The result is on ``global_rows``'s device.
    """
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return global_rows
    staged = global_rows.contiguous().to(_placement(global_rows, group))
    out = staged.new_empty((staged.shape[0] // world_size, *staged.shape[1:]))
    # NOTE: reduce-scatter SUM: block r of the rank-wise sum lands on rank r, the rows of the batch it owns.
    _reduce_scatter_flat(out, staged, group=group)
    return out.to(global_rows.device)


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (copied to the group's device and back when the group cannot take it
    where it is); a no-op without other ranks.

    Returns:
        ``tensor`` itself, holding the reduced value.
    """
    if rank_and_world_size(group)[1] == 1:
        return tensor
    # NOTE: all-reduce with the caller's op; the callers say what they reduce and why.
    return _in_place(tensor, group, lambda staged: dist.all_reduce(staged, op=op, group=group))


def all_reduce_values(values: Sequence[float], op: dist.ReduceOp.RedOpType,
                      group: dist.ProcessGroup | None) -> list[float]:
    """Host numbers reduced over ``group`` in one collective, as host floats (float64 on the wire).

    Args:
        values: This rank's numbers, in the same order on every rank.
        op: The reduction, e.g. ``dist.ReduceOp.SUM`` or ``MAX``.
        group: The process group (``None``: the default one, or a single process).

    Returns:
        The reduced values; ``values`` unchanged without other ranks.
    """
    if rank_and_world_size(group)[1] == 1 or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device(group))
    # NOTE: all-reduce of a few host scalars (logged losses, non-finite flags) in one message: the caller's
    # reduction over every rank, so each rank takes the same decision or logs the same global value.
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def broadcast_(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Overwrites ``tensor`` in place with the value it has on global rank ``src``; a no-op without other ranks.

    Args:
        tensor: Same shape and dtype on every rank; copied to the group's device and back when needed.
        src: The global rank whose value wins (as ``torch.distributed.broadcast``).
        group: The process group (``None``: the default one, or a single process).

    Returns:
        ``tensor`` itself.
    """
    if rank_and_world_size(group)[1] == 1:
        return tensor
    # NOTE: broadcast from src: every rank ends with src's value (the callers say why one rank's value wins).
    return _in_place(tensor, group, lambda staged: dist.broadcast(staged, src=src, group=group))


def broadcast_object(obj: Any, src: int, group: dist.ProcessGroup | None) -> Any:
    """``obj`` as global rank ``src`` has it, on every rank (pickled; for small host values, e.g. a run's ids).

    Two broadcasts through :func:`broadcast_` (the pickle's length, then its bytes), so the tensors go where the
    group's backend takes them, as for every other helper here.

    Args:
        obj: The value on ``src`` (ignored on the other ranks); picklable.
        src: The global rank whose value wins.
        group: The process group (``None``: the default one, or a single process).

    Returns:
        ``src``'s value; ``obj`` itself without other ranks.
    """
    rank, world_size = rank_and_world_size(group)
    if world_size == 1:
        return obj
    data = pickle.dumps(obj) if rank == src else b""
    # NOTE: broadcast from src of the pickle's length, then of its bytes: every rank ends with src's value.
    size = int(broadcast_(torch.tensor([len(data)], dtype=torch.int64), src, group)[0])
    payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank == src
               else torch.empty(size, dtype=torch.uint8))
    broadcast_(payload, src, group)
    return obj if rank == src else pickle.loads(payload.numpy().tobytes())


def barrier(group: dist.ProcessGroup | None) -> None:
    """Waits for every rank of ``group``; a no-op without other ranks.

    A group without a CPU backend (NCCL only) implements the barrier as a one-element all-reduce on a GPU; torch
    picks that GPU from ``device_ids``, else from the group's bound or first-used device, else ``rank % local GPU
    count`` -- the wrong GPU, or a hang, when Ray Train gives each worker its own ``CUDA_VISIBLE_DEVICES``. So the
    worker's current device is named here.
    """
    if rank_and_world_size(group)[1] == 1:
        return
    device = collective_device(group)
    # NOTE: barrier: no rank returns before every rank of the group has entered (e.g. before a commit is read).
    if device.type == "cpu":
        dist.barrier(group=group)
    else:
        dist.barrier(group=group, device_ids=[device.index])


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, near-equal ``[start, end)`` class range owned by ``rank``; the first ranks get one extra."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)
