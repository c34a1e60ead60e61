"""Forward+backward throughput of every registered backbone at batch 32 on this machine's CPU.

    python benchmarks/backbones.py [--batch-size 32] [--iters 3] [--only iresnet50 mobilefacenet]

Writes benchmarks/results/backbones.json and the `backbones` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, update_section, write_json  # noqa: E402

from facescale.models import build_backbone, list_backbones  # noqa: E402


def measure(name: str, batch_size: int, iters: int) -> dict:
    torch.manual_seed(0)
    model = build_backbone(name, 512).train()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch_size, 3, 112, 112)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    step()  # warm-up: allocator and kernel selection
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    elapsed = time.perf_counter() - t0
    return {"backbone": name, "params_m": round(params / 1e6, 2), "batch_size": batch_size, "iters": iters,
            "step_s": round(elapsed / iters, 3), "images_per_s": round(batch_size * iters / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="backbones to measure (default: all registered)")
    args = parser.parse_args()
    names = args.only or list_backbones()
    results = []
    for name in names:
        r = measure(name, args.batch_size, args.iters)
        print(f"{name:20s} {r['params_m']:8.2f} M  {r['images_per_s']:8.1f} img/s  ({r['step_s']} s/step)", flush=True)
        results.append(r)
    info = machine()
    write_json("backbones", {"machine": info, "results": results})
    rows = [[r["backbone"], r["params_m"], r["step_s"], r["images_per_s"]] for r in results]
    update_section("backbones", f"## Backbone forward+backward throughput (batch {args.batch_size}, CPU)\n\n"
                   f"`python benchmarks/backbones.py` — {info['cores']} cores, torch {info['torch']}, "
                   f"{info['threads']} threads, {info['date']}, 1-min load average at the end "
                   f"{os.getloadavg()[0]:.1f} (about the benchmark's own threads on an idle machine). SGD step "
                   f"included; "
                   f"fp32.\n\n"
                   + table(["backbone", "params (M)", "s / step", "images / s"], rows))


if __name__ == "__main__":
    main()
