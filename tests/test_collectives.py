"""Every collective goes through ``facescale.parallel.dist`` (DESIGN.md, "Cluster rules"), and its helpers work.

Three layers: an AST scan of the library and the jobs that fails on any direct ``torch.distributed`` collective
outside ``parallel/dist.py``; the helpers (and the loop/step functions built on them) on a real 2-rank gloo group
on 127.0.0.1; and the device placement for NCCL groups, which is mocked (see ``test_nccl_only_group_*``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import facescale.parallel.dist as fdist
from gloo_ranks import spawn as _spawn

REPO = Path(__file__).resolve().parents[1]
SCANNED = [REPO / "platform" / "facescale", REPO / "jobs"]
ALLOWED = REPO / "platform" / "facescale" / "parallel" / "dist.py"
COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "all_to_all", "all_to_all_single", "barrier", "gather", "scatter", "send", "recv", "isend", "irecv",
    "monitored_barrier"})


# ------------------------------------------------------------------------------------------------ the AST scan
def _is_torch_distributed(module: str | None) -> bool:
    return module is not None and (module == "torch.distributed" or module.startswith("torch.distributed."))


def direct_collectives(source: str, filename: str) -> list[str]:
    """``"file:line name"`` for each use of a ``torch.distributed`` collective in ``source``.

    Catches ``dist.x`` under any alias of ``torch.distributed`` (or of its submodules), ``torch.distributed.x``,
    ``from torch.distributed import x`` (and ``*``), and ``getattr(dist, "x")`` -- calls and bare references
    alike (a collective handed around as a function is still called directly).
    """
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> the module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and _is_torch_distributed(dotted(node.value)):
            name = node.attr
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_torch_distributed(node.module):
            hits = [a.name for a in node.names if a.name in COLLECTIVES or a.name == "*"]
            name = ", ".join(hits) or None
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and _is_torch_distributed(dotted(node.args[0]))
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in COLLECTIVES):
            name = node.args[1].value
        if name:
            found.append((node.lineno, f"{filename}:{node.lineno} {name}"))
    return [hit for _, hit in sorted(found)]


def test_no_collective_outside_parallel_dist() -> None:
    files = sorted(p for root in SCANNED for p in root.rglob("*.py") if p != ALLOWED)
    assert len(files) > 20 and any(p.name == "loop.py" for p in files)  # the scan really looks at the tree
    found = [hit for p in files for hit in direct_collectives(p.read_text(), str(p.relative_to(REPO)))]
    assert found == [], "torch.distributed collectives outside parallel/dist.py (use its helpers):\n" + "\n".join(found)


def test_scan_catches_every_form() -> None:
    planted = '''
import torch
import torch.distributed as dist
import torch.distributed as tdist
from torch import distributed as d2
from torch.distributed import all_reduce as ar
from torch.distributed.distributed_c10d import broadcast
import torch.distributed.distributed_c10d as c10d

dist.all_reduce(t)
tdist.barrier()
torch.distributed.all_gather_into_tensor(out, t)
d2.reduce_scatter_tensor(out, t)
fn = dist.broadcast_object_list
c10d.send(t, 1)
getattr(dist, "all_to_all_single")(out, t)
'''
    hits = direct_collectives(planted, "planted.py")
    assert [h.split()[0] for h in hits] == [f"planted.py:{n}" for n in (6, 7, 10, 11, 12, 13, 14, 15, 16)], hits
    assert "planted.py:6 all_reduce" in hits and "planted.py:16 all_to_all_single" in hits


def test_scan_leaves_non_collectives_alone() -> None:
    clean = '''
import torch.distributed as dist
from facescale.parallel.dist import all_reduce_, barrier

if dist.is_initialized() and dist.get_world_size() > 1:
    dist.init_process_group("gloo")
op = dist.ReduceOp.SUM
barrier(None)
all_reduce_(t, op, None)
engine.step(); self.model.broadcast(t); store.barrier()
'''
    assert direct_collectives(clean, "clean.py") == []


# ------------------------------------------------------------------------------------- real 2-rank gloo group
def _helpers_suite(rank: int, world_size: int) -> None:
    from facescale.train.loop import _barrier, _mean_over_ranks
    from facescale.train.step import any_rank

    assert fdist.collective_device(None) == torch.device("cpu")
    assert fdist.backend_device_types(None) == {"cpu": "gloo", "cuda": "gloo"}
    # all_reduce_values: host floats in, host floats out, one collective
    got = fdist.all_reduce_values([rank + 1.0, 10.0 * rank, 0.25], dist.ReduceOp.SUM, None)
    assert got == [3.0, 10.0, 0.5] and all(type(v) is float for v in got)
    assert fdist.all_reduce_values([float(rank), -float(rank)], dist.ReduceOp.MAX, None) == [1.0, 0.0]
    assert fdist.all_reduce_values([], dist.ReduceOp.SUM, None) == []
    # broadcast_: in place, from either rank
    t = torch.full((2, 3), float(rank))
    out = fdist.broadcast_(t, 1, None)
    assert out is t and torch.equal(t, torch.ones(2, 3))
    n = torch.tensor([7 + rank])  # integer buffers too (BatchNorm's num_batches_tracked)
    assert fdist.broadcast_(n, 0, None).item() == 7
    # barrier: nobody passes until both arrived (rank 1 arrives late; rank 0 must see its store key afterwards)
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        import time

        time.sleep(0.5)
        store.set("rank1_arrived", "1")
    fdist.barrier(None)
    assert store.check(["rank1_arrived"])
    _barrier()
    # in-place all-reduce keeps the caller's tensor
    x = torch.tensor([1.0, 2.0]) * (rank + 1)
    assert fdist.all_reduce_(x, dist.ReduceOp.SUM, None) is x and x.tolist() == [3.0, 6.0]
    # any_rank: a flag set on one rank is set on all
    assert any_rank(rank == 1, False, True, device=torch.device("cpu")) == [True, False, True]
    assert any_rank(rank == 0) == [True]
    # _mean_over_ranks: global means, the same on every rank
    means = _mean_over_ranks({"loss": 1.0 + rank, "cls_loss": 4.0 * rank})
    assert means == {"loss": 1.5, "cls_loss": 2.0}
    # row helpers keep their behaviour
    rows = torch.arange(4.0).reshape(2, 2) + 10 * rank
    assert fdist.all_gather_rows(rows, None).tolist() == [[0, 1], [2, 3], [10, 11], [12, 13]]
    block = fdist.reduce_scatter_rows(torch.ones(4, 2) * (rank + 1), None)
    assert block.tolist() == [[3, 3], [3, 3]]


def test_helpers_on_two_gloo_ranks() -> None:
    _spawn(_helpers_suite, 2)


def test_single_process_without_group_is_a_no_op() -> None:
    from facescale.train.step import any_rank

    assert not dist.is_initialized()
    assert fdist.collective_device(None) == torch.device("cpu")
    assert fdist.all_reduce_values([1, 2.5], dist.ReduceOp.SUM, None) == [1.0, 2.5]
    t = torch.ones(2)
    assert fdist.broadcast_(t, 0, None) is t
    fdist.barrier(None)
    assert any_rank(True, False) == [True, False]


# --------------------------------------------------------------------------- NCCL placement, mocked (no GPU)
class _Group:
    """Stands for a process group: the helpers only hand it to torch.distributed, which is patched here."""


@pytest.fixture
def fake_group(monkeypatch: pytest.MonkeyPatch):
    """A 2-rank group of the given backend config; records every collective and the device of its tensor.

    MOCKED, because no GPU exists on this machine: ``dist.get_backend_config`` (what the helpers read the
    group's backends from), the rank/size queries, ``torch.cuda.current_device`` and the collectives themselves
    are replaced, and CUDA tensors are fake tensors (``FakeTensorMode``: devices and shapes, no data). What runs
    for real is the helpers' choice of device and their copy to it and back. The GPU check proper is
    benchmarks/gpu_check.py on a GPU machine.
    """
    calls: list[tuple[str, torch.device, dict]] = []

    def record(name: str):
        def collective(*tensors, **kwargs):
            device = tensors[-1].device if tensors else None
            calls.append((name, device, kwargs))
        return collective

    def make(config: str, current_device: int = 3) -> _Group:
        group = _Group()
        monkeypatch.setattr(fdist.dist, "get_backend_config", lambda g=None: config)
        monkeypatch.setattr(fdist.dist, "get_rank", lambda g=None: 0)
        monkeypatch.setattr(fdist.dist, "get_world_size", lambda g=None: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current_device)
        for name in ("all_reduce", "broadcast", "barrier"):
            monkeypatch.setattr(fdist.dist, name, record(name))
        monkeypatch.setattr(fdist, "_all_gather_flat", record("all_gather"))
        monkeypatch.setattr(fdist, "_reduce_scatter_flat", record("reduce_scatter"))
        return group

    make.calls = calls
    return make


def test_collective_device_follows_the_backends(fake_group) -> None:
    """Mocked (no GPU here): see ``fake_group``."""
    assert fdist.collective_device(fake_group("cuda:nccl", current_device=5)) == torch.device("cuda", 5)
    assert fdist.collective_device(fake_group("cpu:gloo,cuda:nccl")) == torch.device("cpu")
    assert fdist.collective_device(fake_group("cpu:gloo,cuda:gloo")) == torch.device("cpu")
    assert fdist.backend_device_types(fake_group("cpu:gloo,cuda:nccl")) == {"cpu": "gloo", "cuda": "nccl"}


def test_nccl_only_group_gets_cuda_tensors_and_callers_keep_theirs(fake_group) -> None:
    """Mocked (no GPU here): see ``fake_group``. A CPU tensor goes to cuda:<current>, and comes back in place."""
    group, calls = fake_group("cuda:nccl", current_device=3), fake_group.calls
    cuda3 = torch.device("cuda", 3)
    with FakeTensorMode():
        t = torch.ones(4)
        assert fdist.all_reduce_(t, dist.ReduceOp.SUM, group) is t and t.device.type == "cpu"
        b = torch.zeros(2, dtype=torch.int64)
        assert fdist.broadcast_(b, 0, group) is b and b.device.type == "cpu"
        rows = fdist.all_gather_rows(torch.ones(2, 3), group)
        assert rows.shape == (4, 3) and rows.device.type == "cpu"
        block = fdist.reduce_scatter_rows(torch.ones(4, 3), group)
        assert block.shape == (2, 3) and block.device.type == "cpu"
        on_gpu = torch.ones(3, device=cuda3)  # already where NCCL takes it: no copy
        assert fdist.all_reduce_(on_gpu, dist.ReduceOp.SUM, group) is on_gpu
    fdist.barrier(group)
    assert [(name, device) for name, device, _ in calls] == [
        ("all_reduce", cuda3), ("broadcast", cuda3), ("all_gather", cuda3), ("reduce_scatter", cuda3),
        ("all_reduce", cuda3), ("barrier", None)]
    assert calls[-1][2]["device_ids"] == [3]  # NCCL's barrier on the worker's GPU, not rank % GPU count


def test_nccl_only_group_reduces_host_values_on_the_gpu(fake_group, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mocked (no GPU here): see ``fake_group``. The fake collective stops the call once it saw its tensor (a fake
    CUDA tensor has no values to read back)."""
    group = fake_group("cuda:nccl", current_device=1)
    seen = []

    class Seen(Exception):
        pass

    def all_reduce(t, op, group):
        seen.append((t.device, t.dtype, t.shape, op))
        raise Seen

    monkeypatch.setattr(fdist.dist, "all_reduce", all_reduce)
    with FakeTensorMode(), pytest.raises(Seen):
        fdist.all_reduce_values([1.0, 2.0, 3.0], dist.ReduceOp.MAX, group)
    assert seen == [(torch.device("cuda", 1), torch.float64, (3,), dist.ReduceOp.MAX)]


def test_dual_backend_group_keeps_tensors_where_they_are(fake_group) -> None:
    """Mocked (no GPU here): see ``fake_group``. cpu:gloo,cuda:nccl takes CPU and CUDA tensors as they are."""
    group, calls = fake_group("cpu:gloo,cuda:nccl"), fake_group.calls
    cuda0 = torch.device("cuda", 0)
    with FakeTensorMode():
        host, device_rows = torch.ones(2), torch.ones(4, 3, device=cuda0)
        assert fdist.all_reduce_(host, dist.ReduceOp.SUM, group) is host
        assert fdist.all_gather_rows(device_rows, group).device == cuda0
    fdist.barrier(group)
    assert [(name, device) for name, device, _ in calls] == [("all_reduce", torch.device("cpu")),
                                                             ("all_gather", cuda0), ("barrier", None)]
    assert "device_ids" not in calls[-1][2]  # gloo's barrier
