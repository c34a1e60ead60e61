"""F²C / FFC: a dynamic class pool of gallery features instead of a weight per identity.

Wang et al., "An Efficient Training Approach for Very Large Scale Face Recognition", CVPR 2022 (arXiv:2105.10375);
the authors' code is github.com/tiandunx/FFC (``ffc_ddp.py``, ``lru_python_impl.py``), cited below as "the
reference".

Two networks: the probe network (the backbone being trained) and a gallery network, an EMA of the probe without
gradient (sec. 3.1; the reference's ``_momentum_update_gallery``). The gallery embeds identity-based batches
(K identities x n images, ``facescale.data.identity_batches``) and its L2-normalised features are enqueued into
the dynamic class pool: ``pool_size`` identity slots, each with two prototype rows (the reference's dual queue
``queue[2, queue_size, D]``), identities evicted least-recently-used (sec. 3.3). A probe embedding whose identity
holds a slot gets the configured margin softmax over the pool's prototypes, its slot as the target; one whose
identity is not in the pool gets a hard-negative penalty, the mean of its top-k cosines to the pool clipped at 0
(the reference's ``add_margin``, ``outlier_label`` branch). The classifier has no trainable parameter, so its
memory is the pool (``2 * pool_size * D`` floats), the LRU state and the gallery network, whatever the number of
identities.

The pool is replicated, not sharded: every rank all-gathers the gallery features and labels of the step and
applies the same deterministic LRU update, so every rank holds the same pool. Why: its memory is already
independent of the identities (1 % of 10 M identities is 100 k slots, 400 MB at D = 512), so sharding buys little;
the loss then needs no collective at all (a sharded pool would need Partial FC's distributed softmax); and the
checkpoint is one replicated state dict that rank 0 saves and any world size loads.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facescale.heads.margin import IGNORE_LABEL, CombinedMarginLoss

Collective = Callable[[torch.Tensor], torch.Tensor]

_STATE_VERSION = 1


def resolve_pool_size(pool_size: int | float, num_classes: int) -> int:
    """The pool's number of identity slots: ``pool_size`` itself, or that fraction of ``num_classes`` (at least 1).

    Raises:
        ValueError: A fraction outside (0, 1) or a count below 1.
    """
    if isinstance(pool_size, float):
        if not 0.0 < pool_size < 1.0:
            raise ValueError(f"classifier.ffc.pool_size: a fraction must lie in (0, 1), got {pool_size}")
        return max(1, math.ceil(pool_size * num_classes))
    if pool_size < 1:
        raise ValueError(f"classifier.ffc.pool_size must be >= 1, got {pool_size}")
    return int(pool_size)


def check_pool_size(pool_size: int, num_classes: int, global_ids_per_batch: int,
                    key: str = "classifier.ffc.pool_size",
                    batch_key: str = "classifier.ffc.ids_per_batch x world size") -> None:
    """Refuses a pool larger than the identities, or smaller than one global gallery batch's identities.

    Args:
        pool_size: Identity slots (resolved, :func:`resolve_pool_size`).
        num_classes: Identities of the training set.
        global_ids_per_batch: ``classifier.ffc.ids_per_batch`` x world size: identities one step enqueues.
        key: How the error names the pool size; ``batch_key``: how it names the global batch's identities.

    Raises:
        ValueError: Naming both numbers.
    """
    if pool_size > num_classes:
        raise ValueError(f"{key} {pool_size} is larger than the number of identities "
                         f"{num_classes}: use at most {num_classes} (or a fraction below 1)")
    if pool_size < global_ids_per_batch:
        raise ValueError(f"{key} {pool_size} is smaller than the identities of one global gallery batch, "
                         f"{global_ids_per_batch} ({batch_key}): a step would evict identities it just enqueued")


def default_top_k(pool_size: int) -> int:
    """The reference's number of hard negatives: 0.02 % of the pool, between 3 and 10 (``self.hard_neg``)."""
    return min(max(int(pool_size * 0.0002), 3), 10)


class FFCClassifier(nn.Module):
    """The dynamic class pool and its loss (see the module docstring). Not DDP-wrapped: no trainable parameter.

    Args:
        margin: A :class:`~facescale.heads.margin.CombinedMarginLoss` (ArcFace, CosFace, combined) applied to the
            in-pool probes' cosine logits over the pool. Margins with state (MagFace, AdaFace, CurricularFace) are
            refused: their statistics would need the linear/Partial FC classifiers' norms and cross-rank sums.
        gallery: The gallery network, the same architecture as the probe backbone (its weights are set by
            :meth:`init_gallery`); its parameters never take gradient.
        embedding_size: Feature dimension D.
        num_classes: Identities of the training set (labels lie in ``[0, num_classes)``).
        pool_size: Identity slots, resolved (:func:`resolve_pool_size`); at most ``num_classes``.
        momentum: EMA momentum of the gallery network (the paper's 0.99).
        top_k: Hard negatives per out-of-pool probe; ``None``: :func:`default_top_k`.
        gather_rows: All-gather of equally sized ``[n, ...]`` rows over the default group (``None``: one process);
            ``heads`` imports no process-group code, the builder passes it.
    """

    def __init__(self, margin: nn.Module, gallery: nn.Module, embedding_size: int, num_classes: int,
                 pool_size: int, momentum: float = 0.99, top_k: int | None = None,
                 gather_rows: Collective | None = None) -> None:
        super().__init__()
        if not isinstance(margin, CombinedMarginLoss):
            raise ValueError(f"classifier.type ffc supports the arcface, cosface and combined margins, not "
                             f"{type(margin).__name__}: its statistics (embedding norms, cross-rank sums) are not "
                             "defined over a class pool")
        if not 1 <= pool_size <= num_classes:
            raise ValueError(f"pool_size {pool_size} must lie in [1, num_classes={num_classes}]")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"classifier.ffc.momentum must lie in [0, 1), got {momentum}")
        self.margin = margin
        self.gallery = gallery
        self.embedding_size, self.num_classes, self.pool_size = embedding_size, num_classes, pool_size
        self.momentum = float(momentum)
        self.top_k = min(top_k or default_top_k(pool_size), pool_size)
        self._gather_rows = gather_rows
        for p in self.gallery.parameters():
            p.requires_grad_(False)
        # The gallery always embeds with batch statistics (train mode, as the reference's gallery_net), but its
        # running statistics are frozen (momentum 0): each rank sees another identity batch, so updated running
        # statistics would differ between ranks, and the replicated checkpoint must be the same everywhere.
        for module in self.gallery.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0
        # The dual queue: two prototype rows per slot, L2-normalised gallery features; slots fill from 0 upwards.
        self.register_buffer("queue", torch.zeros(2, pool_size, embedding_size))
        # Each slot's identity (-1: free) on the device, and sorted, for the probes' label -> slot lookup without a
        # host read; rebuilt from the LRU state on load.
        self.register_buffer("_slot_label", torch.full((pool_size,), -1, dtype=torch.int64), persistent=False)
        self.register_buffer("_sorted_labels", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("_sorted_slots", torch.empty(0, dtype=torch.int64), persistent=False)
        # Host LRU state (saved through get_extra_state): identity -> slot, least recently used first; per slot the
        # row the next feature goes to, and whether row 1 holds a feature of the slot's current identity.
        self._lru: OrderedDict[int, int] = OrderedDict()
        self._next_row = np.zeros(pool_size, dtype=np.int8)
        self._row1_valid = np.zeros(pool_size, dtype=bool)
        self._evictions = 0
        self._stats_evictions = 0
        self._probe_counts = torch.zeros(2)  # (in-pool probes, probes) since the last stats() call

    def extra_repr(self) -> str:
        return (f"pool_size={self.pool_size}, num_classes={self.num_classes}, momentum={self.momentum}, "
                f"top_k={self.top_k}")

    @property
    def num_filled(self) -> int:
        """Slots holding an identity."""
        return len(self._lru)

    def pool_labels(self) -> dict[int, int]:
        """``{identity: slot}`` of the pool, least recently used first."""
        return dict(self._lru)

    # -- the gallery network ---------------------------------------------------------------------------------

    def init_gallery(self, backbone: nn.Module) -> None:
        """Copies the probe backbone's weights and buffers into the gallery (the start of a run, not a resume)."""
        self.gallery.load_state_dict(backbone.state_dict())

    @torch.no_grad()
    def ema_update(self, backbone: nn.Module) -> None:
        """``gallery <- m * gallery + (1 - m) * probe`` over the parameters, after an applied optimizer step.

        Parameters only, as the reference's ``_momentum_update_gallery`` (the gallery's frozen BN running statistics
        are not used by its train-mode forward).
        """
        gallery, probe = list(self.gallery.named_parameters()), list(backbone.named_parameters())
        if [n for n, _ in gallery] != [n for n, _ in probe]:
            raise ValueError("FFC: the probe backbone's parameters do not match the gallery network's "
                             f"({len(probe)} vs {len(gallery)} tensors): not the same architecture")
        g_params = [g for _, g in gallery]
        p_params = [p.detach().to(g.dtype) for (_, g), (_, p) in zip(gallery, probe, strict=True)]
        torch._foreach_mul_(g_params, self.momentum)
        torch._foreach_add_(g_params, p_params, alpha=1.0 - self.momentum)

    # -- the pool --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_pool(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Embeds an identity batch with the gallery network and enqueues the whole step's features.

        Every rank must call it with the same number of images. The pool is updated before the probe loss of the
        same step, as the reference does (``forward_impl``: the queue is written, then the cosines are taken), so a
        probe whose identity is in this step's gallery batch is in the pool.

        Args:
            images: ``[G, 3, H, W]`` normalised images on the device (any float dtype; cast to the gallery's).
            labels: ``[G]`` int64 identities.
        """
        was_training = self.gallery.training
        self.gallery.train()
        dtype = next(self.gallery.parameters()).dtype
        features = F.normalize(self.gallery(images.to(dtype)).float(), dim=1)
        self.gallery.train(was_training)
        labels = labels.to(features.device, torch.int64)
        if self._gather_rows is not None:
            # NOTE: all-gather of every rank's gallery features and labels, in rank order: every rank then applies
            # the same enqueue to the same rows, so the replicated pools stay identical without a broadcast.
            features, labels = self._gather_rows(features), self._gather_rows(labels)
        rows, slots, sources, owners = self._assign(labels.tolist())  # the step's one host read of the pool
        device = self.queue.device
        index = torch.tensor([rows, slots, sources], dtype=torch.int64).to(device, non_blocking=True)
        self.queue[index[0], index[1]] = features[index[2]].to(self.queue.dtype)
        if owners:  # the slots that changed identity
            changed = torch.tensor([list(owners), list(owners.values())], dtype=torch.int64).to(device)
            self._slot_label[changed[0]] = changed[1]
        self._sort_lookup()

    def _assign(self, labels: list[int]) -> tuple[list[int], list[int], list[int], dict[int, int]]:
        """The LRU update for a step's gathered labels, in order; returns each (row, slot) written, the feature
        row that lands there (the last one written, so duplicates resolve the same on every device), and
        ``{slot: identity}`` of the slots that took a new identity.

        As the reference (``forward_impl``): an identity new to the pool takes a free slot, or the least recently
        used identity's slot, and its feature goes to row 0; a feature of an identity already in the pool goes to
        the slot's next row, alternating 0, 1, 0, ... so the two rows hold its two latest features.
        """
        bad = [label for label in labels if not 0 <= label < self.num_classes]
        if bad:  # checked before any change: the same labels on every rank, so every rank raises the same error
            raise ValueError(f"gallery label {bad[0]} is outside [0, num_classes={self.num_classes})")
        written: dict[tuple[int, int], int] = {}
        owners: dict[int, int] = {}
        for i, label in enumerate(labels):
            slot = self._lru.get(label)
            if slot is not None:
                self._lru.move_to_end(label)
                row = int(self._next_row[slot])
                self._next_row[slot] = 1 - row
                if row == 1:
                    self._row1_valid[slot] = True
            else:
                if len(self._lru) < self.pool_size:
                    slot = len(self._lru)
                else:
                    _, slot = self._lru.popitem(last=False)
                    self._evictions += 1
                self._lru[label] = slot
                owners[slot] = label
                row, self._next_row[slot], self._row1_valid[slot] = 0, 1, False
            written[(row, slot)] = i
        rows, slots = zip(*written) if written else ((), ())
        return list(rows), list(slots), list(written.values()), owners

    def _sort_lookup(self) -> None:
        # Free slots (-1) sort first and never match a label; on the device, a sort of P int64 per step.
        self._sorted_labels, self._sorted_slots = torch.sort(self._slot_label)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label's slot, ``IGNORE_LABEL`` where the identity is not in the pool (on the device, no host read)."""
        sorted_labels = self._sorted_labels
        pos = torch.searchsorted(sorted_labels, labels).clamp_max(sorted_labels.numel() - 1)
        hit = sorted_labels[pos] == labels
        return torch.where(hit, self._sorted_slots[pos], torch.full_like(labels, IGNORE_LABEL))

    # -- the loss --------------------------------------------------------------------------------------------

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled slots' two prototype views ``[F, D]``: row 0, and row 1 where it holds a feature of the
        slot's identity (row 0 elsewhere; the reference masks row 1 the same way for slots not just written).

        For inspection and tests: it copies the pool (``[F, D]``); :meth:`forward` takes the same views' cosines
        without building them (:meth:`_view_cosines`)."""
        filled = self.num_filled
        valid = torch.from_numpy(self._row1_valid[:filled]).to(self.queue.device, non_blocking=True)
        first = self.queue[0, :filled]
        return first, torch.where(valid[:, None], self.queue[1, :filled], first)

    def _view_cosines(self, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The probes' cosines ``[B, F]`` to the two views of :meth:`prototypes`, clamped to [-1, 1]; ``None`` for
        the second view where it is the first (no slot's row 1 valid).

        The second view's column of a slot whose row 1 is not valid is the first view's column, so the selection is
        made on the ``[B, F]`` cosines of the two rows (views of the queue, no copy) rather than on the ``[F, D]``
        rows: B x F values instead of F x D (128 x 100 k instead of 100 k x 512 at the paper's sizes), and the same
        numbers, as a cosine depends only on its probe and its row.
        """
        filled = self.num_filled
        first = F.linear(probes, self.queue[0, :filled]).clamp(-1.0, 1.0)
        valid = self._row1_valid[:filled]
        if not valid.any():
            return first, None
        second = F.linear(probes, self.queue[1, :filled]).clamp(-1.0, 1.0)
        if valid.all():
            return first, second
        # A copy: the backward of the selection reads the mask, and the host state may change before it runs.
        mask = torch.from_numpy(valid.copy()).to(probes.device, non_blocking=True)
        return first, torch.where(mask[None, :], second, first)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The FFC loss of probe ``embeddings [B, D]`` with integer ``labels [B]``, averaged over the two views.

        Per view (the reference's ``cos_theta1`` / ``cos_theta2``): the mean margin cross-entropy of the in-pool
        probes (target: their slot) plus the mean over the out-of-pool probes of their top-k cosines to the pool,
        clipped at 0. The reference sums the two views; the mean keeps the loss on one margin softmax's scale, so
        ``train.lr`` means the same as with the other classifiers.
        """
        if self.num_filled == 0:
            raise RuntimeError("FFCClassifier: the pool is empty; call update_pool(images, labels) before the loss")
        targets = self._targets(labels.to(embeddings.device, torch.int64))
        in_pool = targets != IGNORE_LABEL
        num_in = in_pool.sum()
        num_out = labels.numel() - num_in
        probes = F.normalize(embeddings.float(), dim=1)
        k = min(self.top_k, self.num_filled)
        loss = probes.sum() * 0.0  # keeps the graph when every term is empty (every rank must run backward)
        first, second = self._view_cosines(probes)
        # Two equal views (second is None): one view's term, with weight 1 (exactly its two halves, 0.5 t + 0.5 t).
        views = (first,) if second is None else (first, second)
        for cos in views:
            logits = self.margin(cos, targets)  # no margin on the IGNORE_LABEL rows, as Partial FC's blocks
            ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_LABEL, reduction="sum")
            hard = cos.topk(k, dim=1).values.clamp_min(0.0).mean(dim=1)
            penalty = torch.where(in_pool, torch.zeros_like(hard), hard).sum()
            loss = loss + (1.0 / len(views)) * (ce / num_in.clamp_min(1) + penalty / num_out.clamp_min(1))
        if self.training:
            self._probe_counts = self._probe_counts.to(num_in.device) + torch.stack(
                [num_in, torch.as_tensor(labels.numel(), device=num_in.device)]).float()
        return loss

    def stats(self) -> dict[str, float]:
        """This rank's in-pool probe fraction since the last call, the pool's fill and its evictions (total and
        since the last call). No collective: safe to call on one rank."""
        counts, self._probe_counts = self._probe_counts.tolist(), torch.zeros(2)
        evicted, self._stats_evictions = self._evictions - self._stats_evictions, self._evictions
        return {"classifier/in_pool_fraction": counts[0] / counts[1] if counts[1] else 0.0,
                "classifier/pool_fill": self.num_filled / self.pool_size,
                "classifier/pool_evictions": float(evicted),
                "classifier/pool_evictions_total": float(self._evictions)}

    # -- checkpoint ------------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """The LRU state, world-size independent: identities and slots least recently used first, per-slot rows."""
        return {"version": _STATE_VERSION, "pool_size": self.pool_size,
                "lru_labels": torch.tensor(list(self._lru.keys()), dtype=torch.int64),
                "lru_slots": torch.tensor(list(self._lru.values()), dtype=torch.int64),
                "next_row": torch.from_numpy(self._next_row.copy()),
                "row1_valid": torch.from_numpy(self._row1_valid.copy()), "evictions": self._evictions}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"FFC pool state version {state.get('version')} != supported {_STATE_VERSION}")
        if int(state["pool_size"]) != self.pool_size:
            raise ValueError(f"the checkpoint's FFC pool has {state['pool_size']} slots, this run's "
                             f"classifier.ffc.pool_size resolves to {self.pool_size}")
        self._lru = OrderedDict(zip(state["lru_labels"].tolist(), state["lru_slots"].tolist(), strict=True))
        self._next_row = state["next_row"].numpy().astype(np.int8).copy()
        self._row1_valid = state["row1_valid"].numpy().astype(bool).copy()
        self._evictions = self._stats_evictions = int(state["evictions"])
        owners = torch.full((self.pool_size,), -1, dtype=torch.int64)
        owners[state["lru_slots"]] = state["lru_labels"]
        self._slot_label = owners.to(self.queue.device)
        self._sort_lookup()
