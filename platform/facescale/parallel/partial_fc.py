"""Partial FC: a model-parallel margin softmax over millions of identities.

An, Zhu, Xiao, Wu, Fu, Zhang, Xu, Zhou, Ma, Deng. "Partial FC: Training 10 Million Identities on a Single
Machine", ICCVW 2021 (arXiv:2010.05222); and An et al. "Killing Two Birds with One Stone: Efficient and Robust
Training of Face Recognition CNNs by Partial FC", CVPR 2022 (arXiv:2203.15565), which adds the inter-class
conflict filter.

Each rank owns a contiguous block of class centers. Per step:

    E = all_gather(local embeddings)              [W*B, D]   every rank scores the whole global batch
    rows = all positives of E's labels in this block + uniform negatives: max(int(sample_rate * num_local),
           positives) rows, seeded from (seed, sampler step, rank)
    weight[rows] brought up to date by the attached optimizer (the steps dense training would have taken)
    cos = normalize(E) @ normalize(weight[rows]).T  [W*B, |rows|]
    logits = margin(cos, labels-in-block)
    loss = softmax cross-entropy over the union of all ranks' columns   (max and sum all-reduces)

Sub-centers (Deng et al., "Sub-center ArcFace", ECCV 2020; ``subcenters=K``): each class has K center rows, laid
out class-major inside the rank's block (row ``c * K + k``); classes are sampled as above and then expanded to their K
rows, the cosine of a class is the max over its K rows (before the margin), and the cleaning step
(``drop_after_epochs``) is decided per rank for its own classes, with the drop of a sample made global by one sum.

Centers are stored in fp32 or, with ``center_dtype="bf16"``, in bf16 (1,024 instead of 2,048 bytes per identity at
D=512): logits and gradients are computed in fp32 chunk by chunk, the center gradient is stored in bf16, and the
sparse optimizer writes updated rows back with stochastic rounding (``facescale.parallel.optim``).

Only the sampled rows receive a gradient, returned as a sparse tensor with exactly those rows, so the optimizer
(``facescale.parallel.optim``) touches nothing else. Gradient convention: the embedding gradient this module
returns is ``world_size * d(loss)/d(local_embeddings)``, which is exactly right once DDP averages the backbone's
gradients over the ``world_size`` ranks. Batches must have the same size on every rank; a mismatch raises
``ValueError`` on every rank (rather than hanging in a collective).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facescale.heads.margin import IGNORE_LABEL
from facescale.heads.subcenter import SubCenters
from facescale.parallel.dist import all_gather_rows, all_reduce_, class_range, rank_and_world_size
from facescale.parallel.partial_fc_ops import CHUNK_BYTES as CHUNK_BYTES  # re-exported: the planner sizes chunks
from facescale.parallel.partial_fc_ops import AllGatherEmbeddings, DistSoftmaxCrossEntropy, ShardCosine
from facescale.parallel.row_state import KeptStorage

MarginCallable = Callable[..., torch.Tensor]
# Class centers are initialised in blocks of this many classes, each from its own seed, so the initial matrix is
# the same for every world size.
INIT_BLOCK = 4096


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (seed, step, rank); stable across processes and versions."""
    h = 0x243F6A8885A308D3
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def init_centers(num_classes: int, class_start: int, num_local: int, embedding_size: int, seed: int,
                 std: float = 0.01, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std) centers for classes ``[class_start, class_start + num_local)``, independent of the world size.

    Drawn in fp32 block by block and stored as ``dtype`` (bf16: rounded to nearest), so no fp32 copy of the whole
    matrix is ever held."""
    weight = torch.empty((num_local, embedding_size), device=device, dtype=dtype)
    class_end = class_start + num_local
    for block in range(class_start // INIT_BLOCK, -(-class_end // INIT_BLOCK)):
        block_start = block * INIT_BLOCK
        block_rows = min(INIT_BLOCK, num_classes - block_start)
        generator = torch.Generator().manual_seed(mix_seed(seed, block, 0x1517))
        values = torch.normal(0.0, std, (block_rows, embedding_size), generator=generator)
        lo, hi = max(class_start, block_start), min(class_end, block_start + block_rows)
        weight[lo - class_start:hi - class_start] = values[lo - block_start:hi - block_start]
    return weight


CENTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_center_dtype(center_dtype: str, sparse_grad: bool = True,
                       device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype of ``center_dtype``; raises ``ValueError`` for a combination that cannot work.

    bf16 centers are refused with the dense v2 baseline (``sparse_grad=False``: torch's dense optimizers round each
    update to nearest, which loses any update below half a bf16 step) and on a CUDA device without native bf16
    (before Ampere) -- an error, not a silent fp32 fallback, so a planned memory budget is never exceeded unseen.
    """
    if center_dtype not in CENTER_DTYPES:
        raise ValueError(f"center_dtype must be one of {sorted(CENTER_DTYPES)}, got {center_dtype!r}")
    if center_dtype == "bf16":
        if not sparse_grad:
            raise ValueError("center_dtype='bf16' needs the sparse row optimizers; the dense v2 baseline "
                             "(dense_state / sparse_grad=False) keeps fp32 centers")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError(f"center_dtype='bf16': device {dev} ({torch.cuda.get_device_name(dev)}) has no native "
                             "bf16 support; use center_dtype='fp32'")
    return CENTER_DTYPES[center_dtype]




def filter_inter_class(cos_logits: torch.Tensor, local_target: torch.Tensor, threshold: float) -> torch.Tensor:
    """PFC v2 inter-class conflict filter: negatives with cosine above ``threshold`` are set to 0 (no gradient).

    A negative that close to a sample is more likely the same person under another label than a hard negative;
    zeroing it (as arcface_torch's ``interclass_filtering_threshold`` does) stops it pushing the sample away.
    """
    with torch.no_grad():
        conflict = cos_logits > threshold
        rows = torch.nonzero(local_target != IGNORE_LABEL, as_tuple=False).squeeze(1)
        conflict[rows, local_target[rows]] = False
    return cos_logits.masked_fill(conflict, 0.0)


class PartialFC(nn.Module):
    """Sharded class centers + sampled negatives + distributed margin softmax; ``forward(emb, labels) -> loss``.

    Args:
        margin_loss: Callable ``(cos_logits [N, C], labels [N], **extras) -> scaled logits``; labels are columns in
            this rank's block or ``-1``. Extras are passed when the margin declares them: ``needs_norms``
            (``norms=`` un-normalised norms of the gathered global batch -- so AdaFace's norm statistics are global
            and identical on every rank; with a ``regularizer(norms)`` added to the loss, MagFace) and
            ``needs_global_sum`` (``global_sum=`` a sum over ranks, CurricularFace).
        embedding_size: Embedding dimension ``D``.
        num_classes: Number of identities over all ranks.
        sample_rate: Fraction of this rank's centers used per step (positives always kept).
        process_group: Group the classes are sharded over; ``None`` is the default group, or a single process
            when ``torch.distributed`` is not initialised.
        seed: Seeds the center initialisation and the negative sampling (with step and rank).
        inter_class_filter: PFC v2 conflict threshold (the paper uses 0.4); ``None`` disables it.
        sparse_grad: Gradient of ``weight`` as a sparse tensor with only the sampled rows; ``False`` gives the
            dense arcface_torch v2 behaviour (for the dense baseline optimizer).
        device: Where the centers live; move later with ``.to()`` like any module.
        subcenters: Center rows per class (Sub-center ArcFace); 1 is plain Partial FC.
        drop_after_epochs: Sub-center cleaning from this epoch on (see :meth:`set_epoch`); ``None`` never.
        drop_angle_deg: Cleaning drops samples farther than this from their class's dominant sub-center.
        center_dtype: Storage of the centers: ``"fp32"`` or ``"bf16"`` (half the bytes; logits and updates are
            still computed in fp32, and the sparse optimizer writes rows back with stochastic rounding). bf16
            needs the sparse optimizers (not the dense v2 baseline) and a device with bf16 support.
    """

    def __init__(self, margin_loss: MarginCallable, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 process_group: dist.ProcessGroup | None = None, seed: int = 0,
                 inter_class_filter: float | None = None, sparse_grad: bool = True,
                 device: torch.device | str | None = None, subcenters: int = 1, drop_after_epochs: int | None = None,
                 drop_angle_deg: float = 75.0, center_dtype: str = "fp32") -> None:
        super().__init__()
        dtype = check_center_dtype(center_dtype, sparse_grad, device)
        self.rank, self.world_size = rank_and_world_size(process_group)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if num_classes < self.world_size:
            raise ValueError(f"num_classes={num_classes} is smaller than the world size {self.world_size}")
        if embedding_size <= 0:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if subcenters < 1:
            raise ValueError(f"subcenters must be >= 1, got {subcenters}")
        if drop_after_epochs is not None and subcenters == 1:
            raise ValueError("dropping non-dominant sub-centers needs subcenters > 1")
        self.margin_loss = margin_loss
        self.process_group = process_group
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        self.inter_class_filter, self.sparse_grad = inter_class_filter, sparse_grad
        self.class_start, class_end = class_range(num_classes, self.rank, self.world_size)
        self.num_local = class_end - self.class_start
        self.num_sample = int(self.sample_rate * self.num_local)
        k = self.num_subcenters = int(subcenters)
        # Rows are class-major over all classes (global row c * K + k), so the initial matrix is world-size independent.
        self.weight = nn.Parameter(init_centers(num_classes * k, self.class_start * k, self.num_local * k,
                                                embedding_size, seed, device=device, dtype=dtype))
        self.subcenters = (SubCenters(self.num_local, k, drop_after_epochs, drop_angle_deg).to(device)
                           if k > 1 else None)
        self._dropped = torch.zeros((), dtype=torch.float64)
        # Counts training forwards; seeds the sampler, saved with the module so a resumed run samples the same.
        self.sampler_step = 0
        # Local rows used by the last forward (``None`` = all); for inspection and tests.
        self.last_sampled_rows: torch.Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        # Storage kept between training steps (see KeptStorage): the [N, S] cosines (which become the logits, the
        # softmax and the logit gradient in place) and the sampled rows' gradient.
        self.logits_buffer, self.grad_buffer = KeptStorage(), KeptStorage()

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, rank={self.rank}/"
                f"{self.world_size}, class_start={self.class_start}, num_local={self.num_local}, "
                f"sample_rate={self.sample_rate}, inter_class_filter={self.inter_class_filter}, "
                f"subcenters={self.num_subcenters}, center_dtype={self.weight.dtype}")

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop at each epoch start: switches sub-center cleaning on at its epoch (per rank, for its
        own classes; no collective)."""
        if self.subcenters is not None:
            self.subcenters.set_epoch(epoch)

    def stats(self) -> dict[str, float]:
        """Sub-center cleaning counters: samples of the global batch dropped since the last call (the same on every
        rank) and whether only dominant sub-centers count. Empty without sub-centers. No collective."""
        if self.subcenters is None:
            return {}
        dropped, self._dropped = float(self._dropped), torch.zeros_like(self._dropped)
        return {"classifier/dropped_samples": dropped, "classifier/dominant_only": float(self.subcenters.cleaning)}

    def expand_rows(self, class_rows: torch.Tensor | None) -> torch.Tensor | None:
        """Local center rows of local classes ``class_rows`` (sorted in, sorted out): each class's K rows."""
        k = self.num_subcenters
        if class_rows is None or k == 1:
            return class_rows
        return (class_rows.unsqueeze(1) * k + torch.arange(k, device=class_rows.device)).reshape(-1)

    def get_extra_state(self) -> dict[str, int]:
        return {"sampler_step": self.sampler_step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.sampler_step = int(state["sampler_step"])

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer of ``weight``: saved with the centers by ``facescale.checkpoint``; a lazy optimizer
        (``SparseRowSGD``) brings sampled rows up to date before they are scored. bf16 centers need an optimizer
        that rounds stochastically (the sparse row optimizers); it is keyed with this module's seed and global rows.
        """
        if optimizer is not None and self.weight.dtype == torch.bfloat16:
            set_key = getattr(optimizer, "set_rounding_key", None)
            if set_key is None:
                raise ValueError(f"bf16 centers need a sparse row optimizer (SparseRowSGD / SparseRowAdamW), which "
                                 f"rounds updates stochastically; {type(optimizer).__name__} would round every "
                                 "update to nearest and lose the small ones (use center_dtype='fp32')")
            set_key(self.weight, self.seed, self.class_start * self.num_subcenters)
        self._optimizer = optimizer

    @property
    def attached_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer given to :meth:`attach_optimizer` (saved with the centers by ``facescale.checkpoint``)."""
        return self._optimizer

    def sample_rows(self, positive_rows: torch.Tensor, step: int) -> torch.Tensor | None:
        """Sorted local classes to score: every positive plus uniform negatives; ``None`` means all classes.

        The count is ``max(int(sample_rate * num_local), number of positives)``.
        """
        if self.num_sample >= self.num_local:
            return None
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed(mix_seed(self.seed, step, self.rank))
        scores = torch.rand(self.num_local, generator=generator, device=self.weight.device)
        scores[positive_rows] = 2.0  # above any uniform draw: positives always win a place
        count = max(self.num_sample, positive_rows.numel())
        return torch.topk(scores, count, sorted=False).indices.sort().values

    def _check_batch(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> None:
        """Same batch size on every rank and every label in range -- checked collectively, so all ranks raise."""
        problem = ""
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            problem = f"embeddings must be [batch, {self.embedding_size}], got {tuple(local_embeddings.shape)}"
        elif local_labels.numel() != local_embeddings.shape[0]:
            problem = f"{local_labels.numel()} labels for {local_embeddings.shape[0]} embeddings"
        batch = local_embeddings.shape[0] if local_embeddings.dim() else 0
        info = torch.tensor([batch, 0, 0, bool(problem)], dtype=torch.int64,
                            device=local_labels.device)
        if local_labels.numel() and not problem:
            info[1], info[2] = local_labels.min(), local_labels.max()
        # NOTE: all-gather of [batch size, min label, max label, bad shape] per rank -- the collectives below need
        # equal batch sizes, and bad input must stop every rank, not leave the others waiting in a collective.
        info = all_gather_rows(info.unsqueeze(0), self.process_group).cpu()
        if problem:
            raise ValueError(problem)
        if info[:, 3].any():
            raise ValueError(f"rank {int(info[:, 3].nonzero()[0])} passed badly shaped embeddings or labels")
        sizes = info[:, 0].tolist()
        if len(set(sizes)) > 1:
            raise ValueError(f"Partial FC needs the same batch size on every rank; got per-rank sizes {sizes}")
        for rank, (size, low, high, _) in enumerate(info.tolist()):
            if size and (low < 0 or high >= self.num_classes):
                label = low if low < 0 else high
                raise ValueError(f"label {label} (on rank {rank}) is outside [0, num_classes={self.num_classes})")

    def _global_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        # NOTE: all-reduce (sum) for a margin's row statistics (CurricularFace: target cos(theta + m) and target
        # cosine per row) -- each row's target lives on one rank; the sum gives every rank every row.
        return all_reduce_(tensor.clone(), dist.ReduceOp.SUM, self.process_group)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Mean margin softmax loss of the global batch (identical on every rank).

        Args:
            local_embeddings: This rank's embeddings ``[B, D]`` (un-normalised; any float dtype). Not modified.
            local_labels: This rank's integer class ids ``[B]`` in ``[0, num_classes)``. Not modified.

        Returns:
            Scalar loss; see the module docstring for the gradient convention under DDP.
        """
        local_labels = local_labels.reshape(-1).long()
        self._check_batch(local_embeddings, local_labels)
        # NOTE: all-gather of labels -- every rank needs every row's class to find its positives.
        labels = all_gather_rows(local_labels, self.process_group)
        embeddings = local_embeddings
        if self.world_size > 1:
            embeddings = AllGatherEmbeddings.apply(local_embeddings, self.process_group)
        compute_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        embeddings = embeddings.to(compute_dtype)

        in_block = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local_target = torch.where(in_block, labels - self.class_start, IGNORE_LABEL)
        positive_rows = torch.unique(local_target[in_block])
        classes = self.sample_rows(positive_rows, self.sampler_step)
        if classes is not None:
            local_target = torch.where(in_block, torch.searchsorted(classes, local_target.clamp_min(0)), IGNORE_LABEL)
        # Sampling picks classes; a class's K sub-center rows come together.
        rows = self.expand_rows(classes)
        self.last_sampled_rows = rows
        prepare = getattr(self._optimizer, "prepare_rows_lazily", None)
        sampled = fill = None
        if prepare is not None and rows is not None and self.training and torch.is_grad_enabled():
            # The sampled rows, gathered once and given the steps dense training would have given them -- chunk by
            # chunk as the cosine reaches them (``fill``); the optimizer's step updates this working set and writes
            # each row once (see row_optimizer.py).
            sampled, fill = prepare(self.weight, rows)

        buffers = (self.logits_buffer, self.grad_buffer) if self.training and torch.is_grad_enabled() else None
        cos = ShardCosine.apply(F.normalize(embeddings), self.weight, rows, self.sparse_grad, sampled, buffers, fill)
        keep = None
        sub = self.subcenters
        if sub is not None:
            cos, winner = sub.pool(cos, classes)
            if self.training and not sub.cleaning:
                sub.hits.add_(sub.count_hits(winner, local_target, classes))
            if self.training and sub.cleaning:
                # NOTE: all-reduce (sum) of per-row drop flags -- a row's class lives on one rank, which decides;
                # the sum gives every rank the same rows to drop from the (distributed) mean.
                flags = self._global_sum(sub.drop_flags(cos, local_target))
                keep = flags == 0
                self._dropped = self._dropped.to(flags.device) + flags.sum().double()
        if self.inter_class_filter is not None:
            cos = filter_inter_class(cos, local_target, self.inter_class_filter)
        extras: dict[str, Any] = {}
        norms = None
        if getattr(self.margin_loss, "needs_norms", False):
            norms = extras["norms"] = embeddings.norm(dim=1)
        if getattr(self.margin_loss, "needs_global_sum", False):
            extras["global_sum"] = self._global_sum
        if getattr(self.margin_loss, "supports_inplace", False):
            extras["inplace"] = True  # one [N, S] buffer: cosines -> logits -> softmax -> logit gradient
        logits = self.margin_loss(cos, local_target, **extras)
        del cos
        loss, _ = DistSoftmaxCrossEntropy.apply(logits, local_target, self.process_group, keep)
        regularizer = getattr(self.margin_loss, "regularizer", None)
        if norms is not None and regularizer is not None:
            # Every rank computes the full-batch regulariser; its gradient is summed over W ranks by the all-gather's
            # backward, so take 1/W of it in the graph and keep the reported value exact.
            reg = regularizer(norms).mean()
            loss = loss + reg / self.world_size + (reg - reg / self.world_size).detach()
        if self.training:
            self.sampler_step += 1
        return loss
