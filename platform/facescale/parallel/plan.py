"""Memory and communication planner for Partial FC (``facescale plan``).

Predicts, per rank and per step, what ``PartialFC`` + its optimizer allocate, from the same constants the code
uses (chunk sizes, optimizer state layout). The model, with L = local classes, S = sampled classes, N = global
batch, D = embedding size (fp32 unless noted):

    persistent   centers L*D*4 + optimizer state L*state_bytes_per_row
    forward      k_fwd logit matrices N*S*4 (cosines, margin output, scaled logits / softmax; 3 for additive
                 margins, 5.25 for CurricularFace, +1.25 with the inter-class filter) + chunk workspace
    backward     max(k_bwd * N*S*4, N*S*4 + center gradient + chunk workspace); the center gradient is S*D*4
                 (sparse), or L*D*4 + S*D*4 for the dense v2 baseline
    optimizer    center gradient + chunked temporaries (sparse); + a dense gradient copy (torch SGD, v2 baseline)
    peak         persistent + max(forward, backward, optimizer)

With K sub-centers per class (Sub-center ArcFace) the centers, their optimizer state and the center gradient are
K times larger, and forward and backward each hold one more cosine matrix of K * N*S*4 (before the max over K).

Communication per rank and step counts bytes sent by ring algorithms: all-gather (W-1)/W of the gathered
size, all-reduce 2(W-1)/W, reduce-scatter (W-1)/W. The backbone's own DDP all-reduce is not included.
Measured against real runs in ``benchmarks/plan_vs_measured.py``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field

from facescale.parallel.optim import STEP_CHUNK_BYTES, default_state_dtype, state_bytes_per_row
from facescale.parallel.partial_fc import CHUNK_BYTES

# Logit-sized matrices alive at the forward peak, and the backward factor (see the module docstring); measured.
_LOGIT_COPIES = {"additive": (3.0, 2.0), "curricularface": (5.25, 6.0)}
_FILTER_COPIES = 1.25
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}


def parse_count(text: str) -> int:
    """``"10M"`` -> 10_000_000; accepts k/K, M, G/B suffixes, decimals (``"1.5M"``) and plain integers."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgGbB]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a count: {text!r} (use e.g. 100k, 10M, 5000000)")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if value != int(value) or value <= 0:
        raise ValueError(f"not a positive whole count: {text!r}")
    return int(value)


@dataclass
class PlanReport:
    """Per-rank memory (bytes) and per-step communication (bytes sent per rank) of one Partial FC setup."""

    identities: int
    world_size: int
    batch_size: int
    sample_rate: float
    embedding_size: int
    optimizer: str
    state_dtype: str
    dense: bool
    margin: str
    subcenters: int
    num_local: int
    num_sampled: int
    global_batch: int
    centers_bytes: int
    optimizer_state_bytes: int
    center_grad_bytes: int
    logits_bytes: int
    forward_bytes: int
    backward_bytes: int
    optimizer_step_bytes: int
    embeddings_bytes: int
    persistent_bytes: int
    peak_bytes: int
    bytes_per_identity: float
    comm_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def comm_total_bytes(self) -> int:
        return sum(self.comm_bytes.values())


def estimate(identities: int, world_size: int, batch_size: int, sample_rate: float, embedding_size: int = 512,
             optimizer: str = "sgd", state_dtype: str | None = None, second_moment: str = "row", dense: bool = False,
             margin: str = "arcface", inter_class_filter: bool = False, embedding_bytes: int = 4,
             subcenters: int = 1) -> PlanReport:
    """Predicts Partial FC memory per rank and communication per step.

    Args:
        identities: Number of classes.
        world_size: Ranks the classes are sharded over.
        batch_size: Per-rank batch size.
        sample_rate: Partial FC sample rate.
        embedding_size: Embedding dimension.
        optimizer: ``"sgd"`` or ``"adamw"``.
        state_dtype: Optimizer state storage (``None``: the optimizer's default).
        second_moment: AdamW second moment (``"row"`` or ``"full"``).
        dense: The arcface_torch v2 baseline (dense gradient and fp32 state).
        margin: Margin type (CurricularFace keeps more logit-sized buffers).
        inter_class_filter: Whether the PFC v2 filter is on.
        embedding_bytes: Bytes per embedding element on the wire (4 fp32, 2 bf16).
        subcenters: Center rows per class (Sub-center ArcFace's K).

    Returns:
        The report; ``format_plan`` renders it.
    """
    if identities < world_size or world_size < 1 or batch_size < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"need identities >= world_size >= 1, batch_size >= 1, 0 < sample_rate <= 1; got "
                         f"{identities}, {world_size}, {batch_size}, {sample_rate}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if subcenters < 1:
        raise ValueError(f"subcenters must be >= 1, got {subcenters}")
    k = subcenters
    d, w, n = embedding_size, world_size, batch_size * world_size
    num_local = -(-identities // w)
    num_sample = int(sample_rate * num_local)
    # Positives are always kept; with labels spread evenly a rank sees about N / W of them.
    num_sampled = num_local if num_sample >= num_local else min(num_local, max(num_sample, -(-n // w)))
    centers = k * num_local * d * 4
    state = k * num_local * state_bytes_per_row(optimizer, d, state_dtype, second_moment, dense)
    sampled_grad = k * num_sampled * d * 4
    center_grad = sampled_grad + (k * num_local * d * 4 if dense and num_sampled < num_local else 0)
    logits = n * num_sampled * 4
    fwd_copies, bwd_copies = _LOGIT_COPIES["curricularface" if margin == "curricularface" else "additive"]
    if inter_class_filter:
        fwd_copies += _FILTER_COPIES
    chunk_rows = max(1, CHUNK_BYTES // (d * 4))
    workspace = 2 * CHUNK_BYTES + n * min(chunk_rows, k * num_sampled) * 4
    # Sub-centers: the cosines of all K rows per class (and their gradient) before the max over K.
    subcenter_cos = k * logits if k > 1 else 0
    forward = int(fwd_copies * logits) + subcenter_cos + workspace
    backward = max(int(bwd_copies * logits) + subcenter_cos, logits + subcenter_cos + center_grad + workspace)
    step_temps = k * num_local * d * 4 if dense else 3 * STEP_CHUNK_BYTES
    optimizer_step = center_grad + step_temps
    embeddings = 4 * n * d * 4
    persistent = centers + state
    peak = persistent + embeddings + max(forward, backward, optimizer_step)
    ring = (w - 1) / w
    comm = {
        "all_gather batch check (size, label range)": (w - 1) * 4 * 8,
        "all_gather labels": (w - 1) * batch_size * 8,
        "all_gather embeddings": (w - 1) * batch_size * d * embedding_bytes,
        "all_reduce max logit": int(2 * ring * n * 4),
        "all_reduce softmax sum + target logit": int(2 * ring * 2 * n * 4),
        "reduce_scatter embedding gradients": (w - 1) * batch_size * d * 4,
    }
    if margin == "curricularface":
        comm["all_reduce CurricularFace row statistics"] = int(2 * ring * 2 * n * 4)
    return PlanReport(
        identities=identities, world_size=w, batch_size=batch_size, sample_rate=sample_rate, embedding_size=d,
        optimizer=optimizer, state_dtype="fp32" if dense else (state_dtype or default_state_dtype(optimizer)),
        dense=dense, margin=margin, subcenters=k, num_local=num_local, num_sampled=num_sampled, global_batch=n,
        centers_bytes=centers, optimizer_state_bytes=state, center_grad_bytes=center_grad, logits_bytes=logits,
        forward_bytes=forward, backward_bytes=backward, optimizer_step_bytes=optimizer_step,
        embeddings_bytes=embeddings, persistent_bytes=persistent, peak_bytes=peak,
        bytes_per_identity=persistent / num_local, comm_bytes=comm)


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def format_plan(report: PlanReport) -> str:
    """Human-readable plan: per-rank memory by component, peak, and per-step communication."""
    r = report
    kind = "dense v2 baseline (fp32 state)" if r.dense else f"sparse rows, {r.state_dtype} state"
    lines = [
        f"Partial FC plan: {r.identities:,} identities on {r.world_size} ranks, batch {r.batch_size}/rank "
        f"(global {r.global_batch:,}), sample rate {r.sample_rate}, embedding {r.embedding_size}, "
        f"{r.optimizer} ({kind}), margin {r.margin}" + (f", {r.subcenters} sub-centers" if r.subcenters > 1 else ""),
        f"  classes per rank          {r.num_local:>14,}   sampled per step {r.num_sampled:,}",
        "per-rank memory",
        f"  centers (fp32)            {_size(r.centers_bytes):>14}",
        f"  optimizer state           {_size(r.optimizer_state_bytes):>14}",
        f"  = persistent              {_size(r.persistent_bytes):>14}   ({r.bytes_per_identity:,.0f} B/identity)",
        f"  center gradient           {_size(r.center_grad_bytes):>14}",
        f"  logits (one N x S matrix) {_size(r.logits_bytes):>14}",
        f"  forward peak extra        {_size(r.forward_bytes):>14}   (logits, margin, softmax)",
        f"  backward peak extra       {_size(r.backward_bytes):>14}   (logit gradients + center gradient)",
        f"  optimizer step extra      {_size(r.optimizer_step_bytes):>14}",
        f"  = peak                    {_size(r.peak_bytes):>14}",
        "communication per step (bytes sent per rank)",
    ]
    lines += [f"  {name:<40}{_size(size):>12}" for name, size in r.comm_bytes.items()]
    lines.append(f"  {'total':<40}{_size(r.comm_total_bytes):>12}")
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``facescale plan`` options to ``parser``."""
    parser.add_argument("--identities", type=parse_count, required=True, help="number of classes, e.g. 10M")
    parser.add_argument("--world-size", type=int, required=True, help="ranks the classes are sharded over")
    parser.add_argument("--batch-size", type=int, required=True, help="per-rank batch size")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate")
    parser.add_argument("--embedding", type=int, default=512, help="embedding size")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--state-dtype", choices=["fp32", "bf16", "int8"], default=None)
    parser.add_argument("--second-moment", choices=["full", "row"], default="row")
    parser.add_argument("--dense", action="store_true", help="the arcface_torch v2 baseline (dense fp32 state)")
    parser.add_argument("--margin", default="arcface",
                        choices=["arcface", "cosface", "combined", "magface", "curricularface", "adaface"])
    parser.add_argument("--subcenters", type=int, default=1, help="centers per class (Sub-center ArcFace's K)")
    parser.add_argument("--inter-class-filter", action="store_true", help="PFC v2 inter-class filter on")
    parser.add_argument("--memory-gib", type=float, default=None, help="per-rank budget; exit 1 if the peak exceeds")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_plan(args: argparse.Namespace) -> int:
    """Prints the plan for parsed ``facescale plan`` arguments; returns the exit code."""
    report = estimate(args.identities, args.world_size, args.batch_size, args.sample_rate, args.embedding,
                      optimizer=args.optimizer, state_dtype=args.state_dtype, second_moment=args.second_moment,
                      dense=args.dense, margin=args.margin, inter_class_filter=args.inter_class_filter,
                      subcenters=args.subcenters)
    if args.json:
        print(json.dumps({**asdict(report), "comm_total_bytes": report.comm_total_bytes}, indent=1))
    else:
        print(format_plan(report))
    if args.memory_gib is not None and report.peak_bytes > args.memory_gib * (1 << 30):
        print(f"peak {_size(report.peak_bytes)} per rank exceeds the budget of {args.memory_gib} GiB")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m facescale.parallel.plan`` (the same options as ``facescale plan``)."""
    parser = argparse.ArgumentParser(prog="facescale plan", description=__doc__.splitlines()[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
