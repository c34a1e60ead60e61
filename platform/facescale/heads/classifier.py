"""Single-rank classifier: normalised linear layer + margin + softmax cross-entropy.

Every rank holds all class centers; under DDP they are replicated and averaged like the backbone. Fine for
thousands of identities; Partial FC (``facescale.parallel``) replaces it for millions behind the same
``forward(embeddings, labels) -> loss`` contract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class NormalizedLinearClassifier(nn.Module):
    """Cosine classifier over all classes with a margin callable.

    Args:
        margin_loss: Callable ``(cos_logits [B, C], labels [B]) -> scaled logits [B, C]``.
        embedding_size: Embedding dimension.
        num_classes: Number of identities.
    """

    def __init__(self, margin_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], embedding_size: int,
                 num_classes: int) -> None:
        super().__init__()
        self.margin_loss = margin_loss
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin cross-entropy of ``embeddings [B, D]`` against integer ``labels [B]``."""
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            label = int(labels[bad][0])
            raise ValueError(f"label {label} is outside [0, num_classes={self.num_classes})")
        cos_logits = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1.0, 1.0)
        logits = self.margin_loss(cos_logits, labels)
        return F.cross_entropy(logits.float(), labels)
