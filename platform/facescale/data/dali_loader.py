"""DALI training loader: the ``FaceLoader`` batch contract on NVIDIA DALI (CPU decode here, nvJPEG on GPUs).

The pipeline, as explicit stages:

1. **Read** (DALI pipeline, CPU): ``fn.readers.webdataset`` over the manifest's shards and their index files. The
   shard order is permuted by ``(seed, epoch)`` (the same on every rank); ``shard_id=rank, num_shards=world_size``
   then give each rank a contiguous range of ``num_samples / world_size`` samples (DALI splits by sample, so no
   rank needs a whole tar of its own); a seeded ``random_shuffle`` buffer mixes the range. DALI's buffer drains at
   the end of its range, so within an epoch no sample repeats. Outputs the encoded JPEG, the ``.cls`` bytes and
   ``source_info`` (``tar:offset:member``, which carries the sample key).
2. **Check** (Python, per read batch, no decode): keys and shards from ``source_info``, labels checked as the
   torch loader checks them (vectorised), each JPEG header parsed (``simplejpeg.decode_jpeg_header``, ~2 us) and its
   size compared with the manifest's; a mirror coin per sample from a ``(seed, epoch, rank)`` generator.
3. **Decode** (DALI pipeline): ``external_source`` → ``fn.decoders.image`` (``cpu``, or ``mixed`` = nvJPEG on a GPU)
   → ``fn.crop_mirror_normalize`` (mirror, ``(x - 127.5) / 127.5``, CHW float32) → ``DALIGenericIterator`` →
   torch tensors. A clean read batch is handed over as DALI's own ``TensorListCPU``, with no per-sample Python
   copy; only after a skipped sample or a restart mid-batch are batches assembled from per-sample views.

**Epoch policy.** ``steps_per_epoch = manifest.num_samples // (world_size * batch_size)`` as in the torch loader;
every rank yields exactly that many batches of exactly ``batch_size``. A rank's range holds at least
``steps_per_epoch * batch_size`` samples; the rest of it (fewer than ``batch_size + 1``) waits for another epoch,
which reads a differently ordered range. Keys are always delivered (``epoch_samples``).

**Resume.** The position is ``(epoch, step, raw cursor)``: the cursor counts the encoded samples stage 1 delivered
to this rank, skipped ones included. A restart runs stage 1 alone up to the cursor (no decode) and goes on.

**Error policy.** Labels: always an error naming shard and key. Images: stage 2 catches an unparsable header or a
wrong size (skip and count under ``on_error="skip"``, ``ImageDecodeError`` under ``"fail"``). DALI's decoder
cannot skip an image: a JPEG with a valid header but a broken body (truncated) fails the whole decode pipeline.
The loader then finds the sample (DALI names its index in the batch; otherwise each sample of the batch is
decoded with simplejpeg), and under ``"fail"`` raises ``ImageDecodeError`` naming shard and key; under ``"skip"``
it counts it, rebuilds the decode pipeline, and re-feeds the batches that were in flight without it. A missing
or unreadable shard fails the read pipeline (``ShardError``): DALI's reader cannot skip one.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from facescale.data.dali_batch import (
    EncodedBatch,
    dali_error_line,
    failed_index,
    header_problem,
    parse_labels,
    parse_source_infos,
)
from facescale.data.errors import DataError, ImageDecodeError, ShardError
from facescale.data.loader import (
    DEFAULT_SHUFFLE_BUFFER,
    PIXEL_MEAN,
    PIXEL_STD,
    OnError,
    position_record,
    resume_cursors,
)
from facescale.data.shards import Manifest, load_manifest
from facescale.data.wds_index import ensure_indices

logger = logging.getLogger(__name__)

_TAG_READER, _TAG_FLIP = 11, 12  # seed-stream tags, distinct from the torch loader's


class DaliFaceLoader:
    """``FaceLoader`` on DALI; build it with ``facescale.data.build_train_loader`` or directly.

    Args:
        manifest: The shard set (local shards, or remote ones whose indices the manifest lists).
        index_paths: One DALI index per shard, in manifest order (see ``wds_index.ensure_indices``).
        batch_size: Samples per batch on this rank.
        rank: This rank.
        world_size: Number of ranks.
        seed: Seed of shard order, shuffle buffer and mirror coins.
        num_threads: DALI decode threads.
        decode_device: ``"cpu"`` or ``"mixed"`` (nvJPEG; needs ``device_id``).
        device_id: CUDA device of the decode pipeline; ``None`` for CPU decoding.
        on_error: ``"fail"`` or ``"skip"`` for corrupt or wrongly sized images.
        train: Shuffle and mirror; ``False`` reads in manifest order without mirroring.
        shuffle_buffer: Samples in DALI's shuffle buffer (``initial_fill``).
        prefetch: Batches each DALI pipeline prepares ahead.
    """

    def __init__(self, manifest: Manifest, index_paths: list[str], batch_size: int, rank: int, world_size: int,
                 seed: int, num_threads: int = 2, decode_device: str = "cpu", device_id: int | None = None,
                 on_error: OnError = "fail", train: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 prefetch: int = 2) -> None:  # fmt: skip
        if decode_device not in ("cpu", "mixed"):
            raise ValueError(f"decode_device must be 'cpu' or 'mixed', got {decode_device!r}")
        if decode_device == "mixed" and device_id is None:
            raise ValueError("decode_device='mixed' decodes on a GPU: pass its device_id")
        self.manifest, self.index_paths = manifest, index_paths
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_threads, self.decode_device, self.device_id = max(1, num_threads), decode_device, device_id
        self.on_error, self.train, self.shuffle_buffer, self.prefetch = on_error, train, shuffle_buffer, prefetch
        self.steps_per_epoch = manifest.num_samples // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{manifest.root}: {manifest.num_samples} samples are fewer than world_size * "
                            f"batch_size = {world_size} * {batch_size}; an epoch would have no step")  # fmt: skip
        # DALI `Loader::start_index`: shard i of n starts at floor(size * i / n); the range sizes differ by <= 1.
        n = manifest.num_samples
        self.range_size = n * (rank + 1) // world_size - n * rank // world_size
        self._urls = manifest.shard_urls()
        self._stats: Counter[str] = Counter()
        self._position = position_record(self._fingerprint, 0, 0, {})

    @property
    def stats(self) -> dict[str, int]:
        """Counters over all epochs so far: samples (fed to the decoder), skipped_samples, fast_forwarded, wraps.

        ``skipped_samples`` counts the bad images stage 2 met; it checks whole read batches, so at the end of an
        epoch it may count one in the read batch after the last sample used.
        """
        return {"samples": 0, "skipped_samples": 0, "skipped_shards": 0, "wraps": 0, **self._stats}

    @property
    def _fingerprint(self) -> dict[str, Any]:
        return {"loader": "dali", "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "seed": self.seed, "train": self.train, "digest": self.manifest.digest}  # fmt: skip

    def local_shards(self, epoch: int) -> list[int]:
        """Indices into ``manifest.shards`` that this rank reads in ``epoch`` (the teacher embeddings it holds).

        Stage 1 reads the shards in the ``(seed, epoch)`` order as one sample sequence, and this rank reads only its
        range ``[n * rank // W, n * (rank + 1) // W)`` of it: the shuffle buffer fills from the range, and a rank that
        needs more samples (skipped ones) starts its range again (``stick_to_shard``), never another rank's. So the
        shards are those whose samples, placed in that order by the manifest's per-shard counts, overlap the range.
        """
        order = self._shard_order(epoch)
        counts = np.array([self.manifest.shards[i].num_samples for i in order], dtype=np.int64)
        ends = np.cumsum(counts)
        n = self.manifest.num_samples
        first, last = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        overlap = (ends - counts < last) & (ends > first) & (counts > 0)
        return sorted(order[overlap].tolist())

    def _shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order stage 1 reads them in ``epoch``: the same permutation on every rank."""
        n = len(self._urls)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)

    def local_position(self) -> dict[str, Any]:
        """This rank's position after the last batch yielded: epoch, step and raw cursor."""
        return {**self._position, "cursors": dict(self._position["cursors"])}

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly ``steps_per_epoch`` batches: ``float32 [B, 3, H, W]`` in ``[-1, 1]`` and ``int64 [B]``."""
        for images, labels, _ in self.epoch_samples(epoch):
            yield images, labels

    def epoch_samples(
        self, epoch: int, start_step: int = 0, resume: dict[str, Any] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Yield ``(images, labels, keys)`` for steps ``start_step ..  steps_per_epoch - 1`` of ``epoch``.

        Args:
            epoch: The epoch.
            start_step: First step to yield; earlier samples run through stage 1 only (read, never decoded).
            resume: ``local_position()`` saved at ``(epoch, start_step)``: its cursor also accounts for samples
                skipped before the restart.
        """
        start_step = min(max(start_step, 0), self.steps_per_epoch)
        cursor = resume_cursors(resume, self._fingerprint, epoch, start_step).get(0, start_step * self.batch_size)
        self._position = position_record(self._fingerprint, epoch, start_step, {0: cursor})
        if start_step == self.steps_per_epoch:
            return
        raw = self._read(epoch, cursor)
        try:
            yield from self._decode(self._checked(raw, cursor), self.steps_per_epoch - start_step)
        finally:
            raw.close()  # stops the read pipeline now, also when the consumer leaves the epoch early

    # -- stage 1 ---------------------------------------------------------------------------------------------------

    def _read(self, epoch: int, cursor: int) -> Iterator[tuple[Any, ...]]:
        """Stage 1, per read batch: ``(jpegs, cls, cls source_info, jpeg source_info, mirrors, cursors)``.

        Whole batches before raw position ``cursor`` are skipped here. ``cls`` and ``source_info`` come zero-padded
        to one width per batch (numpy); the JPEG ``source_info`` stays a DALI batch, read only for a sample without
        ``.cls``; ``cursors`` are the raw positions (1-based) of the samples.
        """
        order = self._shard_order(epoch)
        reader_seed = int(np.random.default_rng([self.seed, epoch, self.rank, _TAG_READER]).integers(2**31 - 1))
        paths, indices = [self._urls[i] for i in order], [self.index_paths[i] for i in order]

        @pipeline_def(batch_size=self.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=self.prefetch,
                      exec_dynamic=True)  # fmt: skip
        def read_graph():  # type: ignore[no-untyped-def]
            jpeg, cls = fn.readers.webdataset(
                paths=paths, index_paths=indices, ext=["jpg", "cls"], missing_component_behavior="empty",
                shard_id=self.rank, num_shards=self.world_size, stick_to_shard=True, random_shuffle=self.train,
                # A buffer larger than the rank's range only makes the reader go round the range to fill it.
                initial_fill=max(1, min(self.shuffle_buffer, self.range_size)), seed=reader_seed, name="reader",
                # NOTE: DALI keeps the files it mmaps in a process-wide cache keyed by path, so a shard rewritten
                # in place would be read stale by the next pipeline of this process; plain reads cost ~nothing here.
                dont_use_mmap=True,
            )  # fmt: skip
            # Padded to one width per batch, so Python reads each as one array instead of sample by sample.
            info = fn.pad(fn.get_property(cls, key="source_info"), fill_value=0)
            jpeg_info = fn.pad(fn.get_property(jpeg, key="source_info"), fill_value=0)  # names a sample without .cls
            return jpeg, fn.pad(cls, fill_value=0), info, jpeg_info

        pipe = read_graph()
        try:
            try:
                pipe.build()
            except RuntimeError as exn:
                raise ShardError(f"rank {self.rank}: DALI cannot open the shards of {self.manifest.root}: {exn}",
                                 self.manifest.root) from exn  # fmt: skip
            flips = np.random.default_rng([self.seed, epoch, self.rank, _TAG_FLIP])
            position = 0
            while True:
                try:
                    jpegs, cls, info, jpeg_info = pipe.run()
                except RuntimeError as exn:
                    raise ShardError(f"rank {self.rank}: DALI reader failed on {self.manifest.root}: {exn}",
                                     self.manifest.root) from exn  # fmt: skip
                n, previous = len(jpegs), position
                position += n
                mirrors = (flips.random(n) < 0.5).astype(np.int32) if self.train else np.zeros(n, np.int32)
                # Skipped samples can make a rank read past its range; DALI then starts the range again.
                self._stats["wraps"] += (position - 1) // self.range_size - max(previous - 1, 0) // self.range_size
                if position <= cursor:  # fast-forward a whole batch: nothing is copied out or decoded
                    self._stats["fast_forwarded"] += n
                    continue
                cursors = np.arange(previous + 1, position + 1)
                yield jpegs, cls.as_array(), info.as_array(), jpeg_info, mirrors, cursors
        finally:
            _shutdown(pipe)

    # -- stage 2 ---------------------------------------------------------------------------------------------------

    def _checked(self, raw: Iterator[tuple[Any, ...]], cursor: int) -> Iterator[EncodedBatch]:
        """Stage 2: labels checked, headers parsed; bad images skipped or raised per ``on_error``.

        Samples at raw positions up to ``cursor`` (the part of a read batch before a restart point) are dropped.
        """
        size = tuple(self.manifest.image_size)
        bad_in_a_row = 0
        for jpegs, cls, infos, jpeg_infos, mirrors, cursors in raw:
            keys, shards = parse_source_infos(infos)
            if not all(keys):  # a sample without .cls has no cls source_info: name it from its .jpg
                named = parse_source_infos(jpeg_infos.as_array())
                keys, shards = [k or named[0][i] for i, k in enumerate(keys)], [
                    s or named[1][i] for i, s in enumerate(shards)]  # fmt: skip
            old = int(np.searchsorted(cursors, cursor, side="right"))  # samples at or before the restart point
            self._stats["fast_forwarded"] += old
            labels = parse_labels(cls[old:], keys[old:], shards[old:], self.manifest.num_classes)
            batch = EncodedBatch(jpegs, keys, shards, np.concatenate([np.zeros(old, np.int64), labels]), mirrors,
                                 cursors)  # fmt: skip
            keep = []
            for i in range(old, len(batch)):
                problem = header_problem(np.asarray(jpegs[i]), size)
                if problem is None:
                    keep.append(i)
                    bad_in_a_row = 0
                else:
                    error = ImageDecodeError(f"shard {shards[i]}: sample {keys[i]!r} {problem}", shards[i], keys[i])
                    if self.on_error == "fail":
                        raise error
                    self._skip(error)
                    bad_in_a_row += 1
                    if bad_in_a_row > self.range_size:
                        raise ShardError(f"rank {self.rank}: no decodable image in a whole pass over its samples "
                                         f"(last: {error})", shards[i]) from error  # fmt: skip
            yield batch if len(keep) == len(batch) else batch.select(keep)

    def _skip(self, error: ImageDecodeError) -> None:
        self._stats["skipped_samples"] += 1
        logger.warning("skipping sample: %s", error)

    # -- stage 3 ---------------------------------------------------------------------------------------------------

    def _decode(self, batches: Iterator[EncodedBatch], num_batches: int) -> Iterator[
            tuple[torch.Tensor, torch.Tensor, list[str]]]:  # fmt: skip
        """Stage 3: decode, mirror and normalise ``num_batches`` batches in DALI; yield them as torch tensors."""
        carry: list[EncodedBatch] = []  # checked samples not yet fed, in order (leftovers of partial read batches)
        in_flight: deque[EncodedBatch] = deque()  # batches fed to DALI and not yet yielded, oldest first
        delivered = 0

        def feed() -> tuple[Any, np.ndarray]:
            if delivered + len(in_flight) >= num_batches:
                raise StopIteration
            if not carry:
                batch = next(batches)
                if len(batch) == self.batch_size:  # the usual case: one whole read batch, handed over as is
                    in_flight.append(batch)
                    self._stats["samples"] += len(batch)
                    return batch.jpegs, batch.mirrors
                carry.append(batch)
            while sum(len(b) for b in carry) < self.batch_size:
                carry.append(next(batches))
            joined = EncodedBatch.concat(carry)
            batch = joined.select(range(self.batch_size))
            carry[:] = [joined.select(range(self.batch_size, len(joined)))] if len(joined) > self.batch_size else []
            in_flight.append(batch)
            self._stats["samples"] += len(batch)
            return batch.jpegs, batch.mirrors

        pipe, iterator = self._decode_iterator(feed)
        try:
            while delivered < num_batches:
                try:
                    out = next(iterator)
                except StopIteration:
                    raise AssertionError(f"decode stage ended after {delivered} of {num_batches} batches") from None
                except RuntimeError as exn:  # DALI: the whole decode pipeline fails on one undecodable image
                    self._recover(exn, in_flight, carry)
                    _shutdown(pipe)
                    pipe, iterator = self._decode_iterator(feed)
                    continue
                batch = in_flight.popleft()
                delivered += 1
                self._position["step_in_epoch"] += 1
                self._position["cursors"] = {"0": int(batch.cursors[-1])}
                yield out[0]["images"], torch.from_numpy(batch.labels), batch.keys
        finally:
            _shutdown(pipe)

    def _decode_iterator(self, feed: Any) -> tuple[Any, DALIGenericIterator]:
        mixed = self.decode_device == "mixed"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)  # fmt: skip
        def decode_graph():  # type: ignore[no-untyped-def]
            jpegs, mirror = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
            images = fn.decoders.image(jpegs, device="mixed" if mixed else "cpu", output_type=types.RGB)
            # NOTE: (x - 127.5) / 127.5 as InsightFace arcface_torch normalises (see loader.PIXEL_MEAN).
            return fn.crop_mirror_normalize(images, mirror=mirror, mean=[PIXEL_MEAN] * 3, std=[PIXEL_STD] * 3,
                                            dtype=types.FLOAT, output_layout="CHW")  # fmt: skip

        pipe = decode_graph()
        return pipe, DALIGenericIterator([pipe], ["images"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                         auto_reset=False, prepare_first_batch=False)  # fmt: skip

    def _recover(self, exn: RuntimeError, in_flight: deque[EncodedBatch], carry: list[EncodedBatch]) -> None:
        """Name the sample that failed the decode pipeline; under ``skip``, re-queue the in-flight ones without it."""
        if not in_flight:
            raise exn
        batch = in_flight[0]  # DALI reports errors in order: the failing iteration is the oldest one in flight
        bad = failed_index(exn, batch)
        if bad is None:
            shards = sorted(set(batch.shards))
            raise ImageDecodeError(f"rank {self.rank}: DALI could not decode a batch from shards {shards} and no "
                                   f"sample of it fails alone: {exn}", shards[0]) from exn  # fmt: skip
        key, shard = batch.keys[bad], batch.shards[bad]
        error = ImageDecodeError(f"shard {shard}: sample {key!r}: corrupt JPEG (DALI's decoder: {dali_error_line(exn)} "
                                 "of its batch)", shard, key)  # fmt: skip
        if self.on_error == "fail":
            raise error from exn
        self._skip(error)
        # Everything in flight goes back in order, before the leftovers; undelivered samples are counted when re-fed.
        self._stats["samples"] -= sum(len(b) for b in in_flight)
        pending = [batch.select([i for i in range(len(batch)) if i != bad]), *list(in_flight)[1:], *carry]
        in_flight.clear()
        carry[:] = [b for b in pending if len(b)]


def _shutdown(pipe: Any) -> None:
    """Stop a DALI pipeline's threads now (DALI's own ``__del__`` and atexit hook call the same method)."""
    # NOTE: a DALI pipeline sits in reference cycles (graph nodes <-> pipeline, callbacks), so dropping it stops its
    # threads only at the next garbage collection. A fork in that window (a DataLoader worker, a Ray task) copies
    # mutexes those threads hold, and the child can hang on one; seen in tests that fork after a DALI epoch.
    shutdown = getattr(pipe, "_shutdown", None)
    if shutdown is not None:
        shutdown()


def build_dali_loader(
    root_or_manifest: str | os.PathLike[str] | Manifest,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_threads: int = 2,
    decode_device: str = "cpu",
    device_id: int | None = None,
    on_error: OnError = "fail",
    train: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    index_cache_dir: str | os.PathLike[str] | None = None,
) -> DaliFaceLoader:
    """Build the DALI loader of one rank (see the module docstring for stages, epoch, resume and error policy).

    Missing index files of local shards are built beside the shards first (or under ``index_cache_dir`` where the
    shard directory is read-only; default ``$XDG_CACHE_HOME/facescale/wds_index``).

    Args:
        root_or_manifest: Dataset directory, ``manifest.json`` path, or a ``Manifest`` that knows its root.
        batch_size: Samples per batch on this rank.
        rank: This rank, in ``[0, world_size)``.
        world_size: Number of ranks.
        seed: Seed of shard order, shuffle buffer and mirror coins.
        num_threads: DALI decode threads.
        decode_device: ``"cpu"`` (libjpeg-turbo) or ``"mixed"`` (nvJPEG on GPU ``device_id``).
        device_id: CUDA device index for ``"mixed"``; ``None`` for ``"cpu"``.
        on_error: ``"fail"`` raises on a corrupt or wrongly sized image; ``"skip"`` skips and counts it.
        train: Shuffle and mirror; ``False`` reads in manifest order without mirroring.
        shuffle_buffer: Samples in DALI's shuffle buffer.
        index_cache_dir: Fallback directory for index files.

    Returns:
        The loader.

    Raises:
        ManifestError: If the manifest cannot be loaded.
        ShardError: If an index is missing for a remote shard or disagrees with the manifest.
        DataError: If an epoch would have no step.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    manifest = root_or_manifest if isinstance(root_or_manifest, Manifest) else load_manifest(root_or_manifest)
    cache = index_cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facescale/wds_index"
    index_paths = ensure_indices(manifest, cache_dir=cache)
    return DaliFaceLoader(manifest, index_paths, batch_size, rank, world_size, seed, num_threads=num_threads,
                          decode_device=decode_device, device_id=device_id, on_error=on_error, train=train,
                          shuffle_buffer=shuffle_buffer)  # fmt: skip
