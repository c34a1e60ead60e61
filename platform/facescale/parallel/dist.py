"""Small process-group helpers shared by Partial FC and its checkpoint.

Every helper takes an explicit ``group``. ``None`` means the default group when ``torch.distributed`` is
initialised, and a single process (rank 0 of 1, collectives become no-ops) when it is not, so the same
Partial FC code runs on a laptop without a process group.
"""

from __future__ import annotations

import socket

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


def all_gather_rows(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenates equally sized ``[B, ...]`` tensors from every rank into ``[W * B, ...]`` (no autograd)."""
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return local
    local = local.contiguous()
    out = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
    _all_gather_flat(out, local, group=group)
    return out


def reduce_scatter_rows(global_rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sums ``[W * B, ...]`` over ranks and returns this rank's ``[B, ...]`` block (no autograd)."""
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return global_rows
    global_rows = global_rows.contiguous()
    out = global_rows.new_empty((global_rows.shape[0] // world_size, *global_rows.shape[1:]))
    _reduce_scatter_flat(out, global_rows, group=group)
    return out


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce of a tensor this module allocated; a no-op without other ranks."""
    if rank_and_world_size(group)[1] > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def barrier(group: dist.ProcessGroup | None) -> None:
    """Waits for every rank of ``group``; a no-op without other ranks."""
    if rank_and_world_size(group)[1] > 1:
        dist.barrier(group=group)


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, near-equal ``[start, end)`` class range owned by ``rank``; the first ranks get one extra."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)
