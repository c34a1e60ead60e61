"""CurricularFace: hard negatives are re-weighted by a curriculum that follows training progress.

Huang, Wang, Tai, Liu, Shen, Li, Li, Huang. "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
Recognition", CVPR 2020 (arXiv:2004.00288).

    target logit   = s * cos(theta_y + m)                  (ArcFace margin, same fallback past pi)
    negative logit = s * cos(theta_j) * (t + cos(theta_j))  if cos(theta_j) > cos(theta_y + m)   (hard)
                   = s * cos(theta_j)                       otherwise
    t <- (1 - momentum) * t + momentum * mean_i cos(theta_{y_i})

``t`` starts at 0 (early on hard negatives are down-weighted) and rises as the target cosines grow. Under Partial
FC every rank sees a different block of classes: the per-row target cosines and the batch mean come from one
all-reduce that the classifier passes in as ``global_sum``, so ``t`` stays identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from facescale.heads.margin import IGNORE_LABEL


class CurricularFaceLoss(nn.Module):
    """CurricularFace margin; call as ``margin(cos_logits, labels, global_sum=fn)`` under Partial FC.

    ``t`` is a buffer (saved with the module) and is updated only in training mode.

    Args:
        s: Scale applied to every logit.
        m: Additive angular margin of the target (radians).
        t_momentum: EMA momentum of ``t``.
    """

    # Tells a classifier to pass ``global_sum=``: a function summing a tensor over every rank of its group.
    needs_global_sum = True

    def __init__(self, s: float = 64.0, m: float = 0.5, t_momentum: float = 0.01) -> None:
        super().__init__()
        if s <= 0 or not 0 <= m < math.pi or not 0 < t_momentum <= 1:
            raise ValueError(f"CurricularFace needs s > 0, 0 <= m < pi, 0 < t_momentum <= 1; got s={s}, m={m}, "
                             f"t_momentum={t_momentum}")
        self.s, self.m, self.t_momentum = float(s), float(m), float(t_momentum)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.fallback_shift = math.sin(math.pi - m) * m
        self.register_buffer("t", torch.zeros(()))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, t_momentum={self.t_momentum}"

    def forward(self, cos_logits: torch.Tensor, labels: torch.Tensor,
                global_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Returns scaled logits with the target margin and curriculum-weighted hard negatives.

        Args:
            cos_logits: Cosine logits ``[B, C]``. Not modified in place.
            labels: Target column per row ``[B]``, ``-1`` where the target is in another rank's block.
            global_sum: Sums a tensor over all blocks of the class dimension; identity when ``None`` (one block).

        Returns:
            Scaled logits ``[B, C]``.
        """
        rows = torch.nonzero(labels != IGNORE_LABEL, as_tuple=False).squeeze(1)
        cols = labels[rows]
        target = cos_logits[rows, cols]
        sin_theta = torch.sqrt((1.0 - target * target).clamp_min(1e-12))
        cos_theta_m = target * self.cos_m - sin_theta * self.sin_m
        final_target = torch.where(target > self.threshold, cos_theta_m, target - self.fallback_shift)
        with torch.no_grad():
            # Row b's target may live in another block; each block fills the rows it owns and a sum completes them.
            row_stats = cos_logits.new_zeros((2, cos_logits.shape[0]))
            row_stats[0, rows] = cos_theta_m
            row_stats[1, rows] = target
            if global_sum is not None:
                row_stats = global_sum(row_stats)
            if self.training:
                self.t.mul_(1.0 - self.t_momentum).add_(self.t_momentum * row_stats[1].mean().to(self.t.dtype))
            hard = cos_logits > row_stats[0].unsqueeze(1)
        t = self.t.to(cos_logits.dtype)
        modulated = torch.where(hard, cos_logits * (t + cos_logits), cos_logits)
        return modulated.index_put((rows, cols), final_target) * self.s
