"""Single-rank classifier: normalised linear layer + margin + softmax cross-entropy.

Every rank holds all class centers; under DDP they are replicated and averaged like the backbone. Fine for
thousands of identities; Partial FC (``facescale.parallel``) replaces it for millions behind the same
``forward(embeddings, labels) -> loss`` contract.

Under DDP each rank sees only its share of the batch, so what must agree across ranks goes through two collectives
the builder passes in (``heads`` imports no process-group code): ``gather_rows`` (an all-gather of equally sized
rows) for the label check, so a bad label on one rank stops every rank instead of leaving the others in the next
collective; and ``global_sum`` (an all-reduce sum) for AdaFace's norm statistics, the sub-center hit counts and
the dropped-sample count, so those buffers stay identical on every rank (DDP's buffer broadcast from rank 0 then
changes nothing). Without them (one process) both are the identity.

Sub-centers (``subcenters=K``, Deng et al., ECCV 2020; see ``facescale.heads.subcenter``): ``weight`` is
``[C * K, D]``, class-major, and the class cosine is the max over the class's K rows, before the margin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facescale.heads.subcenter import SubCenters

Collective = Callable[[torch.Tensor], torch.Tensor]


class NormalizedLinearClassifier(nn.Module):
    """Cosine classifier over all classes with a margin callable.

    Args:
        margin_loss: Callable ``(cos_logits [B, C], labels [B], **extras) -> scaled logits [B, C]``; ``norms=`` is
            passed to margins with ``needs_norms`` (plus ``regularizer(norms).mean()`` added to the loss when they
            have one), ``batch_sum=`` to margins with ``needs_batch_sum``.
        embedding_size: Embedding dimension.
        num_classes: Number of identities.
        subcenters: Sub-centers per class (1: plain centers).
        drop_after_epochs: Sub-center cleaning from this epoch on (see :meth:`set_epoch`); ``None``: never.
        drop_angle_deg: Cleaning drops samples farther than this from their class's dominant sub-center.
        gather_rows: All-gather of ``[n, ...]`` rows over the DDP group (``None``: one process).
        global_sum: All-reduce sum over the DDP group (``None``: one process).
    """

    def __init__(self, margin_loss: Callable[..., torch.Tensor], embedding_size: int, num_classes: int,
                 subcenters: int = 1, drop_after_epochs: int | None = None, drop_angle_deg: float = 75.0,
                 gather_rows: Collective | None = None, global_sum: Collective | None = None) -> None:
        super().__init__()
        if subcenters < 1:
            raise ValueError(f"subcenters must be >= 1, got {subcenters}")
        if drop_after_epochs is not None and subcenters == 1:
            raise ValueError("dropping non-dominant sub-centers needs subcenters > 1")
        self.margin_loss = margin_loss
        self.num_classes = num_classes
        self.num_subcenters = int(subcenters)
        self._gather_rows, self._global_sum = gather_rows, global_sum
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes * subcenters, embedding_size)))
        self.subcenters = (SubCenters(num_classes, subcenters, drop_after_epochs, drop_angle_deg)
                           if subcenters > 1 else None)
        self._dropped = torch.zeros((), dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop at each epoch start: switches sub-center cleaning on at its epoch."""
        if self.subcenters is not None:
            self.subcenters.set_epoch(epoch)

    def stats(self) -> dict[str, float]:
        """Sub-center cleaning counters: samples dropped (whole batch, all ranks) since the last call, and whether
        only dominant sub-centers count. Empty without sub-centers. No collective: safe to call on one rank."""
        if self.subcenters is None:
            return {}
        dropped, self._dropped = float(self._dropped), torch.zeros_like(self._dropped)
        return {"classifier/dropped_samples": dropped, "classifier/dominant_only": float(self.subcenters.cleaning)}

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self._global_sum is None else self._global_sum(tensor)

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Every label in range on every rank -- checked collectively, so every rank raises the same error."""
        info = torch.zeros((1, 3), dtype=torch.int64, device=labels.device)
        info[0, 0] = labels.numel()
        if labels.numel():
            info[0, 1], info[0, 2] = labels.min(), labels.max()
        if self._gather_rows is not None:
            info = self._gather_rows(info)
        for rank, (count, low, high) in enumerate(info.cpu().tolist()):
            if count and (low < 0 or high >= self.num_classes):
                label = low if low < 0 else high
                raise ValueError(f"label {label} is outside [0, num_classes={self.num_classes}) (on rank {rank})")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin cross-entropy of ``embeddings [B, D]`` against integer ``labels [B]``."""
        self._check_labels(labels)
        cos_logits = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1.0, 1.0)
        sub = self.subcenters
        if sub is not None:
            cos_logits, winner = sub.pool(cos_logits)
            if self.training and not sub.cleaning:
                sub.hits.add_(self._sum(sub.count_hits(winner, labels)))
        extras: dict[str, Any] = {}
        norms = None
        if getattr(self.margin_loss, "needs_norms", False):
            norms = extras["norms"] = embeddings.float().norm(dim=1)
        if getattr(self.margin_loss, "needs_batch_sum", False) and self._global_sum is not None:
            extras["batch_sum"] = self._global_sum
        logits = self.margin_loss(cos_logits, labels, **extras)
        if sub is not None and sub.cleaning and self.training:
            flags = sub.drop_flags(cos_logits, labels)
            per_row = F.cross_entropy(logits.float(), labels, reduction="none")
            keep = 1.0 - flags
            loss = (per_row * keep).sum() / keep.sum().clamp_min(1.0)
            self._dropped = self._dropped.to(flags.device) + self._sum(flags.sum().reshape(1)).double()[0]
        else:
            loss = F.cross_entropy(logits.float(), labels)
        regularizer = getattr(self.margin_loss, "regularizer", None)
        if norms is not None and regularizer is not None:
            loss = loss + regularizer(norms).mean()
        return loss
