"""DDP vs DeepSpeed ZeRO-1/ZeRO-2 for one registry backbone: step time and memory per rank.

    python benchmarks/engines.py [--device cpu|cuda] [--world-size 2] [--backbone iresnet18] [--steps 10]

Each engine runs in fresh processes (``--world-size`` ranks, gloo on CPU, NCCL on CUDA), so peak memory belongs to
that engine alone. One step is what the loop does with the engine: forward, a fixed cosine classifier (outside the
engine, so only the backbone's cost differs), backward, grad norm, clip, SGD step. Reported per rank (the largest
over ranks):

- ``step_s``: median step time after 2 warm-up steps;
- ``optimizer_state_mb``: SGD momentum the rank holds; ``fp32_master_mb``: fp32 weights the optimizer steps that
  are not the module's own (ZeRO keeps a partition of them beside the module's weights);
- ``peak_rss_mb`` and, above the same baseline for every engine (torch and deepspeed imported, no model yet),
  ``rss_growth_mb``; on CUDA ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``).

Writes benchmarks/results/engines_<device>.json and the ``engines_<device>`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, update_section, write_json  # noqa: E402

from facescale.parallel.dist import free_loopback_port  # noqa: E402  (torch only: DeepSpeed is not imported)

ENGINES = {"ddp": ["train.engine=ddp"],
           "zero1": ["train.engine=deepspeed", "train.deepspeed.zero_stage=1"],
           "zero2": ["train.engine=deepspeed", "train.deepspeed.zero_stage=2"]}
WARMUP, CLASSES, EMBEDDING = 2, 1000, 512


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _tensor_mb(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)) / 2**20


def _worker(rank: int, world_size: int, port: int, kind: str, args: argparse.Namespace, out: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600))
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # before deepspeed picks one from the machine
    import deepspeed  # noqa: F401  -- imported by every engine's run, so the RSS baseline is the same

    from facescale.config import load_config
    from facescale.models import build_backbone
    from facescale.train.engine import build_engine

    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.embedding_size={EMBEDDING}",
                             f"train.batch_size={args.batch_size}", f"train.bf16={args.bf16}", *ENGINES[kind]])
    baseline_rss = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    engine = build_engine(cfg, build_backbone(args.backbone, EMBEDDING).to(device), device)
    head = F.normalize(torch.randn(CLASSES, EMBEDDING, device=device), dim=1)  # fixed: not the engine's cost
    images = torch.randn(args.batch_size, 3, 112, 112, device=device)
    labels = torch.randint(0, CLASSES, (args.batch_size,), device=device)
    times = []
    for _ in range(WARMUP + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with engine.micro_batch(last=True):
            loss = F.cross_entropy(30.0 * F.normalize(engine.forward(images)) @ head.T, labels)
            engine.backward(loss)
        engine.grad_norm()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    module_params = {id(p) for p in engine.backbone.parameters()}
    stepped = [p for g in engine.optimizer.param_groups for p in g["params"]]
    result = {
        "rank": rank, "step_s": statistics.median(times[WARMUP:]),
        "optimizer_state_mb": _tensor_mb(v for s in engine.optimizer.state.values() for v in s.values()),
        "fp32_master_mb": _tensor_mb(p for p in stepped if id(p) not in module_params),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_rss,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    Path(out, f"{kind}_{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/test_partial_fc.py: no interpreter finalization after a gloo group


def run_engine(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.world_size, free_loopback_port(), kind, args, out), nprocs=args.world_size,
                 join=True)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"{kind}_*.json"))]
    worst = {k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank" and ranks[0][k] is not None}
    row: dict[str, Any] = {"engine": kind, **{k: round(v, 4 if k == "step_s" else 1) for k, v in worst.items()}}
    row["samples_per_s"] = round(args.batch_size * args.world_size / worst["step_s"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None, help="per rank; default 8 on cpu, 128 on cuda")
    parser.add_argument("--bf16", action="store_true", help="train.bf16 (DDP autocast, DeepSpeed bf16)")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (128 if args.device == "cuda" else 8)
    os.environ.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    from facescale.models import build_backbone

    num_params = sum(p.numel() for p in build_backbone(args.backbone, EMBEDDING).parameters())
    rows = [run_engine(kind, args) for kind in ENGINES]
    ddp = rows[0]
    for r in rows:
        r["step_vs_ddp"] = round(r["step_s"] / ddp["step_s"], 3)
    name = f"engines_{args.device}"
    payload = {"machine": machine(), "device": args.device, "world_size": args.world_size,
               "backbone": args.backbone, "params_m": round(num_params / 1e6, 2), "batch_size": args.batch_size,
               "bf16": args.bf16, "steps": args.steps, "results": rows}
    if args.device == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(0)
    write_json(name, payload)
    m = payload["machine"]
    where = payload.get("gpu", f"{m['cores']} CPU cores")
    cuda_col = args.device == "cuda"
    headers = ["engine", "s / step", "samples / s", "× DDP", "SGD state MB / rank", "fp32 master MB / rank",
               "peak RSS MB", "RSS growth MB"] + (["CUDA peak MB"] if cuda_col else [])
    body = [[r["engine"], r["step_s"], r["samples_per_s"], r["step_vs_ddp"], r["optimizer_state_mb"],
             r["fp32_master_mb"], r["peak_rss_mb"], r["rss_growth_mb"]] + ([r["cuda_peak_mb"]] if cuda_col else [])
            for r in rows]
    md = (f"## Engines: DDP vs DeepSpeed ZeRO ({args.device}, {args.world_size} ranks)\n\n"
          f"`python benchmarks/engines.py --device {args.device} --world-size {args.world_size} "
          f"--backbone {args.backbone} --steps {args.steps}` — {where}, torch {m['torch']}, {m['date']}. "
          f"`{args.backbone}` ({payload['params_m']} M parameters), batch {args.batch_size} per rank, "
          f"{'bf16' if args.bf16 else 'fp32'}; median over {args.steps} steps after {WARMUP} warm-up, the worst "
          "rank. SGD state = momentum held by the rank; fp32 master = weights the optimizer steps beside the "
          f"module's own; RSS growth over a baseline with torch and deepspeed imported. 1-min load average at the "
          f"end {os.getloadavg()[0]:.1f}.\n\n" + table(headers, body)
          + f"\n\nWith fp32 SGD, ZeRO-1/2 hold 1/W of the momentum plus 1/W of the weights again as an fp32 master "
          f"(DDP: the whole momentum, no master), so at W = {args.world_size} optimizer memory per rank is "
          f"{rows[1]['optimizer_state_mb'] + rows[1]['fp32_master_mb']:.0f} MB vs DDP's "
          f"{ddp['optimizer_state_mb']:.0f} MB; the saving grows with W, and with bf16, where the module's own "
          "weights shrink to 2 bytes. At this size activations dominate peak memory.")
    update_section(name, md)
    print(md)


if __name__ == "__main__":
    main()
