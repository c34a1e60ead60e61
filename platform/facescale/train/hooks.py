"""What a caller adds to the training loop without the loop importing it: the teacher, and tests' planted faults.

The loop (``train/loop.py``) trains a backbone and its classifier; two things reach into it from outside:

- **distillation**: ``facescale.distill`` hands in ``open_teacher``, which opens the teacher-embedding cache for
  the shards this rank reads (:class:`TeacherSource`); the step then adds the angular distillation term. The loop
  never imports ``facescale.distill``: dependencies point one way, distill → train.
- **planted faults** (tests only): ``poison_loss`` makes a rank's loss NaN at a step, ``after_step`` may change the
  weights after a step (NaN weights that the checkpoint must refuse). No config key reaches these: a test builds a
  :class:`WorkerHooks` and passes it to ``run_training`` / ``run_torchrun`` / ``run_worker``.

Hooks travel to Ray Train workers inside the worker payload (pickled by Ray), so they must be picklable: module-level
functions, or instances of module-level classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from facescale.config import FaceScaleConfig


class TeacherSource(Protocol):
    """Teacher embeddings of the samples this rank trains on (``facescale.distill.cache.TeacherCache``)."""

    embedding_size: int

    def select(self, shards: list[int]) -> None:
        """Holds the embeddings of these manifest shards (the ones this rank reads in the coming epoch)."""

    def lookup(self, keys: list[str]) -> torch.Tensor:
        """``[len(keys), D]`` teacher embeddings of these sample keys."""


@dataclass
class WorkerHooks:
    """Optional additions to the training loop (see the module docstring).

    Attributes:
        open_teacher: ``(cfg, shards) -> TeacherSource`` for a run with ``distill.teacher_cache``.
        poison_loss: Tests: ``(step, rank) -> True`` makes this rank's loss at optimizer step ``step`` NaN.
        after_step: Tests: ``(step, rank, backbone)`` after each optimizer step (e.g. fill a weight with NaN).
    """

    open_teacher: Callable[[FaceScaleConfig, list[int]], TeacherSource] | None = None
    poison_loss: Callable[[int, int], bool] | None = None
    after_step: Callable[[int, int, torch.nn.Module], None] | None = None
