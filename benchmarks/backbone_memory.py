"""Per-backbone memory table for the planner: parameters and activation bytes saved for backward, per sample.

    python benchmarks/backbone_memory.py [--only iresnet100 vit_b]

For every registered backbone (train mode, 112x112 input, embedding 512), on CPU: the parameter count, and the
bytes of the tensors autograd saves for backward during one forward pass, counted with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once; parameter storages excluded), at batch 2 and 4.
The per-sample figure is the slope between the two, the fixed part the rest (e.g. autocast's bf16 weight copies).
Measured in fp32 and under bf16 autocast (the DDP engine's ``train.bf16``). Saved tensors are what stays alive from
forward to backward -- the activation memory a training step holds at its peak, give or take one layer's
temporaries.

Writes ``platform/facescale/parallel/backbone_memory.py`` (the table ``facescale plan --backbone`` reads),
benchmarks/results/backbone_memory.json, and the ``plan_backbones`` section of BENCHMARKS.md (the rank plans for
8 x 32 GB and 8 x 80 GB next to published figures).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "platform"))
from _report import ROOT, machine, table, update_section, write_json  # noqa: E402

from facescale.models import build_backbone, list_backbones  # noqa: E402

TABLE_FILE = ROOT / "platform" / "facescale" / "parallel" / "backbone_memory.py"
BATCHES = (2, 4)


def saved_bytes(model: torch.nn.Module, batch: int, bf16: bool) -> int:
    """Bytes of distinct storages autograd saves during one training forward of ``batch`` images."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x.bfloat16() if bf16 else x)
    del out
    return sum(seen.values())


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model = build_backbone(name, 512).train()
    entry = {"params": sum(p.numel() for p in model.parameters())}
    for precision in ("fp32", "bf16"):
        small, large = (saved_bytes(model, b, precision == "bf16") for b in BATCHES)
        per_sample = (large - small) / (BATCHES[1] - BATCHES[0])
        entry[precision] = {"per_sample": int(round(per_sample)), "fixed": int(max(0, small - BATCHES[0] * per_sample))}
    return entry


def write_table(rows: dict[str, dict]) -> None:
    lines = ['"""Measured backbone memory for ``facescale plan --backbone``; written by benchmarks/backbone_memory.py.',
             "",
             "Per registered backbone (train mode, 112x112 input, embedding 512): ``params`` = parameter count;",
             "``fp32`` / ``bf16`` (bf16 = under bf16 autocast) = bytes of the tensors autograd saves for backward in",
             "one forward pass, counted on CPU with torch.autograd.graph.saved_tensors_hooks (each storage once,",
             "parameters excluded) at batch 2 and 4: ``per_sample`` is the slope, ``fixed`` the rest. Do not edit by",
             'hand: rerun the script."""', "", "BACKBONE_MEMORY: dict[str, dict] = {"]
    for name, entry in sorted(rows.items()):
        lines.append(f'    "{name}": {{"params": {entry["params"]},')
        for precision in ("fp32", "bf16"):
            e = entry[precision]
            lines.append(f'        "{precision}": {{"per_sample": {e["per_sample"]}, "fixed": {e["fixed"]}}},')
        lines.append("    },")
    lines.append("}")
    TABLE_FILE.write_text("\n".join(lines) + "\n")


# Published single-machine figures the plan is compared with (identities trained on 8 GPUs).
# Figures as cited in issue 16 (their backbone, batch and accounting are the projects' own, not restated here).
PUBLISHED = [
    ("arcface_torch (insightface) Partial FC", "8 x 32 GB", "", "29M"),
    ("PaddlePaddle PLSC", "8 x 32 GB", "fp16", "92M"),
]


def plan_rows() -> list[list]:
    from facescale.parallel.plan import fit_identities

    rows = []
    for gib in (32, 80):
        for backbone in ("iresnet100", "vit_b"):
            for center_dtype, precision in (("fp32", "fp32"), ("bf16", "bf16")):
                kwargs = dict(world_size=8, batch_size=128, sample_rate=0.1, center_dtype=center_dtype,
                              backbone=backbone, precision=precision, engine="ddp")
                count, report = fit_identities(gib * (1 << 30), **kwargs)
                rows.append([f"8 x {gib} GB", backbone, f"{precision} backbone, {center_dtype} centers, int8 state",
                             f"{count / 1e6:,.1f}M", f"{report.backbone_bytes / (1 << 30):.2f}",
                             f"{report.bytes_per_identity:,.0f}"])
    return rows


def markdown(payload: dict) -> str:
    m = payload["machine"]
    backbone_rows = [[name, f"{e['params'] / 1e6:.1f}", f"{e['fp32']['per_sample'] / (1 << 20):.1f}",
                      f"{e['bf16']['per_sample'] / (1 << 20):.1f}", f"{e['bf16']['fixed'] / (1 << 20):.1f}"]
                     for name, e in sorted(payload["backbones"].items())]
    lines = ["## Whole-rank plan: backbone memory and identities that fit (`benchmarks/backbone_memory.py`)", "",
             f"Backbone table measured on CPU ({m['cores']} cores, torch {m['torch']}, {m['date']}): parameters, "
             "and the bytes autograd saves for backward in one training forward (112x112, embedding 512), counted "
             "with `torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded) at batch 2 "
             "and 4; per sample = the slope; bf16 = under bf16 autocast (fixed = autocast's bf16 weight copies). "
             "Stored in `facescale/parallel/backbone_memory.py`; `facescale plan --backbone NAME` adds parameters, "
             "gradients, DDP buckets or ZeRO partitions, optimizer state and these activations at the batch size.", "",
             table(["backbone", "params M", "fp32 act MiB/sample", "bf16 act MiB/sample", "bf16 fixed MiB"],
                   backbone_rows), "",
             "**Identities that fit** (`facescale plan --fit --world-size 8 --batch-size 128 --sample-rate 0.1 "
             "--backbone NAME --precision P --center-dtype C --memory-gib G`, DDP, SGD, ArcFace, embedding 512; "
             "a plan, not measured on GPUs here):", "",
             table(["machine", "backbone", "setup", "identities that fit", "backbone GiB/rank", "B/identity"],
                   payload["plans"]), "",
             "Published for comparison: " + "; ".join(f"{n}: {mem}{', ' + how if how else ''} -> {ids} identities"
                                             for n, mem, how, ids in PUBLISHED)
             + ". Their backbones, batch sizes and memory accounting are their own. The plan here reserves nothing "
             "for the CUDA context, NCCL buffers or allocator fragmentation (count 1-2 GiB less per GPU in "
             "practice), and its classifier part was checked against measured peaks on CPU only (`plan` section), "
             "so read these rows as an estimate, not a measurement."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="backbones to (re)measure; others kept")
    parser.add_argument("--render", action="store_true", help="rewrite the BENCHMARKS.md section only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from _report import RESULTS

    saved = RESULTS / "backbone_memory.json"
    backbones = __import__("json").loads(saved.read_text())["backbones"] if saved.exists() else {}
    if not args.render:
        for name in args.only or list_backbones():
            backbones[name] = measure(name)
            e = backbones[name]
            print(f"{name:20s} {e['params'] / 1e6:7.1f}M params  fp32 {e['fp32']['per_sample'] / 2**20:7.1f} MiB/sample"
                  f"  bf16 {e['bf16']['per_sample'] / 2**20:7.1f} MiB/sample", flush=True)
        write_table(backbones)
    payload = {"machine": machine(), "backbones": backbones}
    write_json("backbone_memory", payload)
    payload["plans"] = plan_rows()
    write_json("backbone_memory", payload)
    update_section("plan_backbones", markdown(payload))


if __name__ == "__main__":
    main()
