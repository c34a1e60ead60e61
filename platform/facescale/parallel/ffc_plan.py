"""Memory and communication planner for the F²C dynamic class pool (``facescale plan --classifier ffc``).

Per rank, with P = pool slots, D = embedding size, B = per-rank probe batch, G = K x n gallery images per rank,
W = world size (fp32; see ``facescale.heads.ffc``):

    pool            2 * P * D * 4 (the dual queue) + 3 * P * 8 (slot owners, sorted, for the device lookup)
    gallery net     4 * params of the backbone (fp32, no gradient, no optimizer state); only with --backbone
    gathered        W * G * (D * 4 + 8): the step's all-gathered gallery features and labels
    loss forward    4 * B * P * 4 + P * D * 4: the tensors autograd saves over both views (measured with
                    saved_tensors_hooks: two [B, P] matrices per view, and the second view's [P, D] prototypes)
    loss backward   + 2 * B * P * 4 (a view's logit and cosine gradients)
    host            the LRU (identity -> slot, per-slot rows): about 100 B per slot in Python objects

None of it grows with the number of identities: that only bounds the pool (P <= identities) and, with a fraction,
sets it. The probe backbone (``--backbone``) counts as for Partial FC
(``facescale.parallel.plan_backbone.backbone_terms``); the gallery's no-grad forward runs before the probe's and
holds less, so it does not add to the peak.
Communication per step: the all-gather of the gallery features and labels; the loss has no collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from facescale.heads.ffc import check_pool_size, resolve_pool_size
from facescale.parallel.plan_backbone import RankFields, backbone_param_count, backbone_terms, format_rank_tail
from facescale.parallel.plan_backbone import format_size as _size

_LOSS_FORWARD_LOGIT_COPIES = 4  # [B, P] fp32 matrices saved over the two views (measured)
_LOSS_BACKWARD_LOGIT_COPIES = 2
_HOST_LRU_BYTES_PER_SLOT = 100


@dataclass
class FFCPlanReport(RankFields):
    """Per-rank memory (bytes) and per-step communication (bytes sent per rank) of one FFC setup."""

    identities: int | None
    pool_size: int
    world_size: int
    batch_size: int
    ids_per_batch: int
    images_per_id: int
    embedding_size: int
    pool_bytes: int
    lookup_bytes: int
    gallery_params_bytes: int
    gathered_bytes: int
    loss_forward_bytes: int
    loss_backward_bytes: int
    persistent_bytes: int
    peak_bytes: int
    host_lru_bytes: int
    comm_bytes: dict[str, int] = field(default_factory=dict)
    classifier: str = "ffc"

    @property
    def comm_total_bytes(self) -> int:
        return sum(self.comm_bytes.values())


def estimate_ffc(pool_size: int | float, world_size: int, batch_size: int, identities: int | None = None,
                 ids_per_batch: int = 64, images_per_id: int = 2, embedding_size: int = 512,
                 backbone: str | None = None, optimizer: str = "sgd", precision: str = "fp32", engine: str = "ddp",
                 zero_stage: int = 0) -> FFCPlanReport:
    """Predicts the FFC classifier's memory per rank and communication per step (see the module docstring).

    Args:
        pool_size: Pool slots, or a fraction in (0, 1) of ``identities``.
        world_size: Ranks (each holds the whole pool).
        batch_size: Per-rank probe batch.
        identities: Identities of the training set; needed for a fractional pool, and checked against the pool.
        ids_per_batch: Gallery identities per rank and step (``classifier.ffc.ids_per_batch``).
        images_per_id: Gallery images per identity (``classifier.ffc.images_per_id``).
        embedding_size: D.
        backbone: A registered backbone: adds the probe backbone's terms and the gallery network's parameters.
        optimizer: The probe backbone's optimizer (``sgd`` or ``adamw``).
        precision: Probe backbone precision, ``fp32`` or ``bf16``.
        engine: ``ddp`` or ``deepspeed``.
        zero_stage: DeepSpeed ZeRO stage 0-2 (3 partitions the probe, which the gallery EMA needs whole).

    Raises:
        ValueError: A fractional pool without identities, a pool larger than the identities or smaller than one
            global gallery batch's identities (both numbers named), ZeRO-3, or a bad size.
    """
    if world_size < 1 or batch_size < 1 or ids_per_batch < 1 or images_per_id < 1:
        raise ValueError(f"need world_size, batch_size, ids_per_batch, images_per_id >= 1; got {world_size}, "
                         f"{batch_size}, {ids_per_batch}, {images_per_id}")
    if isinstance(pool_size, float) and identities is None:
        raise ValueError(f"a fractional pool size ({pool_size}) needs --identities")
    if engine == "deepspeed" and zero_stage == 3:
        raise ValueError("classifier ffc needs the probe backbone whole on every rank for the gallery EMA; "
                         "ZeRO-3 partitions it: use --zero-stage 1 or 2, or --engine ddp")
    pool = resolve_pool_size(pool_size, identities or 0) if isinstance(pool_size, float) else int(pool_size)
    if pool < 1:
        raise ValueError(f"pool size must be >= 1, got {pool}")
    check_pool_size(pool, identities if identities is not None else pool, ids_per_batch * world_size,
                    key="--pool-size", batch_key="--ids-per-batch x --world-size")
    d, b, w, g = embedding_size, batch_size, world_size, ids_per_batch * images_per_id
    pool_bytes, lookup = 2 * pool * d * 4, 3 * pool * 8
    params = backbone_param_count(backbone) if backbone else 0
    gallery = 4 * params
    gathered = w * g * (d * 4 + 8)
    fwd = _LOSS_FORWARD_LOGIT_COPIES * b * pool * 4 + pool * d * 4
    bwd = fwd + _LOSS_BACKWARD_LOGIT_COPIES * b * pool * 4
    persistent = pool_bytes + lookup + gallery
    peak = persistent + max(gathered, fwd, bwd)
    terms = backbone_terms(backbone, b, w, optimizer, precision, engine, zero_stage) if backbone else {}
    comm = {"all_gather gallery features": (w - 1) * g * d * 4, "all_gather gallery labels": (w - 1) * g * 8}
    return FFCPlanReport(
        identities=identities, pool_size=pool, world_size=w, batch_size=b, ids_per_batch=ids_per_batch,
        images_per_id=images_per_id, embedding_size=d, pool_bytes=pool_bytes, lookup_bytes=lookup,
        gallery_params_bytes=gallery, gathered_bytes=gathered, loss_forward_bytes=fwd, loss_backward_bytes=bwd,
        persistent_bytes=persistent, peak_bytes=peak, host_lru_bytes=_HOST_LRU_BYTES_PER_SLOT * pool,
        comm_bytes=comm, backbone=backbone, precision=precision, engine=engine,
        zero_stage=zero_stage if engine == "deepspeed" else 0, backbone_params=params, backbone_terms=terms,
        backbone_bytes=sum(terms.values()), rank_peak_bytes=peak + sum(terms.values()))


def format_ffc_plan(report: FFCPlanReport) -> str:
    """Human-readable FFC plan: per-rank memory by component, peak, and per-step communication."""
    r = report
    who = f"of {r.identities:,}" if r.identities else "of any number"
    lines = [
        f"FFC plan: a pool of {r.pool_size:,} identities ({who}) on {r.world_size} ranks (replicated), probe batch "
        f"{r.batch_size}/rank, gallery {r.ids_per_batch} identities x {r.images_per_id} images/rank, "
        f"embedding {r.embedding_size}",
        "per-rank memory (independent of the number of identities)",
        f"  pool (2 rows per identity)   {_size(r.pool_bytes):>14}",
        f"  pool lookup (int64)          {_size(r.lookup_bytes):>14}",
    ]
    if r.backbone:
        lines.append(f"  gallery network (fp32)       {_size(r.gallery_params_bytes):>14}")
    lines += [
        f"  = persistent                 {_size(r.persistent_bytes):>14}",
        f"  gathered gallery batch       {_size(r.gathered_bytes):>14}",
        f"  loss forward extra           {_size(r.loss_forward_bytes):>14}   (two views over the pool)",
        f"  loss backward extra          {_size(r.loss_backward_bytes):>14}",
        f"  = peak                       {_size(r.peak_bytes):>14}",
        f"  host LRU state (approx.)     {_size(r.host_lru_bytes):>14}",
    ]
    lines += format_rank_tail(r, "probe backbone")
    return "\n".join(lines)
