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

import itertools
import json
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
DEFAULT_SHUFFLE_BUFFER = 2000  # samples per split, still encoded (~5 kB each at 112x112); open_clip uses 1000-5000
_STREAM_SHUFFLE, _STREAM_FLIP = 0, 1


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
