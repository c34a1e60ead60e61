"""GPU check: FaceScale's own training code on one GPU of a bare machine, then the throughput numbers.

Runs where only torch (with CUDA), numpy, Pillow, OpenCV and onnxruntime are installed -- no Ray, MLflow, DeepSpeed
or DALI -- with a few small wheels brought along (see BENCHMARKS.md, "GPU check", for the exact commands). It uses
the package's code, not copies of it:

1. **correctness**: the process group through the project's setup (``cpu:gloo,cuda:nccl``, world size 1); every
   collective helper of ``facescale.parallel.dist`` with host and device tensors, on the dual-backend group and
   on an NCCL-only group; the DDP engine, Partial FC with ArcFace, bf16 autocast and the real step
   (``facescale.train.step``) on synthetic uint8 batches for N steps (finite, and the loss falls on a fixed
   batch); a checkpoint save → load round trip through the atomic store; host syncs per step
   (``torch.cuda.set_sync_debug_mode``).
2. **throughput**: forward + backward + SGD step images/s for iresnet50, iresnet100, mobilefacenet and vargfacenet
   (and vit_t / vit_s when registered), batch 128, bf16, channels_last, eager and ``torch.compile``; Partial FC
   step time and peak GPU memory at 1 M and 10 M identities, sample rate 0.1, sparse default vs the dense v2
   baseline.

Budget: within 8 minutes on one H200 (each throughput case is skipped, and says so, once the budget is spent).
``--device cpu --tiny`` runs the same code on CPU in seconds (CI runs it with Ray, MLflow, DeepSpeed and DALI
unimportable). Writes ``benchmarks/results/gpu_check_<device>[_tiny].json``; a CUDA run also writes the
``gpu_check`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine, table, update_section, write_json  # noqa: E402

from facescale.checkpoint.committed import local_copy, resolve_checkpoint  # noqa: E402
from facescale.checkpoint.format import TrainCheckpoint, TrainProgress  # noqa: E402
from facescale.checkpoint.store import CheckpointStore  # noqa: E402
from facescale.config import FaceScaleConfig, load_config  # noqa: E402
from facescale.heads.config import MarginConfig, build_margin  # noqa: E402
from facescale.models import build_backbone, list_backbones  # noqa: E402
from facescale.parallel import PartialFC, build_partial_fc_optimizer  # noqa: E402
from facescale.parallel import dist as fdist  # noqa: E402
from facescale.train.components import build_bare_backbone, build_classifier, build_classifier_optimizer  # noqa: E402
from facescale.train.context import init_process_group  # noqa: E402
from facescale.train.engine import build_engine  # noqa: E402
from facescale.train.observe import StepTimer  # noqa: E402
from facescale.train.step import to_device, train_step  # noqa: E402

BUDGET_S = 8 * 60
THROUGHPUT_BACKBONES = ("iresnet50", "iresnet100", "mobilefacenet", "vargfacenet", "vit_t", "vit_s")


class Check:
    """Collects named pass/fail results with details; a failing check records its error instead of stopping."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            detail = fn()
            ok = bool(detail.pop("ok", True))
        except Exception as exn:  # a check that fails is reported with its traceback, the others still run
            detail, ok = {"error": f"{type(exn).__name__}: {exn}", "traceback": traceback.format_exc(limit=6)}, False
        row = {"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 2), **detail}
        what = detail.get("summary", detail.get("error", ""))
        print(f"[{'ok' if ok else 'FAIL'}] {name} ({row['seconds']} s) {what}", flush=True)
        self.results.append(row)
        return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _setup_process_group(device: torch.device) -> None:
    """World size 1 through the project's own setup, as torchrun would give it the environment."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(fdist.free_loopback_port()))):
        os.environ.setdefault(name, value)
    init_process_group(use_gpu=device.type == "cuda")


def check_collectives(device: torch.device) -> dict[str, Any]:
    """Every helper of facescale.parallel.dist with host and device tensors; placement on an NCCL-only group too."""
    group = None
    groups: dict[str, Any] = {"default": None}
    if device.type == "cuda":
        groups["nccl-only"] = dist.new_group(backend="nccl")
    decided = {}
    for label, g in groups.items():
        decided[label] = {"backends": fdist.backend_device_types(g), "host_values_on": str(fdist.collective_device(g))}
        for where in {torch.device("cpu"), device}:
            t = torch.arange(4.0, device=where)
            # NOTE: the world size is 1 here, so the helpers skip the wire; run the collective they would run on
            # the tensor as they would place it, so the backend really takes (or refuses) it.
            placed = t.to(fdist._placement(t, g))
            dist.all_reduce(placed, group=g)
            _sync(device)
            decided[label][f"{where.type}_tensor_placed_on"] = str(placed.device)
    x = torch.arange(6.0, device=device).reshape(3, 2)
    ok = bool(torch.equal(fdist.all_gather_rows(x, group), x) and torch.equal(fdist.reduce_scatter_rows(x, group), x)
              and fdist.all_reduce_values([1.0, 2.0], dist.ReduceOp.SUM, group) == [1.0, 2.0]
              and torch.equal(fdist.all_reduce_(x.clone(), dist.ReduceOp.SUM, group), x)
              and torch.equal(fdist.broadcast_(x.clone(), 0, group), x))
    fdist.barrier(group)
    return {"ok": ok, "groups": decided, "summary": f"helpers agree; placement {decided}"}


def _config(device: torch.device, tiny: bool, backbone: str) -> FaceScaleConfig:
    return load_config(None, [f"model.backbone={backbone}", f"model.embedding_size={32 if tiny else 512}",
                              "classifier.type=partial_fc", f"classifier.sample_rate={1.0 if tiny else 0.1}",
                              "classifier.margin.type=arcface", f"train.batch_size={16 if tiny else 128}",
                              f"train.bf16={str(device.type == 'cuda').lower()}", "train.lr=0.05",
                              "train.engine=ddp", "train.step_breakdown_sync=false",
                              f"scaling.use_gpu={str(device.type == 'cuda').lower()}"])


def _build_run(cfg: FaceScaleConfig, num_classes: int, device: torch.device) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    engine = build_engine(cfg, build_bare_backbone(cfg, device), device)
    engine.backbone.train()
    classifier = build_classifier(cfg, num_classes, device)
    return engine, classifier, build_classifier_optimizer(cfg, classifier)


def _fixed_batch(cfg: FaceScaleConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.train.batch_size, 3, 112, 112), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (cfg.train.batch_size,), generator=g)
    if torch.cuda.is_available():
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


def _step(run: tuple[Any, Any, Any], cfg: FaceScaleConfig, batch: tuple[torch.Tensor, torch.Tensor],
          timer: StepTimer, device: torch.device) -> Any:
    """One real optimizer step of ``run`` (engine, classifier, its optimizer) on a host uint8 batch."""
    engine, classifier, opt = run
    micro = [to_device(*batch, None, device, engine.input_dtype)]
    return train_step(engine, classifier, opt, micro, cfg, timer, device)


def check_step(device: torch.device, tiny: bool, steps: int, num_classes: int) -> dict[str, Any]:
    """The real step on a fixed uint8 batch: finite every step, and the loss falls."""
    cfg = _config(device, tiny, "iresnet_nano" if tiny else "iresnet50")
    run, batch = _build_run(cfg, num_classes, device), _fixed_batch(cfg, num_classes)
    timer = StepTimer(device, sync=False)
    losses, applied = [], []
    for _ in range(steps):
        outcome = _step(run, cfg, batch, timer, device)
        losses.append(outcome.losses["loss"])
        applied.append(outcome.applied)
    values = [float(v) for v in torch.stack(losses).cpu()]  # one host read for the whole run
    finite = all(v == v and abs(v) != float("inf") for v in values)
    fell = values[-1] < values[0]
    return {"ok": finite and fell and all(applied), "backbone": cfg.model.backbone, "losses": values,
            "summary": f"{cfg.model.backbone}: loss {values[0]:.3f} -> {values[-1]:.3f} over {steps} steps"}


def check_host_syncs(device: torch.device, tiny: bool, num_classes: int) -> dict[str, Any]:
    """Host syncs of one step after warm-up, counted by CUDA's sync debug mode (CUDA only)."""
    if device.type != "cuda":
        return {"syncs_per_step": None, "summary": "n/a on CPU (torch.cuda.set_sync_debug_mode needs CUDA)"}
    cfg = _config(device, tiny, "iresnet_nano" if tiny else "iresnet50")
    run, batch = _build_run(cfg, num_classes, device), _fixed_batch(cfg, num_classes)
    timer = StepTimer(device, sync=False)
    for _ in range(3):
        _step(run, cfg, batch, timer, device)
    torch.cuda.synchronize()
    counts, where = [], []
    for _ in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _step(run, cfg, batch, timer, device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        counts.append(len(syncs))
        where = [f"{Path(w.filename).name}:{w.lineno}" for w in syncs]
        torch.cuda.synchronize()
    return {"syncs_per_step": statistics.median(counts), "sync_sites": where,
            "summary": f"{statistics.median(counts)} host syncs per step at {where}"}


def check_checkpoint(device: torch.device, tiny: bool, num_classes: int) -> dict[str, Any]:
    """Save through the atomic store, load into fresh objects, compare everything that was saved."""
    cfg = _config(device, tiny, "iresnet_nano")
    run, batch = _build_run(cfg, num_classes, device), _fixed_batch(cfg, num_classes)
    timer = StepTimer(device, sync=False)
    for _ in range(2):
        _step(run, cfg, batch, timer, device)
    engine, classifier, _ = run
    progress = TrainProgress(step=2, world_size=1)
    arch = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    with tempfile.TemporaryDirectory(prefix="facescale-gpu-check-") as tmp:
        store = CheckpointStore(Path(tmp) / "run", 0, 1, lambda: fdist.barrier(None), keep_last=1)
        ckpt = TrainCheckpoint(engine.backbone, classifier, {}, progress, arch=arch, engine=engine)
        saved = store.save(2, lambda d: ckpt.save(d, 0), meta={"step": 2})
        fresh_engine, fresh_classifier, _ = _build_run(cfg, num_classes, device)  # initial weights, not trained
        restored = TrainCheckpoint(fresh_engine.backbone, fresh_classifier, {}, TrainProgress(), arch=arch,
                                   engine=fresh_engine)
        found = resolve_checkpoint(Path(tmp) / "run")
        with local_copy(found, wanted=restored.files_for_rank(0)) as directory:
            restored.load(directory, 0)
    same_backbone = all(torch.equal(a, b) for a, b in zip(engine.backbone.state_dict().values(),
                                                         fresh_engine.backbone.state_dict().values()))
    same_centers = torch.equal(classifier.weight, fresh_classifier.weight)
    return {"ok": same_backbone and same_centers and restored.progress.step == 2 and found == saved,
            "summary": f"committed {Path(saved).name}; backbone equal {same_backbone}, centers equal {same_centers}"}


def _timed(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def backbone_throughput(name: str, device: torch.device, batch: int, compiled: bool, steps: int,
                        warmup: int) -> dict[str, Any]:
    """Forward + backward + SGD step images/s of one backbone, bf16 autocast, channels_last."""
    torch.manual_seed(0)
    # channels_last on CUDA only: torch 2.13's CPU backward of these backbones in channels_last segfaults
    # (seen here with iresnet_nano), and the CPU mode exists to run the code, not to measure it.
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = build_backbone(name, 512).to(device).train().to(memory_format=layout)
    head = torch.nn.Linear(512, 1000).to(device)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 112, 112, device=device).to(memory_format=layout)
    labels = torch.randint(0, 1000, (batch,), device=device)
    forward = torch.compile(model) if compiled else model
    use_bf16 = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = torch.nn.functional.cross_entropy(head(forward(images)).float(), labels)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    seconds = _timed(step, steps, warmup, device)
    return {"backbone": name, "compiled": compiled, "batch": batch, "channels_last": layout == torch.channels_last,
            "images_per_s": round(batch / seconds, 1),
            "warmup_and_run_s": round(time.perf_counter() - t0, 1)}


def partial_fc_step(identities: int, dense: bool, device: torch.device, batch: int, steps: int) -> dict[str, Any]:
    """One Partial FC step (rate 0.1, ArcFace, SGD) over ``identities``: time and peak device memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), 512, identities, sample_rate=0.1, seed=0,
                    sparse_grad=not dense, device=device)
    opt = build_partial_fc_optimizer(pfc.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, dense=dense)
    pfc.attach_optimizer(opt)
    embeddings = torch.randn(batch, 512, device=device, requires_grad=True)
    labels = torch.randint(0, identities, (batch,), device=device)

    def step() -> None:
        loss = pfc(embeddings, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        embeddings.grad = None

    seconds = _timed(step, steps, 2, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"identities": identities, "classifier": "dense v2 (sgd, fp32)" if dense else "sparse sgd int8 (default)",
            "step_ms": round(1000 * seconds, 2), "peak_gib": None if peak is None else round(peak, 2)}


def throughput(device: torch.device, tiny: bool, deadline: float) -> dict[str, Any]:
    names = [n for n in THROUGHPUT_BACKBONES if n in list_backbones()] if not tiny else ["iresnet_nano"]
    compile_modes = (False, True) if device.type == "cuda" else (False,)  # inductor on CPU needs a C++ toolchain
    batch, steps, warmup = (8, 3, 1) if tiny else (128, 20, 5)
    backbones = []
    for name in names:
        for compiled in compile_modes:
            if time.time() > deadline:
                backbones.append({"backbone": name, "compiled": compiled, "skipped": "time budget spent"})
                continue
            try:
                row = backbone_throughput(name, device, batch, compiled, steps, warmup + (3 if compiled else 0))
            except Exception as exn:  # e.g. a compile failure: recorded, the others still run
                row = {"backbone": name, "compiled": compiled, "error": f"{type(exn).__name__}: {exn}"[:300]}
            print(f"  {row}", flush=True)
            backbones.append(row)
    pfc = []
    for identities in ([10_000] if tiny else [1_000_000, 10_000_000]):
        for dense in (False, True):
            if time.time() > deadline:
                pfc.append({"identities": identities, "dense": dense, "skipped": "time budget spent"})
                continue
            try:
                row = partial_fc_step(identities, dense, device, 16 if tiny else 128, 3 if tiny else 10)
            except torch.OutOfMemoryError as exn:
                row = {"identities": identities, "dense": dense, "error": f"out of memory: {exn}"[:300]}
            print(f"  {row}", flush=True)
            pfc.append(row)
    return {"backbones": backbones, "partial_fc": pfc}


def _markdown(payload: dict[str, Any]) -> str:
    checks = [[r["check"], "ok" if r["ok"] else "FAIL", r.get("summary", r.get("error", ""))]
              for r in payload["checks"]]
    bb = [[r["backbone"], "yes" if r["compiled"] else "no", r.get("images_per_s", r.get("skipped", r.get("error")))]
          for r in payload["throughput"]["backbones"]]
    pf = [[f"{r['identities']:,}", r.get("classifier", "dense" if r.get("dense") else "sparse"),
           r.get("step_ms", r.get("skipped", r.get("error"))), r.get("peak_gib", "-")]
          for r in payload["throughput"]["partial_fc"]]
    return (f"## GPU check (`benchmarks/gpu_check.py`, {payload['device']})\n\n"
            f"{payload['machine']['date']}, torch {payload['machine']['torch']}, CUDA {payload['cuda']}; "
            f"{payload['wall_s']:.0f} s in all.\n\n" + table(["check", "result", "detail"], checks)
            + "\n\nForward + backward + SGD step, batch 128, bf16 autocast, channels_last:\n\n"
            + table(["backbone", "torch.compile", "images / s"], bb)
            + "\n\nPartial FC, sample rate 0.1, batch 128, embedding 512, one step (forward + backward + update):\n\n"
            + table(["identities", "classifier", "step ms", "peak GiB"], pf) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes: the same code in seconds (CI on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps of the real-step check")
    parser.add_argument("--no-throughput", action="store_true", help="correctness checks only")
    parser.add_argument("--results", type=Path, default=None, help="write the JSON here instead of "
                        "benchmarks/results/ (and leave BENCHMARKS.md alone)")
    args = parser.parse_args()
    t0 = time.time()
    deadline = t0 + BUDGET_S - 90  # leave time for the Partial FC rows and the report
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
            return 2
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    num_classes = 1000 if args.tiny else 100_000
    steps = args.steps or (8 if args.tiny else 30)
    check = Check()
    check.run("process group (project setup, world size 1)", lambda: (_setup_process_group(device), {
        "backend": dist.get_backend_config(), "summary": dist.get_backend_config()})[1])
    check.run("collective helpers on the group's devices", lambda: check_collectives(device))
    check.run("real step: DDP engine, Partial FC + ArcFace, uint8 batches", lambda: check_step(device, args.tiny,
                                                                                                steps, num_classes))
    check.run("host syncs per step", lambda: check_host_syncs(device, args.tiny, num_classes))
    check.run("checkpoint save -> load round trip", lambda: check_checkpoint(device, args.tiny, num_classes))
    numbers = {"backbones": [], "partial_fc": []} if args.no_throughput else throughput(device, args.tiny, deadline)
    payload = {"machine": machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "cuda": torch.version.cuda, "tiny": args.tiny, "checks": check.results, "throughput": numbers,
               "wall_s": round(time.time() - t0, 1), "all_checks_ok": all(r["ok"] for r in check.results)}
    name = f"gpu_check_{device.type}" + ("_tiny" if args.tiny else "")
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"{name}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
    else:
        path = write_json(name, payload)
    if device.type == "cuda" and not args.tiny and args.results is None:
        update_section("gpu_check", _markdown(payload))
    print(f"gpu_check: {'all checks passed' if payload['all_checks_ok'] else 'SOME CHECKS FAILED'}; "
          f"{payload['wall_s']:.0f} s; results in {path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if payload["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
