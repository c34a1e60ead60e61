"""Sub-center ArcFace: K centers per class, the class cosine is the best of its K, and an optional cleaning step.

Deng, Guo, Liu, Zafeiriou. "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces",
ECCV 2020. Each class has K sub-centers (the paper uses K = 3); the cosine of a class is the max over its K
sub-center cosines, taken *before* the margin, so noisy samples can gather around a non-dominant sub-center
instead of pulling the class's main one. Center rows are laid out class-major: row ``c * K + k`` is sub-center k of
class c.

Cleaning (the paper's sec. 3.2, done here during training): from epoch ``drop_after_epochs`` on, each class keeps
only its dominant sub-center -- the one most of its samples were closest to, counted (argmax hits per class and
sub-center) during the epochs before -- and samples whose angle to their class's dominant center exceeds
``drop_angle_deg`` (paper: 75 degrees) are dropped from the loss.

:class:`SubCenters` holds that per-class state for one block of classes (all of them for the linear classifier,
one rank's block under Partial FC); the classifier owns the collectives.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from facescale.heads.margin import IGNORE_LABEL

# Below any cosine: a masked (non-dominant) sub-center never wins the max.
_MASKED = -2.0


class SubCenters(nn.Module):
    """Max-pooling over K sub-centers, dominance counts and the drop rule for ``num_classes`` classes.

    Buffers (checkpointed): ``hits [C, K]`` (int64 argmax counts of each class's own samples), ``dominant [C]``
    (the kept sub-center once cleaning is on) and ``dominant_only`` (0 or 1).

    Args:
        num_classes: Classes of this block.
        k: Sub-centers per class.
        drop_after_epochs: First epoch of dominant-only training and sample dropping; ``None`` never.
        drop_angle_deg: Samples farther than this from their class's dominant center are dropped.
    """

    def __init__(self, num_classes: int, k: int, drop_after_epochs: int | None = None,
                 drop_angle_deg: float = 75.0) -> None:
        super().__init__()
        if k < 1 or num_classes < 0:
            raise ValueError(f"sub-centers need k >= 1 and num_classes >= 0, got k={k}, num_classes={num_classes}")
        if drop_after_epochs is not None and (drop_after_epochs < 0 or not 0 < drop_angle_deg <= 180):
            raise ValueError(f"need drop_after_epochs >= 0 and 0 < drop_angle_deg <= 180, got {drop_after_epochs}, "
                             f"{drop_angle_deg}")
        self.k, self.num_classes = int(k), int(num_classes)
        self.drop_after_epochs, self.drop_angle_deg = drop_after_epochs, float(drop_angle_deg)
        self.drop_cos = math.cos(math.radians(drop_angle_deg))
        self.register_buffer("hits", torch.zeros((num_classes, k), dtype=torch.int64))
        self.register_buffer("dominant", torch.zeros((num_classes,), dtype=torch.int64))
        self.register_buffer("dominant_only", torch.zeros((), dtype=torch.int64))
        # Host mirror of ``dominant_only``: read every forward without a device sync.
        self._cleaning = False

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, k={self.k}, drop_after_epochs={self.drop_after_epochs}, "
                f"drop_angle_deg={self.drop_angle_deg}")

    @property
    def cleaning(self) -> bool:
        """Whether only dominant sub-centers count (and far samples are dropped)."""
        return self._cleaning

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._cleaning = bool(self.dominant_only)

    def load_block(self, hits: torch.Tensor, dominant: torch.Tensor, dominant_only: bool) -> None:
        """Sets the state of this block (Partial FC's range-file loader; the state dict path needs no call)."""
        with torch.no_grad():
            self.hits.copy_(hits)
            self.dominant.copy_(dominant)
            self.dominant_only.fill_(int(dominant_only))
        self._cleaning = bool(dominant_only)

    def set_epoch(self, epoch: int) -> None:
        """At the first epoch ``>= drop_after_epochs``: fix each class's dominant sub-center from the hit counts."""
        if self.drop_after_epochs is None or epoch < self.drop_after_epochs or self.cleaning:
            return
        self.dominant.copy_(self.hits.argmax(dim=1))  # ties -> the lowest sub-center
        self.dominant_only.fill_(1)
        self._cleaning = True

    def pool(self, cos: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Class cosines ``[N, S]`` from sub-center cosines ``[N, S * K]`` and the winning sub-center per entry.

        Args:
            cos: Sub-center cosines, class-major (``S`` classes of K columns each).
            classes: The block's class index of each of the ``S`` classes (``None``: all classes, in order).
        """
        view = cos.view(cos.shape[0], -1, self.k)
        if self.cleaning:
            dominant = self.dominant if classes is None else self.dominant[classes]
            keep = torch.nn.functional.one_hot(dominant, self.k).bool()
            view = view.masked_fill(~keep.unsqueeze(0), _MASKED)
        pooled, winner = view.max(dim=2)
        return pooled, winner

    @torch.no_grad()
    def count_hits(self, winner: torch.Tensor, target: torch.Tensor, classes: torch.Tensor | None = None) -> (
            torch.Tensor):
        """This batch's ``[C, K]`` hit counts: for each row with a target here, its class's closest sub-center.

        Args:
            winner: Winning sub-center per row and class column ``[N, S]`` (from :meth:`pool`).
            target: Target column per row ``[N]`` (``-1``: not in this block).
            classes: As in :meth:`pool`.
        """
        rows = torch.nonzero(target != IGNORE_LABEL, as_tuple=False).squeeze(1)
        cols = target[rows]
        owner = cols if classes is None else classes[cols]
        delta = torch.zeros_like(self.hits)
        delta.index_put_((owner, winner[rows, cols]), torch.ones_like(owner), accumulate=True)
        return delta

    @torch.no_grad()
    def drop_flags(self, pooled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[N]`` float, 1 where the row's target is here and its angle to the dominant center is too large."""
        flags = pooled.new_zeros((pooled.shape[0],))
        rows = torch.nonzero(target != IGNORE_LABEL, as_tuple=False).squeeze(1)
        flags[rows] = (pooled[rows, target[rows]] < self.drop_cos).to(flags.dtype)
        return flags
