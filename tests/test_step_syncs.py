"""The training step reads one value on the host per step when everything is finite (DESIGN.md: no host sync in the
hot path beyond one per logging window).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches every host sync (``benchmarks/gpu_check.py`` uses it);
on the CPU it does nothing. These tests stand in for it here: they count the Python-level ways of reading a tensor
on the host (``item``, ``tolist``, ``numpy``, ``cpu``, ``bool()``, ``float()``, ``int()``, ``index``) while
``train_step`` runs, and attribute each read to the innermost FaceScale file on the stack. The step itself
(``train/``) reads exactly once -- the all-reduced non-finite flags; what the classifiers read (their label checks,
Partial FC's batch layout) is theirs and is listed, not hidden. A non-finite step may read more, to name what was
not finite; the messages of the non-finite policy are checked here too, on one process and on two gloo ranks.
"""

from __future__ import annotations

import collections
import datetime
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from facescale.config import FaceScaleConfig, load_config
from facescale.parallel.dist import free_loopback_port
from facescale.train.components import build_bare_backbone, build_classifier, build_classifier_optimizer
from facescale.train.engine import build_engine
from facescale.train.observe import StepTimer
from facescale.train.step import to_device, train_step

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "facescale"
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
NUM_CLASSES, BATCH = 10, 4


@contextmanager
def counting_host_reads() -> Iterator[collections.Counter]:
    """Counts host reads of tensors by the FaceScale file (``train/step.py``, ...) that made them; a read made inside
    a library is counted as ``"<library> (from <file>)"``."""
    reads: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(self, *args, **kwargs):
            stack = traceback.extract_stack()[:-1]
            ours = [f.filename for f in stack if f.filename.startswith(str(PACKAGE))]
            where = Path(ours[-1]).relative_to(PACKAGE).as_posix() if ours else "<outside facescale>"
            if ours and stack[-1].filename != ours[-1]:  # made inside a library that FaceScale called
                library = stack[-1].filename.split("site-packages/")[-1].split("/")[0]
                where = f"{library} (from {where})"
            reads[where] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield reads
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class _PlainHead(nn.Module):
    """A classifier that reads nothing on the host, so the count is the step's own."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_size, NUM_CLASSES)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(embeddings), labels)


def _config(*extra: str) -> FaceScaleConfig:
    return load_config(None, ["model.backbone=iresnet_nano", "model.embedding_size=32", "train.grad_clip=5.0", *extra])


def _parts(cfg: FaceScaleConfig, classifier: str):
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    engine = build_engine(cfg, build_bare_backbone(cfg, cpu), cpu)
    if classifier == "plain":
        head: nn.Module = _PlainHead(cfg.model.embedding_size)
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    else:
        head = build_classifier(cfg, NUM_CLASSES, cpu)
        opt = build_classifier_optimizer(cfg, head)
    engine.backbone.train()
    return engine, head, opt


def _micro_batches(cfg: FaceScaleConfig, engine, teacher: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(cfg.train.grad_accum_steps):
        images = torch.randint(0, 256, (BATCH, 3, 112, 112), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
        targets = torch.randn(BATCH, cfg.model.embedding_size, generator=g) if teacher else None
        batches.append(to_device(images, labels, targets, torch.device("cpu"), engine.input_dtype))
    return batches


@pytest.mark.parametrize("extra,teacher", [((), False), (("train.grad_accum_steps=2",), True),
                                           (("train.bf16=true", "train.grad_accum_steps=2"), False)],
                         ids=["fp32", "accum2-distill", "bf16-accum2"])
def test_a_finite_step_reads_the_host_once(extra: tuple[str, ...], teacher: bool) -> None:
    cfg = _config(*extra)
    engine, head, opt = _parts(cfg, "plain")
    timer = StepTimer(torch.device("cpu"), sync=False)
    batches = _micro_batches(cfg, engine, teacher)
    assert batches[0][0].dtype == engine.input_dtype == (torch.bfloat16 if cfg.train.bf16 else torch.float32)
    train_step(engine, head, opt, batches, cfg, timer, torch.device("cpu"))  # SGD creates its state here
    for seed in (1, 2):
        batches = _micro_batches(cfg, engine, teacher, seed)
        with counting_host_reads() as reads:
            outcome = train_step(engine, head, opt, batches, cfg, timer, torch.device("cpu"))
        assert outcome.applied and outcome.nonfinite is None
        assert dict(reads) == {"train/step.py": 1}, reads
        # what the loop reads once per logging window stays on the device until then
        assert all(torch.is_tensor(v) and v.dim() == 0 for v in [*outcome.losses.values(), outcome.grad_norm])
        assert set(outcome.losses) == ({"loss", "cls_loss", "distill_loss"} if teacher else {"loss"})


@pytest.mark.parametrize("classifier", ["linear", "partial_fc"])
def test_the_train_package_reads_once_whatever_the_classifier(classifier: str) -> None:
    cfg = _config(f"classifier.type={classifier}", "classifier.margin.type=cosface", "train.grad_accum_steps=2")
    engine, head, opt = _parts(cfg, classifier)
    timer = StepTimer(torch.device("cpu"), sync=False)
    train_step(engine, head, opt, _micro_batches(cfg, engine), cfg, timer, torch.device("cpu"))
    with counting_host_reads() as reads:
        outcome = train_step(engine, head, opt, _micro_batches(cfg, engine, seed=1), cfg, timer, torch.device("cpu"))
    assert outcome.applied
    assert {f: n for f, n in reads.items() if f.startswith("train/")} == {"train/step.py": 1}, reads
    # the rest is the classifier's own (label range checks, Partial FC's batch layout): listed for the GPU check
    assert all(f.startswith(("heads/", "parallel/")) for f in reads if not f.startswith("train/")), reads


def _deepspeed_reads(rank: int, port: int, results: dict) -> None:
    """In a process of its own: DeepSpeed leaves a process group and global state behind."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        cfg = _config("train.engine=deepspeed", "train.deepspeed.zero_stage=2", "train.bf16=true",
                      "train.grad_accum_steps=2")
        engine, head, opt = _parts(cfg, "plain")
        timer, cpu = StepTimer(torch.device("cpu"), sync=False), torch.device("cpu")
        train_step(engine, head, opt, _micro_batches(cfg, engine), cfg, timer, cpu)
        with counting_host_reads() as reads:
            outcome = train_step(engine, head, opt, _micro_batches(cfg, engine, seed=1), cfg, timer, cpu)
        results[rank] = (dict(reads), outcome.applied, engine.input_dtype)
    finally:
        dist.destroy_process_group()


def test_under_deepspeed_the_only_other_reads_are_deepspeeds_own_step() -> None:
    """ZeRO's optimizer step checks for overflow on the host by itself (DeepSpeed's code, not ours to remove)."""
    pytest.importorskip("deepspeed")
    reads, applied, input_dtype = _spawn(_deepspeed_reads, 1)[0]
    assert applied and input_dtype == torch.bfloat16
    assert {f: n for f, n in reads.items() if not f.startswith("deepspeed ")} == {"train/step.py": 1}, reads
    assert set(reads) - {"train/step.py"} <= {"deepspeed (from train/engine_deepspeed.py)"}, reads


def test_a_nonfinite_step_is_skipped_and_named() -> None:
    cfg = _config("train.grad_accum_steps=2")
    engine, head, opt = _parts(cfg, "plain")
    timer = StepTimer(torch.device("cpu"), sync=False)
    before = [p.detach().clone() for p in [*engine.backbone.parameters(), *head.parameters()]]
    outcome = train_step(engine, head, opt, _micro_batches(cfg, engine), cfg, timer, torch.device("cpu"),
                         poison="loss")
    assert not outcome.applied
    assert outcome.nonfinite.startswith("loss nan in micro-batch 1/2; loss nan in micro-batch 2/2"), outcome.nonfinite
    after = [*engine.backbone.parameters(), *head.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step changes no weight"
    assert all(p.grad is None for p in after), "and leaves no gradient behind"
    ok = train_step(engine, head, opt, _micro_batches(cfg, engine, seed=1), cfg, timer, torch.device("cpu"))
    assert ok.applied and ok.nonfinite is None


# ----------------------------------------------------------------------------------------- two gloo ranks
def _two_ranks(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        cfg = _config()
        engine, head, opt = _parts(cfg, "plain")
        timer = StepTimer(torch.device("cpu"), sync=False)
        cpu = torch.device("cpu")
        train_step(engine, head, opt, _micro_batches(cfg, engine, seed=rank), cfg, timer, cpu)
        with counting_host_reads() as reads:
            finite = train_step(engine, head, opt, _micro_batches(cfg, engine, seed=2 + rank), cfg, timer, cpu)
        bad = train_step(engine, head, opt, _micro_batches(cfg, engine, seed=4 + rank), cfg, timer, cpu,
                         poison="loss" if rank == 1 else None)
        results[rank] = (dict(reads), finite.applied, bad.applied, bad.nonfinite)
    finally:
        dist.destroy_process_group()


def _entry(rank: int, fn: Callable, port: int, results: dict) -> None:
    sys.path.insert(0, str(PACKAGE.parent))
    fn(rank, port, results)


def _spawn(fn: Callable, nprocs: int) -> dict:
    """``{rank: what fn left in results}`` after running ``fn(rank, port, results)`` in ``nprocs`` processes."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(fn, free_loopback_port(), results), nprocs=nprocs, join=True)
        return dict(results)


def test_two_ranks_read_once_and_skip_together() -> None:
    results = _spawn(_two_ranks, 2)
    for rank in (0, 1):
        reads, finite_applied, bad_applied, _ = results[rank]
        assert reads == {"train/step.py": 1}, (rank, reads)
        assert finite_applied and not bad_applied, rank
    assert results[1][3].startswith("loss nan in micro-batch 1/1"), results[1][3]
    # rank 0's own loss was finite; DDP averaged rank 1's NaN gradients into its backbone too
    assert results[0][3] == "non-finite loss on another rank; backbone gradient norm nan", results[0][3]
