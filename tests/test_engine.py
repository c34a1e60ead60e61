"""The backbone engines (DDP, DeepSpeed ZeRO 1-3) on real gloo process groups (2 ranks on 127.0.0.1, CPU).

One spawn per scenario group (DeepSpeed's first initialize in a process costs ~5 s; later ones are cheap).
Assertions run inside the ranks; a failure on any rank fails the test with that rank's traceback. The backbone is
the registry's iresnet_nano; the classifier is the real Partial FC (sample rate 1.0, dense state), outside the
engine with its own optimizer, as in the training loop.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from facescale.config import load_config
from facescale.heads.config import MarginConfig, build_margin
from facescale.models import build_backbone
from facescale.parallel import PartialFC, build_partial_fc_optimizer
from facescale.train.engine import DDPEngine, EngineError, build_engine
from facescale.train.engine_config import build_deepspeed_config
from gloo_ranks import spawn

EMB, CLASSES, B = 32, 12, 4  # embedding size, identities, per-rank micro-batch
KINDS = {"ddp": ["train.engine=ddp"],
         "zero0": ["train.engine=deepspeed", "train.deepspeed.zero_stage=0"],
         "zero1": ["train.engine=deepspeed", "train.deepspeed.zero_stage=1"],
         "zero2": ["train.engine=deepspeed", "train.deepspeed.zero_stage=2"],
         "zero3": ["train.engine=deepspeed", "train.deepspeed.zero_stage=3"]}
# DDP and ZeRO reduce gradients in a different order (bucketed all-reduce vs reduce-scatter of flat partitions);
# the fp32 rounding differences grow over steps. Measured here: <= 1.2e-6 relative on the losses over 8 steps.
LOSS_RTOL = 2e-5


def _cfg(kind: str, *extra: str):
    return load_config(None, ["model.backbone=iresnet_nano", f"model.embedding_size={EMB}", f"train.batch_size={B}",
                              "train.lr=0.05", *KINDS[kind], *extra])


def _batch(step: int, rows: int, nan_rank: int | None = None, rank: int = 0):
    """The same global batch on every rank for ``step`` (rank slices are taken by the caller)."""
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(rows, 3, 112, 112, generator=g)
    labels = torch.randint(0, CLASSES, (rows,), generator=g)
    if nan_rank is not None and rank == nan_rank:
        images[0, 0, 0, 0] = float("nan")
    return images, labels


class _Run:
    """One engine + its own Partial FC, as the loop holds them."""

    def __init__(self, kind: str, *extra: str, train_mode: bool = True, pfc_lr: float = 0.05) -> None:
        cfg = _cfg(kind, *extra)
        torch.manual_seed(0)
        backbone = build_backbone("iresnet_nano", EMB)
        backbone.train(train_mode)  # eval: BatchNorm uses running stats, so samples are independent
        self.engine = build_engine(cfg, backbone, torch.device("cpu"))
        self.pfc = PartialFC(build_margin(MarginConfig(type="cosface", s=16.0)), EMB, CLASSES, seed=0,
                             sparse_grad=False)
        self.pfc_opt = build_partial_fc_optimizer(self.pfc.parameters(), "sgd", lr=pfc_lr, dense=True)

    def backward(self, micro_batches) -> float:
        """Forward + backward of one optimizer step's micro-batches; the mean loss."""
        losses = []
        for i, (images, labels) in enumerate(micro_batches):
            with self.engine.micro_batch(last=i == len(micro_batches) - 1):
                loss = self.pfc(self.engine.forward(images), labels)
                self.engine.backward(loss)
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def step(self) -> bool:
        applied = self.engine.step()
        if applied:
            self.pfc_opt.step()
        self.pfc_opt.zero_grad(set_to_none=True)
        return applied


def _local(step: int, rank: int, world_size: int, rows: int = B, **kw):
    images, labels = _batch(step, rows * world_size, rank=rank, **kw)
    return images[rank * rows:(rank + 1) * rows], labels[rank * rows:(rank + 1) * rows]


def _assert_state_equal(a: dict, b: dict, rel: float = 0.0, what: str = "") -> None:
    """Backbone and momentum equal up to ``rel`` times each tensor's largest magnitude (0: bitwise)."""
    assert a["backbone"].keys() == b["backbone"].keys(), what
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys(), what
    pairs = [(f"{what} {k}", a["backbone"][k], b["backbone"][k]) for k in b["backbone"]]
    pairs += [(f"{what} momentum {k}", e["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
              for k, e in a["optimizer"]["state"].items()]
    for msg, x, y in pairs:
        # (+2e-7 absolute: a few parameters and momenta stay at float32 noise, |x| ~ 1e-8..1e-7, where the engines'
        # different reduction orders make a difference as large as the value itself; 1e-7 sat at that edge -- a
        # momentum entry of 4.6e-8 differed by 1.02e-7 after a rounding-only change to Partial FC's cosine chunks)
        atol = rel * float(y.abs().max()) + 2e-7 if rel and y.is_floating_point() and y.numel() else 0.0
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=lambda m, what=msg: f"{what}: {m}")


# --------------------------------------------------------------------------------------------- unit (no spawn)
def test_deepspeed_config_from_train_section() -> None:
    cfg = load_config(None, ["train.engine=deepspeed", "train.grad_accum_steps=4", "train.grad_clip=null",
                             "train.bf16=true", "train.batch_size=16", "train.deepspeed.zero_stage=3"])
    cfg.train.deepspeed.overrides = {"zero_optimization": {"overlap_comm": True}, "steps_per_print": 7}
    ds = build_deepspeed_config(cfg.train)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True  # merged
    assert ds["steps_per_print"] == 7 and ds["zero_allow_untested_optimizer"] is True
    cfg.train.deepspeed.precision = "fp32"
    assert build_deepspeed_config(cfg.train)["bf16"] == {"enabled": False}


def test_step_before_last_micro_batch_is_an_error() -> None:
    cfg = _cfg("ddp", "train.grad_accum_steps=2")
    engine = DDPEngine(build_backbone("iresnet_nano", EMB), torch.device("cpu"), cfg.train)
    with engine.micro_batch(last=False):
        engine.backward(engine.forward(torch.randn(2, 3, 112, 112)).sum())
    with pytest.raises(EngineError, match="micro_batch"):
        engine.step()


# ------------------------------------------------------------------------ DDP == DeepSpeed ZeRO stages 0-3
def _trajectory_worker(rank: int, world_size: int) -> None:
    curves, states = {}, {}
    for kind in KINDS:
        run = _Run(kind)
        curve = []
        for step in range(8):
            curve.append(run.backward([_local(step % 2, rank, world_size)]))  # two batches, seen 4 times each
            assert run.step()
        curves[kind], states[kind] = curve, run.engine.state_dict()
    if rank == 0 and os.environ.get("FACESCALE_PRINT_CURVES"):
        print({k: [f"{v:.7f}" for v in c] for k, c in curves.items()}, flush=True)
    for kind in ("zero0", "zero1", "zero2", "zero3"):
        torch.testing.assert_close(torch.tensor(curves[kind]), torch.tensor(curves["ddp"]), rtol=LOSS_RTOL, atol=0,
                                   msg=f"{kind} loss trajectory vs ddp")
        _assert_state_equal(states[kind], states["ddp"], rel=1e-4, what=kind)
    assert curves["ddp"][-2] < curves["ddp"][0] and curves["ddp"][-1] < curves["ddp"][1]  # it trains


def test_ddp_and_zero_stages_follow_the_same_loss_trajectory() -> None:
    spawn(_trajectory_worker, 2)


# --------------------------------------------------- accumulation, grad norm, non-finite gradients, skip_step
def _accumulation_worker(rank: int, world_size: int) -> None:
    for kind in ("ddp", "zero1", "zero2"):
        whole = _Run(kind, "train.grad_accum_steps=1", "train.grad_clip=null", train_mode=False)
        accum = _Run(kind, "train.grad_accum_steps=2", "train.grad_clip=null", train_mode=False)
        ref = _Run("ddp", "train.grad_accum_steps=1", "train.grad_clip=null", train_mode=False)
        images, labels = _local(0, rank, world_size, rows=2 * B)
        loss_whole = whole.backward([(images, labels)])
        loss_accum = accum.backward([(images[:B], labels[:B]), (images[B:], labels[B:])])
        ref.backward([(images, labels)])
        # The classifier (outside the engine) gets the mean over micro-batches too: same gradient as one batch.
        scale = float(whole.pfc.weight.grad.abs().max())  # (summed instead of averaged, it would be 2x)
        torch.testing.assert_close(accum.pfc.weight.grad, whole.pfc.weight.grad, rtol=1e-5, atol=1e-5 * scale)
        assert math.isclose(loss_accum, loss_whole, rel_tol=1e-5)
        # grad_norm: torch's clip_grad_norm_ total norm of the (DDP-averaged) gradients, the same on every rank.
        torch_norm = float(torch.nn.utils.clip_grad_norm_(ref.engine.backbone.parameters(), float("inf")))
        if kind == "ddp":
            assert whole.engine.grad_norm() == torch_norm
        assert math.isclose(whole.engine.grad_norm(), torch_norm, rel_tol=1e-5), (kind, torch_norm)
        assert math.isclose(accum.engine.grad_norm(), torch_norm, rel_tol=1e-5), (kind, torch_norm)
        norms = torch.tensor([whole.engine.grad_norm()])
        dist.broadcast(norms, 0)
        assert norms.item() == whole.engine.grad_norm()
        for run in (whole, accum, ref):
            assert run.step()
        _assert_state_equal(accum.engine.state_dict(), whole.engine.state_dict(), rel=1e-4, what=f"{kind} accum")

        _check_skips(whole, ref, rank, world_size, kind)
    # bf16 ZeRO-2: a bf16 module (BatchNorm buffers included) over fp32 master weights; the same guarantees.
    whole, ref = (_Run("zero2", "train.bf16=true", "train.grad_clip=null", train_mode=False) for _ in range(2))
    for run in (whole, ref):
        run.backward([_local(0, rank, world_size, rows=2 * B)])
        assert run.step()
    _check_skips(whole, ref, rank, world_size, "zero2-bf16")


def _check_skips(whole: _Run, ref: _Run, rank: int, world_size: int, kind: str) -> None:
    """``whole`` and ``ref`` have taken the same steps; ``whole`` now skips two, then both take the same one."""
    # A NaN planted in rank 0's input: every rank sees a non-finite norm, step() applies nothing.
    before = whole.engine.state_dict()
    whole.backward([_local(1, rank, world_size, rows=2 * B, nan_rank=0)])
    assert not math.isfinite(whole.engine.grad_norm()), kind
    assert whole.step() is False
    whole.pfc_opt.zero_grad(set_to_none=True)
    _assert_state_equal(whole.engine.state_dict(), before, what=f"{kind} after a non-finite step")
    # A finite step dropped with skip_step leaves weights and optimizer state bitwise unchanged ...
    whole.backward([_local(2, rank, world_size, rows=2 * B)])
    assert math.isfinite(whole.engine.grad_norm())
    whole.engine.skip_step()
    whole.pfc_opt.zero_grad(set_to_none=True)
    _assert_state_equal(whole.engine.state_dict(), before, what=f"{kind} after skip_step")
    # ... and its gradients are gone: the next step equals one taken without the skipped batches.
    for run in (whole, ref):
        run.backward([_local(3, rank, world_size, rows=2 * B)])
        assert run.step()
    _assert_state_equal(whole.engine.state_dict(), ref.engine.state_dict(), rel=1e-4, what=f"{kind} vs ref")


def test_accumulation_grad_norm_and_skipped_steps() -> None:
    spawn(_accumulation_worker, 2)


# --------------------------------------------------------- ZeRO-2 state on 2 ranks resumes on 1 rank (any engine)
# The classifier is held fixed (lr 0: its centers are world-size independent at init), so the backbone's state alone
# decides the resumed trajectory; resharding Partial FC checkpoints is tested with Partial FC.
FIXED_CLASSIFIER = 1e-30


def _save_worker(rank: int, world_size: int, out: str) -> None:
    run = _Run("zero2", pfc_lr=FIXED_CLASSIFIER)
    for step in range(3):
        run.backward([_local(step, rank, world_size)])
        run.step()
    saved = run.engine.state_dict()
    curve = []
    for step in range(3, 6):  # the uninterrupted run
        curve.append(run.backward([_local(step, rank, world_size)]))
        run.step()
    final = run.engine.state_dict()
    # ZeRO-3 builds, loads a ZeRO-2 state, gives it back unchanged, steps, and round-trips its own state.
    z3 = _Run("zero3")
    z3.engine.load_state_dict(saved)
    _assert_state_equal(z3.engine.state_dict(), saved, what="zero3 load/save")
    z3.backward([_local(3, rank, world_size)])
    assert z3.step()
    z3_state = z3.engine.state_dict()
    z3.engine.load_state_dict(z3_state)
    _assert_state_equal(z3.engine.state_dict(), z3_state, what="zero3 round trip")
    if rank == 0:
        torch.save({"saved": saved, "curve": curve, "final": final}, Path(out) / "zero2.pt")


def _resume_worker(rank: int, world_size: int, out: str) -> None:
    ref = torch.load(Path(out) / "zero2.pt", weights_only=False)
    params = ref["saved"]["optimizer"]["state"].keys()  # the trained parameters
    for kind in ("ddp", "zero2"):
        # One rank, 2 micro-batches of B: the two ranks' halves of the same global batches, same BatchNorm batches.
        run = _Run(kind, "train.grad_accum_steps=2", pfc_lr=FIXED_CLASSIFIER)
        run.engine.load_state_dict(ref["saved"])
        curve = []
        for step in range(3, 6):
            curve.append(run.backward([_local(step, r, 2) for r in range(2)]))
            assert run.step()
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(ref["curve"]), rtol=LOSS_RTOL, atol=0,
                                   msg=f"{kind} resumed on 1 rank vs uninterrupted ZeRO-2 on 2")
        final = run.engine.state_dict()
        # BatchNorm running stats are not compared: one rank updates them with both halves, in turn.
        keep = {"backbone": {n: final["backbone"][n] for n in params}, "optimizer": final["optimizer"]}
        want = {"backbone": {n: ref["final"]["backbone"][n] for n in params}, "optimizer": ref["final"]["optimizer"]}
        _assert_state_equal(keep, want, rel=1e-4, what=f"{kind} resumed")


def test_zero2_state_from_two_ranks_resumes_on_one(tmp_path: Path) -> None:
    spawn(_save_worker, 2, str(tmp_path))
    spawn(_resume_worker, 1, str(tmp_path))


# ------------------------------------------------------------------- device binding and DeepSpeed's op builders
@pytest.mark.parametrize("launcher_local_rank, index, stage, want_env", [
    (None, 2, 2, "2"),  # no launcher value: LOCAL_RANK defaults to the device index
    ("1", 0, 2, "1"),  # Ray Train, one GPU visible per worker: cuda:0 on local rank 1, LOCAL_RANK stays
    ("3", 3, 3, "3"),  # the usual case: they agree
])
def test_bind_device_keeps_the_launchers_local_rank(monkeypatch: pytest.MonkeyPatch, launcher_local_rank, index,
                                                     stage, want_env) -> None:
    """MOCKED, because no GPU exists on this machine: ``torch.cuda.set_device`` only records its argument."""
    from facescale.train.engine_deepspeed import bind_device

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    if launcher_local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", launcher_local_rank)
    assert bind_device(torch.device("cuda", index), stage) == index  # what DeepSpeed gets as args.device_rank
    assert current == [index] and os.environ["LOCAL_RANK"] == want_env


def test_bind_device_refuses_zero3_when_local_rank_is_not_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """MOCKED, because no GPU exists on this machine: ``torch.cuda.set_device`` does nothing."""
    from facescale.train.engine_deepspeed import bind_device

    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(EngineError, match="zero_stage 3 on cuda:0 with LOCAL_RANK=1"):
        bind_device(torch.device("cuda", 0), 3)
    assert os.environ["LOCAL_RANK"] == "1"


def test_bind_device_on_cpu_defaults_local_rank_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from facescale.train.engine_deepspeed import bind_device

    monkeypatch.setenv("LOCAL_RANK", "5")
    assert bind_device(torch.device("cpu"), 3) == 0 and os.environ["LOCAL_RANK"] == "5"


def _no_op_build_worker(rank: int, world_size: int) -> None:
    import torch.utils.cpp_extension as cpp
    from deepspeed.ops.op_builder.builder import OpBuilder

    def refuse(*args, **kwargs):
        raise AssertionError(f"DeepSpeed loaded or built an op ({args[:1]}): the Dockerfile's image cannot")

    OpBuilder.load = OpBuilder.jit_load = cpp.load = refuse
    # fp16 is not here: DeepSpeed's CPU accelerator refuses it ("Type fp16 is not supported on your device"); on a
    # GPU its dynamic loss scaler is Python (runtime/fp16/loss_scaler.py) over the same ZeRO code.
    for kind, extra in [("zero0", ()), ("zero1", ("train.bf16=true",)), ("zero2", ("train.bf16=true",)),
                        ("zero3", ()), ("zero3", ("train.bf16=true",))]:
        run = _Run(kind, *extra, "train.grad_clip=1.0")
        run.backward([_local(0, rank, world_size)])
        run.step()
        run.engine.state_dict()


def test_deepspeed_paths_build_no_op() -> None:
    # The Dockerfile's claim: FaceScale's ZeRO stages and precisions load no DeepSpeed op (none is prebuilt, and the
    # -runtime image could not JIT-build one). On CUDA the comm backend's shared-memory op has no builder at all.
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    assert CUDA_Accelerator().create_op_builder("ShareMemCommBuilder") is None
    spawn(_no_op_build_worker, 2)
