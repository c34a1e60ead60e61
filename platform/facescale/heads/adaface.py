"""AdaFace: a margin that adapts to image quality, read from the embedding norm.

Kim, Jain, Liu. "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022 (arXiv:2204.00964).

The detached norm ``a`` of each un-normalised embedding (clipped to [0.001, 100]) is standardised by an EMA of the
batch mean and (unbiased) std of the norms, giving the margin scaler ``z = clip(h * (a - mean) / (std + eps), -1,
1)``; the target logit then gets an angular and an additive margin

    g_angle = -m * z,   g_add = m + m * z,   target logit = s * (cos(clip(theta + g_angle, eps, pi - eps)) - g_add)

and every other logit is ``s * cos(theta)``; cosines are clamped to [-1 + eps, 1 - eps], eps = 1e-3. Order as in
the authors' code (github.com/mk-minchul/AdaFace, ``head.py``): the EMA is first updated with this batch, then used
to standardise it. Initial EMA: mean 20, std 100 (the authors' values).

The statistics must be those of the whole global batch so the EMA buffers stay identical on every rank. Partial FC
passes the norms of the all-gathered embeddings (already global). A classifier that sees only this rank's rows
(the DDP-replicated linear classifier) passes ``batch_sum=``, a sum over the ranks, which completes the batch's
count, sum and sum of squares.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from facescale.heads.margin import IGNORE_LABEL

EPS = 1e-3
NORM_CLIP = (0.001, 100.0)


class AdaFaceLoss(nn.Module):
    """AdaFace margin; call as ``margin(cos_logits, labels, norms=norms[, batch_sum=fn])``.

    ``batch_mean`` and ``batch_std`` are buffers (saved with the module), updated once per forward in training mode.

    Args:
        s: Scale applied to every logit.
        m: Margin (radians for the angular part, cosine units for the additive part).
        h: Concentration of the standardised norm (the paper's 0.333 puts ~68% of samples in [-0.333, 0.333]).
        t_alpha: EMA rate of the norm statistics.
    """

    # Tells a classifier to pass ``norms=`` (the un-normalised embedding norms of the rows it scores).
    needs_norms = True
    # Tells a classifier whose rows are only this rank's share of the batch to pass ``batch_sum=`` (a sum over ranks).
    needs_batch_sum = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01) -> None:
        super().__init__()
        if s <= 0 or not 0 <= m < math.pi or h <= 0 or not 0 < t_alpha <= 1:
            raise ValueError(f"AdaFace needs s > 0, 0 <= m < pi, h > 0, 0 < t_alpha <= 1; got s={s}, m={m}, h={h}, "
                             f"t_alpha={t_alpha}")
        self.s, self.m, self.h, self.t_alpha = float(s), float(m), float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.full((), 20.0))
        self.register_buffer("batch_std", torch.full((), 100.0))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"

    @torch.no_grad()
    def _update_ema(self, safe_norms: torch.Tensor, batch_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        x = safe_norms.double()
        stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
        if batch_sum is not None:
            stats = batch_sum(stats)
        count, total, total_sq = stats[0], stats[1], stats[2]
        mean = total / count.clamp_min(1.0)
        # Unbiased std, as torch.std in the authors' code; a one-row batch has none and keeps the EMA's std.
        var = ((total_sq - count * mean * mean) / (count - 1.0).clamp_min(1.0)).clamp_min(0.0)
        std = torch.where(count > 1.0, var.sqrt(), self.batch_std.double())
        a = self.t_alpha
        self.batch_mean.copy_(mean * a + (1.0 - a) * self.batch_mean.double())
        self.batch_std.copy_(std * a + (1.0 - a) * self.batch_std.double())

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """``z = clip(h * (a - mean) / (std + eps), -1, 1)`` per row from the current EMA (no gradient)."""
        safe = norms.detach().clamp(*NORM_CLIP)
        z = (safe - self.batch_mean.to(safe.dtype)) / (self.batch_std.to(safe.dtype) + EPS)
        return (z * self.h).clamp(-1.0, 1.0)

    def forward(self, cos_logits: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Returns scaled logits with the quality-adaptive margin on each row's target column.

        Args:
            cos_logits: Cosine logits ``[B, C]``. Not modified in place.
            labels: Target column per row ``[B]``, ``-1`` where the target is not in this block.
            norms: Un-normalised embedding norms ``[B]`` (detached here: the margin carries no gradient to them).
            batch_sum: Sums the norm statistics over the ranks holding the other rows of the batch; ``None`` when
                ``norms`` already covers the whole batch (one rank, or Partial FC's gathered batch).

        Returns:
            Scaled logits ``[B, C]``.
        """
        if norms is None:
            raise ValueError("AdaFaceLoss needs the un-normalised embedding norms: call margin(cos, labels, norms=...)")
        if norms.shape != labels.shape:
            raise ValueError(f"norms has shape {tuple(norms.shape)}, labels {tuple(labels.shape)}; need one per row")
        if self.training:
            self._update_ema(norms.detach().clamp(*NORM_CLIP), batch_sum)
        cos = cos_logits.clamp(-1.0 + EPS, 1.0 - EPS)
        rows = torch.nonzero(labels != IGNORE_LABEL, as_tuple=False).squeeze(1)
        cols = labels[rows]
        target = cos[rows, cols]
        scaler = self.margin_scaler(norms[rows]).to(target.dtype)
        g_angle = -self.m * scaler
        g_add = self.m + self.m * scaler
        theta = torch.acos(target)
        adjusted = torch.cos((theta + g_angle).clamp(EPS, math.pi - EPS)) - g_add
        return cos.index_put((rows, cols), adjusted) * self.s
