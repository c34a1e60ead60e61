"""Stages 1-5 of the torch loader for one split (see ``facescale.data.loader`` for the pipeline and its policies).

Shard assignment (``assign_shards``), per-worker quotas (``split_quota``), the seeded buffer shuffle, and
``_SplitStream``: the picklable ``IterableDataset`` a DataLoader worker runs to stream, shuffle, decode and batch
its split's shards.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from facescale.data.errors import ImageDecodeError, ShardError
from facescale.data.shards import Manifest, decode_image, iter_shard, parse_label

logger = logging.getLogger("facescale.data.loader")  # the loader's logger: log configuration keeps applying

OnError = Literal["fail", "skip"]
DEFAULT_SHUFFLE_BUFFER = 2000  # samples per split, still encoded (~5 kB each at 112x112); open_clip uses 1000-5000
_STREAM_SHUFFLE, _STREAM_FLIP = 0, 1


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
        # Written by the main process before each epoch, read by the (persistent) workers as it starts: the epoch,
        # the first step to yield, and the raw-sample cursor of each local split at that step (-1: derived as
        # batches done * batch_size). Shared memory, so workers forked or spawned once see every epoch's values.
        self._epoch_state = torch.full((2 + num_splits_per_rank,), -1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, start_step: int, start_cursors: dict[int, int]) -> None:
        """Tell this process and the workers what the next epoch is (call before the DataLoader's ``iter``)."""
        state = [epoch, start_step] + [start_cursors.get(self.rank * self.num_splits_per_rank + local, -1)
                                       for local in range(self.num_splits_per_rank)]  # fmt: skip
        self._epoch_state.copy_(torch.tensor(state, dtype=torch.int64))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        state = self._epoch_state.tolist()
        epoch, start_step = state[0], state[1]
        cursors = {self.rank * self.num_splits_per_rank + local: c for local, c in enumerate(state[2:]) if c >= 0}
        return self._batches(worker, epoch, start_step, cursors)

    def _batches(self, worker: int, epoch: int, start_step: int, start_cursors: dict[int, int]
                 ) -> Iterator[dict[str, Any]]:  # fmt: skip
        # The DataLoader asks its workers for batches in turn, starting with worker 0, and step s of an epoch is
        # batch s // num_splits_per_rank of local split s % num_splits_per_rank. Started at step k, worker w runs
        # local split (w + k) % n, so worker 0 delivers step k and the turns line up with the uninterrupted run.
        local = (worker + start_step) % self.num_splits_per_rank
        split = self.rank * self.num_splits_per_rank + local
        done = split_quota(start_step, self.num_splits_per_rank, local)  # this split's batches before start
        cursor = start_cursors.get(split, done * self.batch_size)
        stats: Counter[str] = Counter()
        shard_ids = assign_shards(len(self.urls), self.num_splits, self.seed, epoch, self.train)[split]
        raw = self._raw(epoch, split, shard_ids, stats)
        # Fast-forward: the encoded samples of batches already trained on pass through the stream (so buffer
        # shuffle and wrap-around replay exactly) but are neither label-checked nor decoded.
        stats["fast_forwarded"] += sum(1 for _ in itertools.islice(raw, cursor))
        pass_size = sum(self.expected_counts[self.urls[i]] for i in shard_ids)
        samples = self._decoded(raw, cursor, pass_size, stats)
        rng = np.random.default_rng([self.seed, epoch, split, _STREAM_FLIP])
        if self.train:
            rng.random(done * self.batch_size)  # the flips of the batches before start: one draw per sample
        h, w = self.image_size
        for _ in range(split_quota(self.steps_per_epoch, self.num_splits_per_rank, local) - done):
            images = np.empty((self.batch_size, 3, h, w), np.uint8)
            labels = np.empty(self.batch_size, np.int64)
            keys = []
            for i in range(self.batch_size):
                key, image, labels[i], cursor = next(samples)
                if self.train and rng.random() < 0.5:
                    image = image[:, ::-1]
                images[i] = image.transpose(2, 0, 1)
                keys.append(key)
            yield {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels), "keys": keys,
                   "split": split, "cursor": cursor, "stats": dict(stats)}  # fmt: skip

    def _raw(self, epoch: int, split: int, shard_ids: list[int], stats: Counter[str]) -> Iterator[dict[str, Any]]:
        """Stages 2-3: the split's encoded samples in stream order, passing over its shards again and again."""
        for pass_index in itertools.count():
            rng = np.random.default_rng([self.seed, epoch, split, _STREAM_SHUFFLE, pass_index])
            order = shard_ids if pass_index == 0 or not self.train else rng.permutation(shard_ids).tolist()
            raw = self._read([self.urls[i] for i in order], stats)
            if self.train:
                raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
            count = 0
            for sample in raw:
                count += 1
                yield sample
            if count == 0:
                shards = ", ".join(self.urls[i] for i in shard_ids)
                raise ShardError(f"split {split} (rank {self.rank}): no readable samples in shards {shards}", shards)
            stats["wraps"] += 1
            logger.debug("split %d wraps around its %d shards (pass %d)", split, len(shard_ids), pass_index + 1)

    def _decoded(
        self, raw: Iterator[dict[str, Any]], cursor: int, pass_size: int, stats: Counter[str]
    ) -> Iterator[tuple[str, np.ndarray, int, int]]:
        """Stage 4: ``(key, image, label, cursor)``, where ``cursor`` counts the raw samples consumed so far."""
        bad_in_a_row = 0
        for sample in raw:
            cursor += 1
            label = parse_label(sample, self.num_classes)
            try:
                image = decode_image(sample, self.image_size)
            except ImageDecodeError as exn:
                if self.on_error == "fail":
                    raise
                stats["skipped_samples"] += 1
                logger.warning("skipping sample: %s", exn)
                bad_in_a_row += 1
                if bad_in_a_row > pass_size:  # a whole pass over the split's shards without one good image
                    raise ShardError(f"rank {self.rank}: no decodable image in a whole pass over its shards "
                                     f"(last: {exn})", exn.shard) from exn  # fmt: skip
                continue
            bad_in_a_row = 0
            stats["samples"] += 1
            yield sample["__key__"], image, label, cursor

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
