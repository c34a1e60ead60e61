"""The framework's training step against a bare PyTorch loop with the same backbone and batch.

Three ways to train the same backbone on batches of the same size:

- ``bare``: a plain PyTorch loop: backbone → linear layer → cross-entropy → backward → SGD step, on one batch held
  in memory (no loader, no Partial FC, no logging). The ceiling.
- ``step``: FaceScale's step code (``facescale.train.step``: uint8 batch to the device and normalised there,
  backbone engine, Partial FC with its margin and sparse optimizer, the fused non-finite check, step-time
  breakdown) on the same in-memory batch. The bare loop normalises its uint8 batch on the device too.
- ``full`` (``--full``; needs Ray, DALI and MLflow): a whole ``facescale train`` run on one Ray Train worker, with
  the DALI loader reading synthetic shards, Partial FC, logging to MLflow and a checkpoint at the end. Its
  throughput is the median of the run's logging windows (``train/samples_per_s``), so start-up is excluded.

Goal (issue 7): ``full`` ≥ 90 % of ``bare``. Writes ``benchmarks/results/train_step[_<device>].json`` and a section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine, table, update_section, write_json  # noqa: E402

from facescale.config import FaceScaleConfig, load_config  # noqa: E402
from facescale.data.transforms import normalize_images  # noqa: E402
from facescale.models import build_backbone  # noqa: E402
from facescale.train.components import (  # noqa: E402
    build_bare_backbone,
    build_classifier,
    build_classifier_optimizer,
)
from facescale.train.engine import build_engine  # noqa: E402
from facescale.train.observe import StepTimer  # noqa: E402
from facescale.train.step import to_device, train_step  # noqa: E402

NUM_CLASSES = 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A host batch as the loaders deliver it: uint8 images (pinned when CUDA is available) and int64 labels."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, 112, 112), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    if torch.cuda.is_available():
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


def _timed(step: Any, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per step after ``warmup`` steps."""
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_bare(cfg: FaceScaleConfig, device: torch.device, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size).to(device).train()
    head = torch.nn.Linear(cfg.model.embedding_size, NUM_CLASSES).to(device)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.01, momentum=0.9, weight_decay=5e-4)
    host_images, host_labels = _batch(cfg.train.batch_size)

    def step() -> None:
        # The same input work as the framework's step: uint8 to the device, normalised there.
        images = normalize_images(host_images, device)
        labels = host_labels.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
            embeddings = backbone(images)
        F.cross_entropy(head(embeddings.float()), labels).backward()
        opt.step()

    return _timed(step, steps, warmup, device)


def run_step(cfg: FaceScaleConfig, device: torch.device, steps: int, warmup: int) -> tuple[float, dict[str, float]]:
    torch.manual_seed(0)
    engine = build_engine(cfg, build_bare_backbone(cfg, device), device)
    engine.backbone.train()
    classifier = build_classifier(cfg, NUM_CLASSES, device)
    classifier_opt = build_classifier_optimizer(cfg, classifier)
    timer = StepTimer(device, sync=cfg.train.step_breakdown_sync)
    images, labels = _batch(cfg.train.batch_size)

    def step() -> None:
        batch = to_device(images, labels, None, device, engine.input_dtype)  # as the loop does
        train_step(engine, classifier, classifier_opt, [batch], cfg, timer, device)
        timer.step_done()

    seconds = _timed(step, steps, warmup, device)
    timer.flush()
    return seconds, timer.breakdown()


def run_full(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A real run: 1 Ray Train worker, DALI loader, Partial FC, MLflow logging (CPU here)."""
    from facescale.data.synth import synthesize
    from facescale.train.launch import run_training

    data = work / "data"
    synthesize(data, identities=200, images_per_identity=16, seed=0, difficulty=0.3, held_out_identities=10,
               num_pairs=20, samples_per_shard=400, progress=False)
    cfg = load_config(None, [*_overrides(args), f"data.root={data}", "data.val_bins=[]", "data.num_workers=1",
                             f"train.max_steps={args.warmup + args.steps}", f"train.log_every={args.log_every}",
                             "scaling.num_workers=1", f"scaling.cpus_per_worker={os.cpu_count()}",
                             f"scaling.storage_path={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'm.db'}",
                             f"tracking.artifact_root={work / 'artifacts'}", "tracking.log_model=false"])
    result = run_training(cfg)
    summary = json.loads(result.metrics["summary"])
    import mlflow

    history = mlflow.tracking.MlflowClient(result.tracking_uri).get_metric_history(result.run_id,
                                                                                   "train/samples_per_s")
    windows = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > args.warmup]
    return {"samples_per_s": statistics.median(windows), "breakdown": summary["breakdown"],
            "loader": cfg.data.loader}


def _spread(batch_size: int, seconds: list[float]) -> str:
    rates = sorted(batch_size / s for s in seconds)
    return f"{rates[0]:.1f}-{rates[-1]:.1f}"


def _overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.backbone={args.backbone}", f"model.embedding_size={args.embedding_size}",
            f"train.batch_size={args.batch_size}", f"train.bf16={str(args.device == 'cuda').lower()}",
            "classifier.type=partial_fc", "classifier.sample_rate=1.0", "classifier.margin.type=arcface",
            f"scaling.use_gpu={str(args.device == 'cuda').lower()}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backbone", default="iresnet_tiny")
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of bare and step (median)")
    parser.add_argument("--full", action="store_true", help="also a whole run through Ray (needs Ray, DALI, MLflow)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(None, _overrides(args))
    # Interleaved repeats, median of each: on a shared machine the load drifts between measurements.
    bare_runs, step_runs = [], []
    for _ in range(args.repeats):
        bare_runs.append(run_bare(cfg, device, args.steps, args.warmup))
        step_runs.append(run_step(cfg, device, args.steps, args.warmup))
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            full = {"mode": "full", **run_full(args, Path(tmp))}
        bare_runs.append(run_bare(cfg, device, args.steps, args.warmup))  # the load right after the full run
    step_s, breakdown = sorted(step_runs)[len(step_runs) // 2]
    rows = [{"mode": "bare", "samples_per_s": args.batch_size / statistics.median(bare_runs),
             "spread": _spread(args.batch_size, bare_runs)},
            {"mode": "step", "samples_per_s": args.batch_size / step_s, "breakdown": breakdown,
             "spread": _spread(args.batch_size, [s for s, _ in step_runs])}]
    if args.full:
        rows.append(full)
    bare = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_bare"] = round(row["samples_per_s"] / bare, 3)
        row["samples_per_s"] = round(row["samples_per_s"], 1)
    best = rows[-1]
    payload = {"machine": machine(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "backbone": args.backbone, "embedding_size": args.embedding_size, "batch_size": args.batch_size,
               "steps": args.steps, "results": rows, "goal": "full (or step, without --full) >= 0.9 x bare",
               "goal_met": best["vs_bare"] >= 0.9}
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_json(f"train_step{suffix}", payload)
    m = payload["machine"]
    shares = lambda b: "  ".join(f"{k} {100 * v:.0f}%" for k, v in b.items()) if b else "-"  # noqa: E731
    md = (f"## Framework step vs bare PyTorch loop ({payload['device']}, `{args.backbone}`, batch {args.batch_size})"
          f"\n\n`python benchmarks/train_step.py --device {args.device}{' --full' if args.full else ''}` — "
          f"{m['cores']} cores, torch {m['torch']}, {m['date']}; median over {args.steps} steps after "
          f"{args.warmup} warm-up steps; Partial FC over {NUM_CLASSES} classes (sample rate 1.0) in the framework, a "
          "linear layer in the bare loop; "
          + f"bare and step: median of {args.repeats} interleaved repeats (range in brackets)"
          + (", bare once more after the full run. " if args.full else ". ")
          + "full: median of the run's logging windows after the warm-up steps.\n\n"
          + table(["mode", "samples / s", "× bare", "time per phase"],
                  [[r["mode"], f"{r['samples_per_s']}" + (f" ({r['spread']})" if "spread" in r else ""),
                    r["vs_bare"], shares(r.get("breakdown"))] for r in rows])
          + f"\n\nGoal: {payload['goal']} — {'met' if payload['goal_met'] else 'NOT met'}.")
    update_section(f"train_step{suffix}", md)
    print(md)


if __name__ == "__main__":
    main()
