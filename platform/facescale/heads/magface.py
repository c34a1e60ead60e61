"""MagFace: an angular margin that grows with the embedding's magnitude.

Meng, Zhao, Jiang, Zhang, Wang, Liu. "MagFace: A Universal Representation for Face Recognition and Quality
Assessment", CVPR 2021 (arXiv:2103.06627).

The un-normalised embedding norm ``a`` (clamped to ``[l_a, u_a]``) sets the additive angular margin

    m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m,     target logit = s * cos(theta + m(a))

and a regulariser ``lambda_g * g(a)`` with ``g(a) = a / u_a**2 + 1 / a`` is added to the loss, so that easy,
high-quality faces get large norms. The margin needs the norms, so MagFace extends the margin contract with the
keyword ``norms=`` and exposes :meth:`MagFaceLoss.regularizer`, which the classifier adds to the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from facescale.heads.margin import IGNORE_LABEL


class MagFaceLoss(nn.Module):
    """MagFace margin on cosine logits; call as ``margin(cos_logits, labels, norms=norms)``.

    Args:
        s: Scale applied to every logit.
        l_a: Lower bound of the embedding norm.
        u_a: Upper bound of the embedding norm.
        l_m: Margin at ``a = l_a`` (radians).
        u_m: Margin at ``a = u_a`` (radians).
        lambda_g: Weight of the regulariser ``g(a)``.
    """

    # Tells a classifier to pass ``norms=`` and to add ``regularizer(norms).mean()`` to the loss.
    needs_norms = True

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
                 lambda_g: float = 35.0) -> None:
        super().__init__()
        if s <= 0 or not 0 < l_a < u_a or not 0 <= l_m <= u_m or lambda_g < 0:
            raise ValueError("MagFace needs s > 0, 0 < l_a < u_a, 0 <= l_m <= u_m and lambda_g >= 0; got "
                             f"s={s}, l_a={l_a}, u_a={u_a}, l_m={l_m}, u_m={u_m}, lambda_g={lambda_g}")
        self.s, self.l_a, self.u_a, self.l_m, self.u_m = float(s), float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def extra_repr(self) -> str:
        return (f"s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
                f"lambda_g={self.lambda_g}")

    def margin(self, norms: torch.Tensor) -> torch.Tensor:
        """Angular margin m(a) per row for un-normalised embedding norms ``[B]``."""
        a = norms.clamp(self.l_a, self.u_a)
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer(self, norms: torch.Tensor) -> torch.Tensor:
        """Weighted regulariser ``lambda_g * g(a)`` per row; the classifier adds its batch mean to the loss."""
        a = norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (a / (self.u_a * self.u_a) + 1.0 / a)

    def forward(self, cos_logits: torch.Tensor, labels: torch.Tensor,
                norms: torch.Tensor | None = None) -> torch.Tensor:
        """Returns scaled logits with the magnitude-aware margin on each row's target column.

        Args:
            cos_logits: Cosine logits ``[B, C]``. Not modified in place.
            labels: Target column per row ``[B]``, ``-1`` where the target is not in this block.
            norms: Un-normalised embedding norms ``[B]`` (keep them in the graph: the margin depends on them).

        Returns:
            Scaled logits ``[B, C]``.
        """
        if norms is None:
            raise ValueError("MagFaceLoss needs the un-normalised embedding norms: call margin(cos, labels, norms=...)")
        if norms.shape != labels.shape:
            raise ValueError(f"norms has shape {tuple(norms.shape)}, labels {tuple(labels.shape)}; need one per row")
        rows = torch.nonzero(labels != IGNORE_LABEL, as_tuple=False).squeeze(1)
        cols = labels[rows]
        target = cos_logits[rows, cols]
        margin = self.margin(norms[rows]).to(target.dtype)
        sin_theta = torch.sqrt((1.0 - target * target).clamp_min(1e-12))
        cos_theta_m = target * torch.cos(margin) - sin_theta * torch.sin(margin)
        # Past theta + m = pi the margin stops being monotonic; continue linearly as in ArcFace (sec. 2.1).
        threshold = torch.cos(math.pi - margin)
        fallback = target - torch.sin(math.pi - margin) * margin
        adjusted = torch.where(target > threshold, cos_theta_m, fallback)
        return cos_logits.index_put((rows, cols), adjusted) * self.s
