"""Torch/WebDataset training loader behind the batch contract that the DALI loader also honours.

The pipeline, as explicit stages (each split runs them on its own):

1. **Shard assignment.** The manifest's shards are permuted by ``(seed, epoch)`` (training only) and dealt
   round-robin to the global list of splits ``split = rank * num_workers + worker``.
2. **Streaming.** A split reads its shards in order with webdataset; unreadable shards fail or are skipped.
3. **Buffer shuffle.** Samples (still encoded) pass a seeded shuffle buffer that drains at the end of each pass.
4. **Decode.** simplejpeg to RGB ``uint8``; labels are checked against ``num_classes``; a random horizontal flip
   in training.
5. **Batch.** Each split yields ``uint8 [B, 3, H, W]`` batches, delivered as they are (pinned by the DataLoader when
   the training device is CUDA); the training device normalises them (``data.transforms.normalize_images``).

**Workers** persist across epochs (``persistent_workers``). What an epoch needs to know (its number, first step and
the splits' cursors) reaches them through a small shared-memory tensor the main process writes before it starts
the epoch's iteration; each worker reads it when the DataLoader asks it to begin the epoch.

**Epoch policy.** An epoch is ``steps_per_epoch = manifest.num_samples // (world_size * batch_size)`` steps, taken
from the manifest, never by scanning. Every rank yields exactly that many batches of exactly ``batch_size``
samples (Partial FC needs equal batch sizes on all ranks). The DataLoader takes batches from its workers in turn,
so worker ``w`` of a rank yields ``steps // num_workers`` batches, plus one if ``w < steps % num_workers``. A split
reads each of its shards once before reading any twice; if its shards run out before its quota of batches is met,
it wraps around and reads them again in a new seeded order (resampling, as open_clip's resampled shards do). So an
epoch covers every sample exactly once only when every split's shards hold exactly its quota (equal shard sizes,
shard count divisible by the number of splits, quota divisible accordingly); otherwise some samples repeat and
others wait for a later epoch. Results are deterministic for a given ``(seed, epoch, world_size, num_workers)``.

**Resume.** ``epoch_samples(epoch, start_step, resume)`` starts at a step without decoding what came before: each
split reads its encoded samples past its cursor (so buffer shuffle and wrap-around replay exactly) and draws the
flips those samples had. A split's cursor counts the encoded samples it consumed, corrupt ones included; it comes
from the ``local_position()`` saved with the checkpoint, or, without one, is ``batches done * batch_size`` (exact
unless samples were skipped before the restart). Worker ``w`` then runs local split ``(w + start_step) % n``, so
the DataLoader's turn order continues where the interrupted run stopped.

**Error policy.** A missing, non-integer or out-of-range label is always an error (the shards were built wrong).
A corrupt or wrongly sized JPEG, or an unreadable shard, raises under ``on_error="fail"`` and is skipped and
counted in ``loader.stats`` under ``on_error="skip"``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader

from facescale.data.errors import DataError
from facescale.data.loader_stream import DEFAULT_SHUFFLE_BUFFER, OnError, _SplitStream, assign_shards, split_quota
from facescale.data.shards import Manifest, load_manifest

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "FaceLoader", "OnError", "TorchFaceLoader", "assign_shards", "build_loader",
           "position_record", "resume_cursors", "split_quota"]  # fmt: skip


@runtime_checkable
class FaceLoader(Protocol):
    """The batch contract shared by the torch and DALI loaders."""

    manifest: Manifest
    batch_size: int
    steps_per_epoch: int
    fallback_reason: str | None  # set by build_train_loader: why this is not the loader data.loader asked for

    @property
    def stats(self) -> dict[str, int]:
        """Counters over all epochs so far: samples, skipped_samples, skipped_shards, wraps."""
        ...

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly ``steps_per_epoch`` batches: ``uint8 [B, 3, H, W]`` images and ``int64 [B]`` labels.

        Images are RGB, mirrored in training, channels first, not normalised (``normalize_images`` on the training
        device does that); on the host, in pinned memory when the training device is CUDA, or already on the GPU
        (DALI ``mixed``).
        """
        ...

    def epoch_samples(
        self, epoch: int, start_step: int = 0, resume: dict[str, Any] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Yield ``(images, labels, keys)`` for steps ``start_step ..  steps_per_epoch - 1`` of ``epoch``.

        Batches before ``start_step`` are fast-forwarded without decoding. ``resume``, a ``local_position()``
        saved at that step, makes the restart exact even when samples were skipped before it.
        """
        ...

    def local_position(self) -> dict[str, Any]:
        """This rank's position after the last batch yielded (JSON-serialisable; see ``resume_cursors``)."""
        ...

    def local_shards(self, epoch: int) -> list[int]:
        """Indices into ``manifest.shards`` this rank reads in ``epoch``, in order (the teacher embeddings it holds)."""
        ...


def position_record(fingerprint: dict[str, Any], epoch: int, step: int, cursors: dict[int, int]) -> dict[str, Any]:
    """A loader position: what the loader is (``fingerprint``), where it is, and each split's raw-sample cursor."""
    return {**fingerprint, "epoch": epoch, "step_in_epoch": step, "cursors": {str(k): v for k, v in cursors.items()}}


def resume_cursors(
    resume: dict[str, Any] | None, fingerprint: dict[str, Any], epoch: int, start_step: int
) -> dict[int, int]:
    """The raw cursors of a saved position, if a loader like this one saved it at exactly ``(epoch, start_step)``.

    A cursor counts the encoded samples a split consumed, including skipped corrupt ones; without it a split
    assumes ``batches done * batch_size``, which is exact whenever no sample was skipped before the restart.

    Args:
        resume: A ``local_position()`` from the checkpoint, or ``None``.
        fingerprint: The fields that must match (loader kind, rank, world size, batch size, splits, seed, digest).
        epoch: Epoch being started.
        start_step: Step being started at.

    Returns:
        ``{split: cursor}``; empty when there is no usable saved position.
    """
    if not resume:
        return {}
    expected = {**fingerprint, "epoch": epoch, "step_in_epoch": start_step}
    differing = sorted(k for k, v in expected.items() if resume.get(k) != v)
    if differing:
        if resume.get("epoch") == epoch:  # same epoch, another setup: say why the cursors are not used
            logger.info("saved loader position not used (differs in %s); cursors derived from the step",
                        ", ".join(differing))  # fmt: skip
        return {}
    return {int(k): int(v) for k, v in resume.get("cursors", {}).items()}


class TorchFaceLoader:
    """``FaceLoader`` on a torch ``DataLoader`` over webdataset shards; build it with ``build_loader``."""

    fallback_reason: str | None = None  # the factory's: why this is not the loader asked for (None: it is)

    def __init__(self, manifest: Manifest, dataset: _SplitStream, num_workers: int, pin_memory: bool = False) -> None:
        self.manifest = manifest
        self.batch_size = dataset.batch_size
        self.steps_per_epoch = dataset.steps_per_epoch
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._dataset = dataset
        self._loader: DataLoader | None = None  # built at the first epoch; its workers then serve every epoch
        self._generation = 0
        self._finished: Counter[str] = Counter()
        self._current: dict[int, dict[str, int]] = {}  # split -> latest counters reported this epoch
        self._position: dict[str, Any] = position_record(self._fingerprint, 0, 0, {})

    @property
    def stats(self) -> dict[str, int]:
        """Counters over all epochs so far: samples, skipped_samples, skipped_shards, wraps."""
        total = dict.fromkeys(("samples", "skipped_samples", "skipped_shards", "wraps"), 0)
        for counters in (self._finished, *self._current.values()):
            for name, count in counters.items():
                total[name] = total.get(name, 0) + count
        return total

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly ``steps_per_epoch`` batches: ``uint8 [B, 3, H, W]`` images and ``int64 [B]`` labels."""
        for images, labels, _ in self.epoch_samples(epoch):
            yield images, labels

    def epoch_samples(
        self, epoch: int, start_step: int = 0, resume: dict[str, Any] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like ``epoch_batches``, with the sample keys of each batch as a third element.

        One epoch at a time (the workers are shared): starting another ends this one, and resuming it then raises
        ``RuntimeError``.

        Args:
            epoch: The epoch.
            start_step: First step to yield; the samples of earlier steps are read past, not decoded.
            resume: ``local_position()`` saved at ``(epoch, start_step)``: exact cursors (see ``resume_cursors``).
        """
        for counters in self._current.values():
            self._finished.update(counters)
        self._current = {}
        self._generation += 1
        generation = self._generation
        start_step = min(max(start_step, 0), self.steps_per_epoch)
        cursors = resume_cursors(resume, self._fingerprint, epoch, start_step)
        # Before iter(): the DataLoader tells its persistent workers to begin the epoch only then, and they read it.
        self._dataset.set_epoch(epoch, start_step, cursors)
        self._position = position_record(self._fingerprint, epoch, start_step, cursors)
        if self._loader is None:
            workers = self.num_workers > 0
            self._loader = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers,
                                      prefetch_factor=2 if workers else None, persistent_workers=workers,
                                      pin_memory=self.pin_memory)  # fmt: skip
        count = start_step
        batches = iter(self._loader)
        while True:
            if self._generation != generation:  # checked before taking a batch: it would be the other epoch's
                raise RuntimeError(f"epoch_samples: another epoch started on this loader after {count} steps of "
                                   "this one; a loader runs one epoch at a time")  # fmt: skip
            batch = next(batches, None)
            if batch is None:
                break
            self._current[batch["split"]] = batch["stats"]
            count += 1
            self._position["step_in_epoch"] = count
            self._position["cursors"][str(batch["split"])] = batch["cursor"]
            yield batch["images"], batch["labels"], batch["keys"]
        assert count == self.steps_per_epoch, f"yielded up to step {count}, expected {self.steps_per_epoch}"

    def local_shards(self, epoch: int) -> list[int]:
        """Indices into ``manifest.shards`` this rank reads in ``epoch``: the shards dealt to its splits.

        A split that wraps reads its own shards again, and an unreadable shard skipped reads nothing, so every
        sample this rank yields in ``epoch`` comes from these shards.
        """
        d = self._dataset
        splits = assign_shards(len(d.urls), d.num_splits, d.seed, epoch, d.train)
        local = range(d.rank * d.num_splits_per_rank, (d.rank + 1) * d.num_splits_per_rank)
        return sorted({i for split in local for i in splits[split]})

    def local_position(self) -> dict[str, Any]:
        """This rank's position after the last batch yielded: epoch, step, raw cursor of every split that ran."""
        return json.loads(json.dumps(self._position))  # a deep copy that is JSON-safe by construction

    @property
    def _fingerprint(self) -> dict[str, Any]:
        d = self._dataset
        return {"loader": "torch", "rank": d.rank, "world_size": d.num_splits // d.num_splits_per_rank,
                "batch_size": d.batch_size, "num_splits_per_rank": d.num_splits_per_rank, "seed": d.seed,
                "train": d.train, "digest": self.manifest.digest}  # fmt: skip


def build_loader(
    root_or_manifest: str | os.PathLike[str] | Manifest,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 2,
    on_error: OnError = "fail",
    train: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    pin_memory: bool | None = None,
) -> TorchFaceLoader:
    """Build the torch/webdataset loader of one rank (see the module docstring for the epoch and error policy).

    Args:
        root_or_manifest: Dataset directory, ``manifest.json`` path, or a ``Manifest`` that knows its root.
        batch_size: Samples per batch on this rank.
        rank: This rank, in ``[0, world_size)``.
        world_size: Number of ranks.
        seed: Seed for shard order, shuffle buffers and flips.
        num_workers: DataLoader workers; lowered (with a warning) so every split gets a shard. 0 reads in-process.
        on_error: ``"fail"`` raises on a corrupt image or unreadable shard; ``"skip"`` skips and counts it.
        train: Shuffle and flip; ``False`` reads shards and samples in manifest order without flips.
        shuffle_buffer: Samples in each split's shuffle buffer.
        pin_memory: Batches in pinned memory, for asynchronous copies to a GPU (default: when CUDA is available).

    Returns:
        The loader.

    Raises:
        ManifestError: If the manifest cannot be loaded.
        DataError: If an epoch would have no step, or there are fewer shards than ranks.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"bad loader arguments: batch_size={batch_size} rank={rank} world_size={world_size} "
                         f"num_workers={num_workers}")  # fmt: skip
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    manifest = root_or_manifest if isinstance(root_or_manifest, Manifest) else load_manifest(root_or_manifest)
    num_shards, where = len(manifest.shards), manifest.root
    steps = manifest.num_samples // (world_size * batch_size)
    if steps == 0:
        raise DataError(f"{where}: {manifest.num_samples} samples are fewer than world_size * batch_size = "
                        f"{world_size} * {batch_size}; an epoch would have no step")  # fmt: skip
    if num_shards < world_size:
        raise DataError(f"{where}: {num_shards} shards for world_size {world_size}; every rank needs a shard")
    splits_per_rank = max(num_workers, 1)
    if num_shards < world_size * splits_per_rank:
        splits_per_rank = num_shards // world_size
        logger.warning("%s: %d shards cannot feed %d ranks x %d workers; using %d workers per rank",
                       where, num_shards, world_size, num_workers, splits_per_rank)  # fmt: skip
        num_workers = splits_per_rank
    dataset = _SplitStream(
        manifest, rank, world_size, splits_per_rank, batch_size, steps, seed, train, on_error, shuffle_buffer
    )
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return TorchFaceLoader(manifest, dataset, num_workers, pin_memory=pin)
