"""Additive/multiplicative angular margins applied to cosine logits.

One formula covers the common margin losses (InsightFace's "combined margin"):

    target logit = s * (cos(m1 * theta + m2) - m3),   other logits = s * cos(theta)

- ArcFace (Deng et al., CVPR 2019, arXiv:1801.07698): (m1, m2, m3) = (1, 0.5, 0)
- CosFace (Wang et al., CVPR 2018, arXiv:1801.09414): (1, 0, 0.4)
- SphereFace-style multiplicative margin (Liu et al., 2017): m1 > 1

Logits are cosines between L2-normalised embeddings and class centers. A label of -1 marks a row whose
positive class is not in this logit block (Partial FC shards classes across ranks), so no margin is applied
to that row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Rows whose positive class lives in another logit block carry this label.
IGNORE_LABEL = -1


class CombinedMarginLoss(nn.Module):
    """Applies the combined angular margin to the target logit and scales by ``s``.

    By default the margin is differentiated exactly (gradient of cos(theta + m2) w.r.t. cos(theta)), and where
    theta + m2 would pass pi -- where cos(theta + m2) stops decreasing in theta -- the target logit falls back to
    the CosFace-like ``cos(theta) - m2 * sin(m2)``, which keeps the target logit monotonic (ArcFace paper, sec. 2.1;
    the threshold cos(pi - m2) is the point where the two branches meet).

    ``straight_through=True`` reproduces InsightFace's arcface_torch behaviour instead: the margin is applied
    without gradient and the gradient passes straight through as if the target logit were cos(theta).

    Args:
        s: Scale applied to every logit.
        m1: Multiplicative angular margin.
        m2: Additive angular margin (radians).
        m3: Additive cosine margin.
        straight_through: Use the straight-through gradient instead of the exact one.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 straight_through: bool = False) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"margin scale s must be positive, got {s}")
        if m1 < 1.0 or m2 < 0.0 or m3 < 0.0:
            raise ValueError(f"margins must satisfy m1 >= 1, m2 >= 0, m3 >= 0; got m1={m1}, m2={m2}, m3={m3}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.straight_through = straight_through
        # Where theta + m2 > pi the additive angular margin is no longer monotonic (ArcFace sec. 2.1).
        self.theta_limit_cos = math.cos(math.pi - self.m2)
        self.fallback_shift = math.sin(math.pi - self.m2) * self.m2

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, straight_through={self.straight_through}"

    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted cosine of the target class (unscaled)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_theta - self.m3
        if self.m1 == 1.0:
            # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m); clamp keeps d sin/d cos finite at |cos| = 1.
            sin_theta = torch.sqrt((1.0 - cos_theta * cos_theta).clamp_min(1e-12))
            cos_theta_m = cos_theta * math.cos(self.m2) - sin_theta * math.sin(self.m2)
            cos_theta_m = torch.where(cos_theta > self.theta_limit_cos, cos_theta_m,
                                      cos_theta - self.fallback_shift)
            return cos_theta_m - self.m3
        theta = torch.acos(cos_theta.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        angle = self.m1 * theta + self.m2
        # Past pi: the monotonic continuation -1 - (angle - pi) * 2/pi, so the loss still pushes theta down.
        target = torch.where(angle <= math.pi, torch.cos(angle), -1.0 - (angle - math.pi) * (2.0 / math.pi))
        return target - self.m3

    # Partial FC may pass ``inplace=True``: it owns the cosine buffer and never reads it after the margin.
    supports_inplace = True

    def forward(self, cos_logits: torch.Tensor, labels: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Returns scaled logits with the margin on each row's target column.

        Args:
            cos_logits: Cosine logits ``[B, C]`` in [-1, 1]. Not modified, unless ``inplace``.
            labels: Target column per row ``[B]``, ``-1`` where the target is not in this block.
            inplace: Write the logits into ``cos_logits`` (and, in backward, the gradient into the incoming one):
                one ``[B, C]`` buffer instead of two each way.

        Returns:
            Scaled logits ``[B, C]`` (``cos_logits`` itself when ``inplace``).
        """
        rows = torch.nonzero(labels != IGNORE_LABEL, as_tuple=False).squeeze(1)
        return _ScaledMargin.apply(cos_logits, rows, labels[rows], self, inplace)

    def _adjusted(self, target: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted target cosines, differentiable as the chosen gradient (exact or straight-through)."""
        if self.straight_through:
            with torch.no_grad():
                delta = self.target_logit(target) - target
            return target + delta
        return self.target_logit(target)


class _ScaledMargin(torch.autograd.Function):
    """``s * cos`` with ``s * adjusted(cos)`` at the target cells, in one pass over the ``[B, C]`` logits each way.

    The same values and gradients as ``cos.index_put((rows, cols), adjusted(cos[rows, cols])) * s`` under plain
    autograd, which costs about six full passes (the index_put copy, the scaling, and in backward the scaling, the
    index_put's zeroed copy, the gather's zero matrix and the sum of the two); here the small target path is
    differentiated by autograd on the ``[rows]`` targets alone. In place (``inplace``), the pass each way writes
    into the buffer it reads. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, cos_logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                margin: CombinedMarginLoss, inplace: bool = False) -> torch.Tensor:
        target = cos_logits[rows, cols]
        if inplace:
            ctx.mark_dirty(cos_logits)
            out = cos_logits.mul_(margin.s)
        else:
            out = cos_logits * margin.s
        out[rows, cols] = margin._adjusted(target) * margin.s
        ctx.save_for_backward(rows, cols, target)
        ctx.margin, ctx.inplace = margin, inplace
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        rows, cols, target = ctx.saved_tensors
        margin = ctx.margin
        grad_target = grad_out[rows, cols]
        # In place only when the caller owns the whole chain (Partial FC: the gradient is its softmax buffer).
        grad_cos = grad_out.mul_(margin.s) if ctx.inplace else grad_out * margin.s
        with torch.enable_grad():
            leaf = target.detach().requires_grad_()
            adjusted = margin._adjusted(leaf) * margin.s
            grad_adjusted = torch.autograd.grad(adjusted, leaf, grad_target)[0]
        grad_cos[rows, cols] = grad_adjusted
        return grad_cos, None, None, None, None


MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
}
