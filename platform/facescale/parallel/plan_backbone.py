"""The planners' shared pieces: the backbone's per-rank bytes and the byte formatter.

Used by ``facescale.parallel.plan`` (Partial FC) and ``facescale.parallel.ffc_plan`` (F²C), which is why they live
here and not in either planner: both import this module, it imports neither. The formulas are in
``facescale.parallel.plan``'s module docstring (DDP; DeepSpeed ZeRO after Rajbhandari et al., SC 2020).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from facescale.parallel.backbone_memory import BACKBONE_MEMORY

# Optimizer state bytes per backbone parameter: SGD momentum, AdamW's two moments (fp32).
_OPTIMIZER_STATE_BYTES = {"sgd": 4, "adamw": 8}


@dataclass(kw_only=True)
class RankFields:
    """The whole-rank fields both planners' reports carry (keyword-only, so each report keeps its own positional
    classifier fields first)."""

    backbone: str | None = None
    precision: str = "fp32"
    engine: str = "ddp"
    zero_stage: int = 0
    backbone_params: int = 0
    backbone_terms: dict[str, int] = field(default_factory=dict)
    backbone_bytes: int = 0
    rank_peak_bytes: int = 0


def backbone_param_count(name: str) -> int:
    """Parameters of a registered backbone, from the measured table."""
    if name not in BACKBONE_MEMORY:
        raise ValueError(f"backbone {name!r} is not in the planner's table (benchmarks/backbone_memory.py measures "
                         f"it); known: {', '.join(sorted(BACKBONE_MEMORY))}")
    return int(BACKBONE_MEMORY[name]["params"])


def backbone_terms(name: str, batch_size: int, world_size: int, optimizer: str = "sgd", precision: str = "fp32",
                   engine: str = "ddp", zero_stage: int = 0) -> dict[str, int]:
    """Per-rank bytes of the backbone: ``{weights, gradients, ..., activations}`` (see ``facescale.parallel.plan``)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if engine not in ("ddp", "deepspeed"):
        raise ValueError(f"engine must be ddp or deepspeed, got {engine!r}")
    if engine == "ddp" and zero_stage:
        raise ValueError("--zero-stage applies only to --engine deepspeed")
    if not 0 <= zero_stage <= 3:
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    p, w = backbone_param_count(name), world_size
    state = _OPTIMIZER_STATE_BYTES[optimizer] * p
    act = BACKBONE_MEMORY[name][precision]
    terms: dict[str, int] = {}
    if engine == "ddp":
        terms["weights (fp32)"] = 4 * p
        terms["gradients (fp32)"] = 4 * p
        terms["DDP gradient buckets"] = 4 * p
        terms["optimizer state"] = state
    elif precision == "fp32":
        terms["weights (fp32)"] = 4 * p // (w if zero_stage >= 3 else 1)
        terms["gradients (fp32)"] = 4 * p // (w if zero_stage >= 2 else 1)
        terms["optimizer state"] = state // (w if zero_stage >= 1 else 1)
    else:
        terms["weights (bf16)"] = 2 * p // (w if zero_stage >= 3 else 1)
        terms["gradients (bf16)"] = 2 * p // (w if zero_stage >= 2 else 1)
        terms["fp32 master weights + optimizer state"] = (4 * p + state) // (w if zero_stage >= 1 else 1)
    # The measured fixed part under bf16 autocast is autocast's bf16 copies of the weights (DDP only: DeepSpeed's
    # weights are bf16 already, counted above).
    fixed = act["fixed"] if engine == "ddp" else BACKBONE_MEMORY[name]["fp32"]["fixed"]
    terms["activations" + (" + autocast weight copies" if engine == "ddp" and precision == "bf16" else "")] = int(
        fixed + act["per_sample"] * batch_size)
    return terms


def format_size(num_bytes: float) -> str:
    """``1536`` -> ``"1.50 KiB"``: the planners' binary units (GiB, MiB, KiB, else whole bytes)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def format_rank_tail(r: Any, backbone_label: str = "backbone") -> list[str]:
    """The lines both plans end with: the backbone's terms and the rank peak (when ``r.backbone``), then the
    communication per step. ``r``: a ``PlanReport`` or ``FFCPlanReport`` (the fields have the same names)."""
    lines: list[str] = []
    if r.backbone:
        how = "DDP" if r.engine == "ddp" else f"DeepSpeed ZeRO-{r.zero_stage}"
        lines.append(f"{backbone_label} {r.backbone} ({r.backbone_params / 1e6:.1f}M parameters, {r.precision}, "
                     f"{how}, batch {r.batch_size})")
        lines += [f"  {name:<38}{format_size(size):>14}" for name, size in r.backbone_terms.items()]
        lines.append(f"  = backbone                            {format_size(r.backbone_bytes):>14}")
        lines.append(f"= rank peak (classifier + backbone)     {format_size(r.rank_peak_bytes):>14}")
    lines.append("communication per step (bytes sent per rank)")
    lines += [f"  {name:<40}{format_size(size):>12}" for name, size in r.comm_bytes.items()]
    lines.append(f"  {'total':<40}{format_size(r.comm_total_bytes):>12}")
    return lines
