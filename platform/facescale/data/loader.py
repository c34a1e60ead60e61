"""Torch/WebDataset training loader behind the batch contract that the DALI loader also honours.

The pipeline, as explicit stages (each split runs them on its own):

1. **Shard assignment.** The manifest's shards are permuted by ``(seed, epoch)`` (training only) and dealt
   round-robin to the global list of splits ``split = rank * num_workers + worker``.
2. **Streaming.** A split reads its shards in order with webdataset; unreadable shards fail or are skipped.
3. **Buffer shuffle.** Samples (still encoded) pass a seeded shuffle buffer that drains at the end of each pass.
4. **Decode.** simplejpeg to RGB ``uint8``; labels are checked against ``num_classes``; a random horizontal flip
   in training.
5. **Batch.** Each split yields ``uint8 [B, 3, H, W]`` batches; the main process normalises them to
   ``(x - 127.5) / 127.5`` in ``float32``.

**Epoch policy.** An epoch is ``steps_per_epoch = manifest.num_samples // (world_size * batch_size)`` steps, taken
from the manifest, never by scanning. Every rank yields exactly that many batches of exactly ``batch_size``
samples (Partial FC needs equal batch sizes on all ranks). The DataLoader takes batches from its workers in turn,
so worker ``w`` of a rank yields ``steps // num_workers`` batches, plus one if ``w < steps % num_workers``. A split
reads each of its shards once before reading any twice; if its shards run out before its quota of batches is met,
it wraps around and reads them again in a new seeded order (resampling, as open_clip's resampled shards do). So an
epoch covers every sample exactly once only when every split's shards hold exactly its quota (equal shard sizes,
shard count divisible by the number of splits, quota divisible accordingly); otherwise some samples repeat and
others wait for a later epoch. Results are deterministic for a given ``(seed, epoch, world_size, num_workers)``.

**Error policy.** A missing, non-integer or out-of-range label is always an error (the shards were built wrong).
A corrupt or wrongly sized JPEG, or an unreadable shard, raises under ``on_error="fail"`` and is skipped and
counted in ``loader.stats`` under ``on_error="skip"``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facescale.data.errors import DataError, ImageDecodeError, ShardError
from facescale.data.shards import Manifest, decode_image, iter_shard, load_manifest, parse_label

logger = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]
# InsightFace arcface_torch `dataset.py` normalises with mean 0.5, std 0.5 after ToTensor: (x/255 - 0.5) / 0.5.
PIXEL_MEAN = PIXEL_STD = 127.5
DEFAULT_SHUFFLE_BUFFER = 2000  # samples per split, still encoded (~5 kB each at 112x112); open_clip uses 1000-5000
_STREAM_SHUFFLE, _STREAM_FLIP = 0, 1


@runtime_checkable
class FaceLoader(Protocol):
    """The batch contract shared by the torch and DALI loaders."""

    manifest: Manifest
    batch_size: int
    steps_per_epoch: int

    @property
    def stats(self) -> dict[str, int]:
        """Counters over all epochs so far: samples, skipped_samples, skipped_shards, wraps."""
        ...

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly ``steps_per_epoch`` batches: ``float32 [B, 3, H, W]`` in ``[-1, 1]`` and ``int64 [B]``."""
        ...


def assign_shards(num_shards: int, num_splits: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Deal shard indices round-robin to splits, after a ``(seed, epoch)`` permutation when ``shuffle``."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle else np.arange(num_shards)
    return [order[split::num_splits].tolist() for split in range(num_splits)]


def split_quota(steps_per_epoch: int, num_workers: int, worker: int) -> int:
    """Batches worker ``worker`` of a rank yields per epoch; the quotas of a rank's workers sum to the steps."""
    return steps_per_epoch // num_workers + int(worker < steps_per_epoch % num_workers)


def _buffer_shuffle(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items; drains (shuffled) when the stream ends."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)).tolist():
        yield buffer[i]


class _SplitStream(IterableDataset):
    """Runs stages 2-5 for one split (one DataLoader worker of one rank). Picklable, so it runs in workers."""

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        world_size: int,
        num_splits_per_rank: int,
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        train: bool,
        on_error: OnError,
        shuffle_buffer: int,
    ) -> None:
        super().__init__()
        self.urls, self.num_classes, self.image_size = manifest.shard_urls(), manifest.num_classes, manifest.image_size
        self.expected_counts = {url: shard.num_samples for url, shard in zip(self.urls, manifest.shards)}
        self.rank, self.num_splits_per_rank = rank, num_splits_per_rank
        self.num_splits = world_size * num_splits_per_rank
        self.batch_size, self.steps_per_epoch, self.seed, self.train = batch_size, steps_per_epoch, seed, train
        self.on_error, self.shuffle_buffer = on_error, shuffle_buffer
        self.epoch = 0  # set by the main process before each epoch's workers start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        split = self.rank * self.num_splits_per_rank + worker
        stats: Counter[str] = Counter()
        samples = self._samples(split, stats)
        rng = np.random.default_rng([self.seed, self.epoch, split, _STREAM_FLIP])
        h, w = self.image_size
        for _ in range(split_quota(self.steps_per_epoch, self.num_splits_per_rank, worker)):
            images = np.empty((self.batch_size, 3, h, w), np.uint8)
            labels = np.empty(self.batch_size, np.int64)
            keys = []
            for i in range(self.batch_size):
                key, image, labels[i] = next(samples)
                if self.train and rng.random() < 0.5:
                    image = image[:, ::-1]
                images[i] = image.transpose(2, 0, 1)
                keys.append(key)
            yield {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels), "keys": keys,
                   "split": split, "stats": dict(stats)}  # fmt: skip

    def _samples(self, split: int, stats: Counter[str]) -> Iterator[tuple[str, np.ndarray, int]]:
        shard_ids = assign_shards(len(self.urls), self.num_splits, self.seed, self.epoch, self.train)[split]
        for pass_index in itertools.count():
            rng = np.random.default_rng([self.seed, self.epoch, split, _STREAM_SHUFFLE, pass_index])
            order = shard_ids if pass_index == 0 or not self.train else rng.permutation(shard_ids).tolist()
            raw = self._read([self.urls[i] for i in order], stats)
            if self.train:
                raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
            produced = 0
            for sample in raw:
                label = parse_label(sample, self.num_classes)
                try:
                    image = decode_image(sample, self.image_size)
                except ImageDecodeError as exn:
                    if self.on_error == "fail":
                        raise
                    stats["skipped_samples"] += 1
                    logger.warning("skipping sample: %s", exn)
                    continue
                produced += 1
                stats["samples"] += 1
                yield sample["__key__"], image, label
            if produced == 0:
                shards = ", ".join(self.urls[i] for i in shard_ids)
                raise ShardError(f"split {split} (rank {self.rank}): no readable samples in shards {shards}", shards)
            stats["wraps"] += 1
            logger.debug("split %d wraps around its %d shards (pass %d)", split, len(shard_ids), pass_index + 1)

    def _read(self, urls: list[str], stats: Counter[str]) -> Iterator[dict[str, Any]]:
        for url in urls:

            skipped = []

            def skip(exn: Exception, url: str = url, skipped: list[Exception] = skipped) -> bool:
                stats["skipped_shards"] += 1
                skipped.append(exn)
                logger.warning("skipping unreadable shard %s: %s", url, exn)
                return True

            count = 0
            for sample in iter_shard(url, handler=skip if self.on_error == "skip" else None):
                count += 1
                yield sample
            # The manifest is the source of every size (steps per epoch, quotas): a shard that disagrees with it
            # means the dataset changed after it was written. Checked as each shard ends, so nothing is scanned up
            # front. A shard already counted as skipped (unreadable) is not reported twice.
            expected = self.expected_counts[url]
            if count != expected and not skipped:
                raise ShardError(f"shard {url} holds {count} samples but manifest.json says {expected}", url)


class TorchFaceLoader:
    """``FaceLoader`` on a torch ``DataLoader`` over webdataset shards; build it with ``build_loader``."""

    def __init__(self, manifest: Manifest, dataset: _SplitStream, num_workers: int) -> None:
        self.manifest = manifest
        self.batch_size = dataset.batch_size
        self.steps_per_epoch = dataset.steps_per_epoch
        self.num_workers = num_workers
        self._dataset = dataset
        self._finished: Counter[str] = Counter()
        self._current: dict[int, dict[str, int]] = {}  # split -> latest counters reported this epoch

    @property
    def stats(self) -> dict[str, int]:
        """Counters over all epochs so far: samples, skipped_samples, skipped_shards, wraps."""
        total = dict.fromkeys(("samples", "skipped_samples", "skipped_shards", "wraps"), 0)
        for counters in (self._finished, *self._current.values()):
            for name, count in counters.items():
                total[name] = total.get(name, 0) + count
        return total

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly ``steps_per_epoch`` batches: ``float32 [B, 3, H, W]`` in ``[-1, 1]`` and ``int64 [B]``."""
        for images, labels, _ in self.epoch_samples(epoch):
            yield images, labels

    def epoch_samples(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like ``epoch_batches``, with the sample keys of each batch as a third element."""
        for counters in self._current.values():
            self._finished.update(counters)
        self._current = {}
        self._dataset.epoch = epoch  # workers are started per epoch (not persistent), so they see this value
        loader = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers > 0 else None)  # fmt: skip
        count = 0
        for batch in loader:
            self._current[batch["split"]] = batch["stats"]
            images = batch["images"].float().sub_(PIXEL_MEAN).div_(PIXEL_STD)
            count += 1
            yield images, batch["labels"], batch["keys"]
        assert count == self.steps_per_epoch, f"yielded {count} batches, expected {self.steps_per_epoch}"


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
    return TorchFaceLoader(manifest, dataset, num_workers)
