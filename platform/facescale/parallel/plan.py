"""Memory and communication planner for Partial FC (``facescale plan``).

Predicts, per rank and per step, what ``PartialFC`` + its optimizer allocate, from the same constants the code
uses (chunk sizes, optimizer state layout). The model, with L = local classes, S = sampled classes, N = global
batch, D = embedding size (fp32 unless noted):

    persistent   centers L*D*4 + optimizer state L*state_bytes_per_row
    working set  the sampled rows and their state, S*(D*4 + state_bytes_per_row), gathered by the forward for the
                 step and kept from step to step (sparse optimizers with S < L; see ``row_optimizer``); the
                 storage of the N*S*4 cosines and of the scored rows' gradient (S*D, all L*D rows at rate 1) is
                 kept from step to step too (``resident_bytes``; the peak already counts both)
    forward      k_fwd logit matrices N*S*4 (one buffer from cosines to softmax for ArcFace/CosFace/combined, whose
                 margin works in place; 2 for AdaFace/MagFace; 5.25 for CurricularFace; +1.25 with the
                 inter-class filter) + chunk workspace
    backward     max(k_bwd * N*S*4, N*S*4 + center gradient + chunk workspace); the center gradient is S*D*4
                 (sparse), or L*D*4 + S*D*4 for the dense v2 baseline
    optimizer    center gradient + chunked temporaries (sparse); + a dense gradient copy (torch SGD, v2 baseline)
    kept         the logits' and the scored rows' gradient storage stay between steps, so the forward also holds
                 the gradient's and the optimizer step the logits'
    peak         persistent + working set + max(forward, backward, optimizer)

With K sub-centers per class (Sub-center ArcFace) the centers, their optimizer state and the center gradient are
K times larger, and forward and backward each hold one more cosine matrix of K * N*S*4 (before the max over K).

bf16 centers (``center_dtype="bf16"``) halve the centers and the sampled center gradient; their stochastic rounding
adds chunk-sized integer temporaries to the optimizer step.

The whole rank (``backbone=``): the backbone's parameters P from the measured table
(``facescale.parallel.backbone_memory``), with K bytes of optimizer state per parameter (SGD momentum 4, AdamW 8):

    DDP             4P weights + 4P gradients + 4P DDP buckets + K*P (bf16 autocast's 2P weight copies are in
                    the measured activations' fixed part)
    DeepSpeed ZeRO  Rajbhandari et al., "ZeRO", SC 2020 (eq. in sec. 5): low-precision weights 2P and gradients
                    2P plus fp32 masters and state (4 + K)P, the weights partitioned over W at stage 3, gradients
                    from stage 2, masters and state from stage 1 (fp32: 4P + 4P + K*P, no masters)
    activations     measured saved-tensor bytes per sample (fp32, or under bf16 autocast) x batch + fixed part

and the rank's peak is the classifier's peak plus all of these (activations are alive through the classifier's
forward and backward). ``fit_identities`` inverts the estimate: the most identities whose rank peak fits a budget.

Communication per rank and step counts bytes sent by ring algorithms: all-gather (W-1)/W of the gathered
size, all-reduce 2(W-1)/W, reduce-scatter (W-1)/W. The backbone's own DDP all-reduce is not included.
Measured against real runs in ``benchmarks/plan_vs_measured.py``. The backbone terms live in
``facescale.parallel.plan_backbone`` (shared with the F²C planner, ``facescale.parallel.ffc_plan``), the command-line
options in ``facescale.parallel.plan_args``; both are re-exported here.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from facescale.parallel.ffc_plan import estimate_ffc, format_ffc_plan
from facescale.parallel.optim import STEP_CHUNK_BYTES, default_state_dtype, state_bytes_per_row
from facescale.parallel.partial_fc import CHUNK_BYTES
from facescale.parallel.plan_args import add_plan_arguments as add_plan_arguments
from facescale.parallel.plan_args import parse_count as parse_count
from facescale.parallel.plan_args import parse_pool_size as parse_pool_size
from facescale.parallel.plan_backbone import RankFields, format_rank_tail
from facescale.parallel.plan_backbone import backbone_param_count as backbone_param_count
from facescale.parallel.plan_backbone import backbone_terms as backbone_terms
from facescale.parallel.plan_backbone import format_size as _size

# Logit-sized matrices alive at the forward peak, and the backward factor (see the module docstring); measured.
# "inplace": the margins of CombinedMarginLoss (measured, benchmarks/plan_vs_measured.py); "other": AdaFace and
# MagFace, whose margin writes a second matrix each way (derived: the softmax then works in place on it);
# CurricularFace: measured before the softmax worked in place (its peak is inside the margin; kept as measured).
_LOGIT_COPIES = {"inplace": (1.0, 1.0), "other": (2.0, 2.0), "curricularface": (5.25, 6.0)}
_INPLACE_MARGINS = ("arcface", "cosface", "combined")
_FILTER_COPIES = 1.25
_CENTER_BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class PlanReport(RankFields):
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
    working_set_bytes: int = 0  # the sampled rows + state, kept from step to step
    center_dtype: str = "fp32"
    kept_grad_bytes: int = 0  # the scored rows' gradient storage, kept from step to step

    @property
    def resident_bytes(self) -> int:
        """What the classifier holds between training steps: persistent state + the kept working set, cosines
        (logits) and center gradient (``row_state.KeptStorage``)."""
        return self.persistent_bytes + self.working_set_bytes + self.logits_bytes + self.kept_grad_bytes

    @property
    def comm_total_bytes(self) -> int:
        return sum(self.comm_bytes.values())


def estimate(identities: int, world_size: int, batch_size: int, sample_rate: float, embedding_size: int = 512,
             optimizer: str = "sgd", state_dtype: str | None = None, second_moment: str = "row", dense: bool = False,
             margin: str = "arcface", inter_class_filter: bool = False, embedding_bytes: int = 4,
             subcenters: int = 1, center_dtype: str = "fp32", backbone: str | None = None, precision: str = "fp32",
             engine: str = "ddp", zero_stage: int = 0) -> PlanReport:
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
        center_dtype: Storage of the centers, ``"fp32"`` or ``"bf16"``.
        backbone: A registered backbone name: adds its parameters, gradients, optimizer state and activations
            (``None``: the classifier only).
        precision: Backbone precision, ``"fp32"`` or ``"bf16"`` (autocast under DDP; DeepSpeed bf16/fp16).
        engine: ``"ddp"`` or ``"deepspeed"``.
        zero_stage: DeepSpeed ZeRO stage 0-3 (``engine="deepspeed"`` only).

    Returns:
        The report; ``format_plan`` renders it.
    """
    _check_estimate_args(identities, world_size, batch_size, sample_rate, optimizer, subcenters, center_dtype, dense)
    d, w, n = embedding_size, world_size, batch_size * world_size
    num_local = -(-identities // w)
    num_sample = int(sample_rate * num_local)
    # Positives are always kept; with labels spread evenly a rank sees about N / W of them.
    num_sampled = num_local if num_sample >= num_local else min(num_local, max(num_sample, -(-n // w)))
    mem = _classifier_memory(num_local, num_sampled, n, d, optimizer, state_dtype, second_moment, dense, margin,
                             inter_class_filter, subcenters, _CENTER_BYTES[center_dtype])
    comm = _comm_bytes(w, batch_size, d, embedding_bytes, margin)
    terms = backbone_terms(backbone, batch_size, w, optimizer, precision, engine, zero_stage) if backbone else {}
    backbone_total = sum(terms.values())
    return PlanReport(
        identities=identities, world_size=w, batch_size=batch_size, sample_rate=sample_rate, embedding_size=d,
        optimizer=optimizer, state_dtype="fp32" if dense else (state_dtype or default_state_dtype(optimizer)),
        dense=dense, margin=margin, subcenters=subcenters, num_local=num_local, num_sampled=num_sampled,
        global_batch=n, **mem, bytes_per_identity=mem["persistent_bytes"] / num_local, comm_bytes=comm,
        center_dtype=center_dtype, backbone=backbone, precision=precision, engine=engine,
        zero_stage=zero_stage if engine == "deepspeed" else 0,
        backbone_params=backbone_param_count(backbone) if backbone else 0, backbone_terms=terms,
        backbone_bytes=backbone_total, rank_peak_bytes=mem["peak_bytes"] + backbone_total)


def _check_estimate_args(identities: int, world_size: int, batch_size: int, sample_rate: float, optimizer: str,
                         subcenters: int, center_dtype: str, dense: bool) -> None:
    """Refuses the sizes and option combinations :func:`estimate` cannot plan, naming the values."""
    if identities < world_size or world_size < 1 or batch_size < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"need identities >= world_size >= 1, batch_size >= 1, 0 < sample_rate <= 1; got "
                         f"{identities}, {world_size}, {batch_size}, {sample_rate}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if subcenters < 1:
        raise ValueError(f"subcenters must be >= 1, got {subcenters}")
    if center_dtype not in _CENTER_BYTES:
        raise ValueError(f"center_dtype must be fp32 or bf16, got {center_dtype!r}")
    if center_dtype == "bf16" and dense:
        raise ValueError("bf16 centers need the sparse row optimizers; the dense v2 baseline keeps fp32 centers")


def _classifier_memory(num_local: int, num_sampled: int, n: int, d: int, optimizer: str, state_dtype: str | None,
                       second_moment: str, dense: bool, margin: str, inter_class_filter: bool, k: int,
                       cb: int) -> dict[str, int]:
    """The classifier's per-rank bytes (the module docstring's model), keyed by :class:`PlanReport` field.

    ``n`` is the global batch, ``k`` the sub-centers per class, ``cb`` the bytes per center element.
    """
    centers = k * num_local * d * cb
    state = k * num_local * state_bytes_per_row(optimizer, d, state_dtype, second_moment, dense)
    sampled_grad = k * num_sampled * d * cb
    center_grad = sampled_grad + (k * num_local * d * 4 if dense and num_sampled < num_local else 0)
    logits = n * num_sampled * 4
    kind = margin if margin == "curricularface" else "inplace" if margin in _INPLACE_MARGINS else "other"
    fwd_copies, bwd_copies = _LOGIT_COPIES[kind]
    if inter_class_filter:
        fwd_copies += _FILTER_COPIES
    chunk_rows = max(1, CHUNK_BYTES // (d * 4))  # the CUDA chunk: CPU chunks are 4x smaller (a few MB less)
    workspace = 2 * CHUNK_BYTES + n * min(chunk_rows, k * num_sampled) * 4
    # Sub-centers: the cosines of all K rows per class (and their gradient) before the max over K.
    subcenter_cos = k * logits if k > 1 else 0
    # The kept storage (KeptStorage) is resident in every phase: the scored rows' gradient during the forward, the
    # logit buffer during the optimizer step.
    forward = int(fwd_copies * logits) + subcenter_cos + workspace + sampled_grad
    backward = max(int(bwd_copies * logits) + subcenter_cos, logits + subcenter_cos + center_grad + workspace)
    # bf16: + the rounded chunk and the stochastic rounding's small int64 hash blocks (about one chunk in all).
    step_temps = k * num_local * d * 4 if dense else (3 + (1 if cb == 2 else 0)) * STEP_CHUNK_BYTES
    optimizer_step = center_grad + step_temps + logits
    embeddings = 4 * n * d * 4
    persistent = centers + state
    sampled = not dense and num_sampled < num_local
    working_set = k * num_sampled * (d * cb + state_bytes_per_row(optimizer, d, state_dtype, second_moment)) \
        if sampled else 0
    peak = persistent + working_set + embeddings + max(forward, backward, optimizer_step)
    return dict(centers_bytes=centers, optimizer_state_bytes=state, center_grad_bytes=center_grad,
                logits_bytes=logits, forward_bytes=forward, backward_bytes=backward,
                optimizer_step_bytes=optimizer_step, embeddings_bytes=embeddings, persistent_bytes=persistent,
                working_set_bytes=working_set, kept_grad_bytes=sampled_grad,
                peak_bytes=peak)


def _comm_bytes(w: int, batch_size: int, d: int, embedding_bytes: int, margin: str) -> dict[str, int]:
    """Bytes each rank sends per step, by collective (ring algorithms; see the module docstring)."""
    n = batch_size * w
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
    return comm


def fit_identities(memory_bytes: float, world_size: int, batch_size: int, sample_rate: float,
                   **kwargs: Any) -> tuple[int, PlanReport]:
    """The most identities (a multiple of ``world_size``: one more class per rank is the next candidate) whose
    per-rank peak (backbone included when ``backbone=`` is given) fits ``memory_bytes``; (0, plan of one block)
    when not even ``world_size`` identities fit. ``kwargs`` go to :func:`estimate`."""
    def plan(per_rank: int) -> PlanReport:
        return estimate(per_rank * world_size, world_size, batch_size, sample_rate, **kwargs)

    if plan(1).rank_peak_bytes > memory_bytes:
        return 0, plan(1)
    lo, hi = 1, 2
    while plan(hi).rank_peak_bytes <= memory_bytes:  # the peak grows with the classes per rank
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan(mid).rank_peak_bytes <= memory_bytes else (lo, mid)
    return lo * world_size, plan(lo)


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
        f"  centers ({r.center_dtype})            {_size(r.centers_bytes):>14}",
        f"  optimizer state           {_size(r.optimizer_state_bytes):>14}",
        f"  = persistent              {_size(r.persistent_bytes):>14}   ({r.bytes_per_identity:,.0f} B/identity)",
        f"  sampled-row working set   {_size(r.working_set_bytes):>14}   (kept between steps)",
        f"  center gradient           {_size(r.center_grad_bytes):>14}",
        f"  logits (one N x S matrix) {_size(r.logits_bytes):>14}",
        f"  forward peak extra        {_size(r.forward_bytes):>14}   (logits, margin, softmax)",
        f"  backward peak extra       {_size(r.backward_bytes):>14}   (logit gradients + center gradient)",
        f"  optimizer step extra      {_size(r.optimizer_step_bytes):>14}",
        f"  = peak                    {_size(r.peak_bytes):>14}",
        f"  resident between steps    {_size(r.resident_bytes):>14}   (persistent + working set, logits and the "
        "scored rows' gradient, whose storage is kept)",
    ]
    lines += format_rank_tail(r)
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """Prints the plan for parsed ``facescale plan`` arguments; returns the exit code."""
    if args.engine == "ddp" and args.zero_stage not in (None, 0):
        raise SystemExit("facescale plan: --zero-stage applies only to --engine deepspeed")
    zero_stage = (2 if args.zero_stage is None else args.zero_stage) if args.engine == "deepspeed" else 0
    kwargs = dict(embedding_size=args.embedding, optimizer=args.optimizer, state_dtype=args.state_dtype,
                  second_moment=args.second_moment, dense=args.dense, margin=args.margin,
                  inter_class_filter=args.inter_class_filter, subcenters=args.subcenters,
                  center_dtype=args.center_dtype, backbone=args.backbone, precision=args.precision,
                  engine=args.engine, zero_stage=zero_stage)
    try:
        if args.classifier == "ffc":
            report = _ffc_report(args, zero_stage)
        elif args.pool_size is not None:
            raise ValueError("--pool-size applies only to --classifier ffc")
        elif args.fit:
            if args.memory_gib is None:
                raise ValueError("--fit needs --memory-gib (the per-rank budget to fill)")
            count, report = fit_identities(args.memory_gib * (1 << 30), args.world_size, args.batch_size,
                                           args.sample_rate, **kwargs)
        else:
            if args.identities is None:
                raise ValueError("--identities is required (or use --fit with --memory-gib)")
            report = estimate(args.identities, args.world_size, args.batch_size, args.sample_rate, **kwargs)
    except ValueError as err:
        raise SystemExit(f"facescale plan: {err}") from None
    if args.json:
        payload: dict[str, Any] = {**asdict(report), "comm_total_bytes": report.comm_total_bytes}
        if args.fit:
            payload["fit_identities"] = count
        print(json.dumps(payload, indent=1))
    elif args.classifier == "ffc":
        print(format_ffc_plan(report))
    else:
        print(format_plan(report))
    if args.fit:
        if not args.json:
            print(f"fit: {count:,} identities fit {args.memory_gib} GiB per rank on {args.world_size} ranks "
                  f"(rank peak {_size(report.rank_peak_bytes)}; {count + args.world_size:,} would not)")
        return 0 if count else 1
    if args.memory_gib is not None and report.rank_peak_bytes > args.memory_gib * (1 << 30):
        print(f"peak {_size(report.rank_peak_bytes)} per rank exceeds the budget of {args.memory_gib} GiB")
        return 1
    return 0


def _ffc_report(args: argparse.Namespace, zero_stage: int) -> Any:
    """The ``--classifier ffc`` plan (``facescale.parallel.ffc_plan``); Partial FC's own options are refused."""
    if args.fit:
        raise ValueError("--fit does not apply to --classifier ffc: its memory does not grow with the identities")
    if args.pool_size is None:
        raise ValueError("--classifier ffc needs --pool-size (slots, or a fraction of --identities)")
    pfc_only = {"--sample-rate": args.sample_rate != 1.0, "--dense": args.dense, "--subcenters": args.subcenters != 1,
                "--inter-class-filter": args.inter_class_filter, "--center-dtype": args.center_dtype != "fp32",
                "--state-dtype": args.state_dtype is not None}
    if any(pfc_only.values()):
        raise ValueError(f"{', '.join(k for k, v in pfc_only.items() if v)} apply only to --classifier partial_fc")
    if args.margin not in ("arcface", "cosface", "combined"):
        raise ValueError(f"--classifier ffc supports margins arcface, cosface and combined, not {args.margin}")
    return estimate_ffc(args.pool_size, args.world_size, args.batch_size, identities=args.identities,
                        ids_per_batch=args.ids_per_batch, images_per_id=args.images_per_id,
                        embedding_size=args.embedding, backbone=args.backbone, optimizer=args.optimizer,
                        precision=args.precision, engine=args.engine, zero_stage=zero_stage)


def main(argv: list[str] | None = None) -> int:
    """``python -m facescale.parallel.plan`` (the same options as ``facescale plan``)."""
    parser = argparse.ArgumentParser(prog="facescale plan", description=__doc__.splitlines()[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
