"""DALI training loader: the ``FaceLoader`` batch contract on NVIDIA DALI (CPU decode here, nvJPEG on GPUs).

The pipeline, as explicit stages (DALI pipelines in ``dali_batch``; stages 2 and 3 in ``dali_stages``):

1. **Read** (CPU): the shard order is permuted by ``(seed, epoch)`` (the same on every rank); each rank reads the
   contiguous range ``[n * rank // W, n * (rank + 1) // W)`` of the samples in that order (split by sample, so no
   rank needs a whole tar of its own) with ``fn.readers.webdataset`` over its own shards, index files trimmed where
   the range starts or ends inside one, through a seeded ``random_shuffle`` buffer that drains at the end of what
   the reader reads. Local shards: one reader per epoch. Shards on ``s3://``: one reader per shard over its
   node-local copy (``shard_cache``: fetched ahead, evicted behind under ``data.cache_bytes``), so the buffer mixes
   within a shard (shards are shuffled when written). Out: JPEG, ``.cls`` bytes, ``source_info`` (carries the key).
2. **Check** (Python, per read batch, no decode): keys and shards from ``source_info``, labels checked as the
   torch loader checks them (vectorised), each JPEG header parsed (``simplejpeg.decode_jpeg_header``, ~2 us) and its
   size compared with the manifest's; a mirror coin per sample from a ``(seed, epoch, rank)`` generator.
3. **Decode** (one pipeline for the loader's life, reset per epoch): ``external_source`` → ``fn.decoders.image``;
   ``mixed`` (nvJPEG): ``fn.crop_mirror_normalize`` (mirror, CHW, uint8) into a torch tensor on the GPU; ``cpu``:
   mirror and CHW by one host copy into a torch tensor (pinned when CUDA is available), the fastest on CPU. The
   training device normalises (``data.transforms.normalize_images``). A whole read batch is handed over to DALI as
   its own ``TensorListCPU``.

**Why readers are built per epoch (or per shard).** ``fn.readers.webdataset`` takes its files, their order and its
shuffle seed when it is built, and opens every file and parses every index then; ``reset()`` cannot give it a new
order or seed. So a new ``(seed, epoch)`` shard order is a new reader, and a reader over cached copies can only be
built once they are on disk. The decode pipeline depends on none of that.

**Epoch policy.** ``steps_per_epoch = manifest.num_samples // (world_size * batch_size)`` as in the torch loader;
every rank yields exactly that many batches of exactly ``batch_size``. A rank's range holds at least
``steps_per_epoch * batch_size`` samples; the rest of it (fewer than ``batch_size + 1``) waits for another epoch,
which reads a differently ordered range. A rank that needs more samples (skipped ones) reads its range again.

**Resume.** The position is ``(epoch, step, raw cursor)``: the cursor counts the encoded samples stage 1 delivered
to this rank, skipped ones included. A restart runs stage 1 alone up to the cursor (no decode; shards wholly
before it are not read, nor fetched) and goes on.

**Error policy.** Labels: always an error naming shard and key. Images: stage 2 catches an unparsable header or a
wrong size (skip and count under ``on_error="skip"``, ``ImageDecodeError`` under ``"fail"``). DALI's decoder
cannot skip an image: a JPEG with a valid header but a broken body fails the whole decode pipeline. The loader
then finds the sample (from DALI's message, else by decoding the batch with simplejpeg); under ``"fail"`` it raises
``ImageDecodeError`` naming shard and key, under ``"skip"`` it counts it, rebuilds the decode pipeline and re-feeds
the batches in flight without it. A missing or unreadable shard fails the reader (``ShardError``).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facescale.data.dali_batch import (
    DecodePipeline,
    build_reader,
    range_parts,
    shutdown,
    write_trimmed_index,
)
from facescale.data.dali_stages import CheckAndDecode
from facescale.data.errors import DataError, ShardError
from facescale.data.loader import DEFAULT_SHUFFLE_BUFFER, OnError, position_record, resume_cursors
from facescale.data.manifest import Manifest, load_manifest
from facescale.data.shard_cache import DEFAULT_PREFETCH_SHARDS, ShardCache
from facescale.data.shard_cache_build import build_shard_cache
from facescale.data.wds_index import ensure_indices, read_index_count

logger = logging.getLogger(__name__)

_TAG_READER, _TAG_FLIP = 11, 12  # seed-stream tags, distinct from the torch loader's


class DaliFaceLoader(CheckAndDecode):
    """``FaceLoader`` on DALI; build it with ``facescale.data.build_train_loader`` or ``build_dali_loader``.

    Args:
        manifest: The shard set.
        index_paths: One DALI index per shard, in manifest order (see ``wds_index.ensure_indices``).
        prefetch: Batches each DALI pipeline prepares ahead.
        shard_cache: Node-local copies of the remote (``s3://``) shards; required when there are any.
        **others: As ``build_dali_loader`` says.
    """

    fallback_reason: str | None = None  # the factory's: why this is not the loader asked for (None: it is)

    def __init__(self, manifest: Manifest, index_paths: list[str], batch_size: int, rank: int, world_size: int,
                 seed: int, num_threads: int = 2, decode_device: str = "cpu", device_id: int | None = None,
                 on_error: OnError = "fail", train: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 prefetch: int = 2, shard_cache: ShardCache | None = None,
                 pin_memory: bool | None = None) -> None:  # fmt: skip
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
        n = manifest.num_samples  # as DALI's `Loader::start_index` splits: the range sizes differ by <= 1
        self.range_size = n * (rank + 1) // world_size - n * rank // world_size
        self._urls = manifest.shard_urls()
        if shard_cache is None and any("://" in u for u in self._urls):
            raise ValueError("remote shards are read from node-local copies: pass a shard_cache (build_dali_loader)")
        self.shard_cache = shard_cache
        self.pin_memory = (torch.cuda.is_available() if pin_memory is None else pin_memory) and decode_device == "cpu"
        self._stats: Counter[str] = Counter()
        self._position = position_record(self._fingerprint, 0, 0, {})
        self._generation = 0  # epochs started: an older epoch's generator must not touch the decode pipeline
        self._decoder = DecodePipeline(batch_size, self.num_threads, device_id if decode_device == "mixed" else None,
                                       prefetch, manifest.image_size, self.pin_memory)  # fmt: skip
        self._source_urls: dict[str, str] = {}  # cached copy -> shard URL, for errors
        self._checked_indices: set[int] = set()
        self._scratch = Path(tempfile.mkdtemp(prefix="facescale-dali-"))  # trimmed index files
        self._finalizer = weakref.finalize(self, _close, os.getpid(), self._decoder, self._scratch, shard_cache)

    @property
    def stats(self) -> dict[str, int]:
        """Counters over all epochs so far: samples (fed to the decoder), skipped_samples, fast_forwarded, wraps.

        ``skipped_samples`` counts the bad images stage 2 met; it checks whole read batches, so at the end of an
        epoch it may count one in the read batch after the last sample used.
        """
        return {"samples": 0, "skipped_samples": 0, "skipped_shards": 0, "wraps": 0, **self._stats}

    @property
    def _fingerprint(self) -> dict[str, Any]:
        per_shard = {"reader": "per-shard"} if self.shard_cache is not None else {}  # another shuffle, other cursors
        return {"loader": "dali", "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "seed": self.seed, "train": self.train, "digest": self.manifest.digest, **per_shard}  # fmt: skip

    def close(self) -> None:
        """Stop the decode pipeline's threads, remove scratch files, close the shard cache (also done on GC)."""
        self._finalizer()

    def local_shards(self, epoch: int) -> list[int]:
        """Indices into ``manifest.shards`` that this rank reads in ``epoch`` (the teacher embeddings it holds).

        Stage 1 reads the shards in the ``(seed, epoch)`` order as one sample sequence, and this rank reads only its
        range ``[n * rank // W, n * (rank + 1) // W)`` of it (again, if it needs more samples), never another
        rank's. So the shards are those whose samples, placed in that order by the manifest's counts, overlap it.
        """
        return sorted(shard for shard, _, _ in self._range_parts(epoch))

    def _shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order stage 1 reads them in ``epoch``: the same permutation on every rank."""
        n = len(self._urls)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)

    def _range_parts(self, epoch: int) -> list[tuple[int, int, int]]:
        """``(shard, begin, end)`` pieces of this rank's range in ``epoch``, in reading order."""
        order = self._shard_order(epoch)
        counts = np.array([self.manifest.shards[i].num_samples for i in order], dtype=np.int64)
        total = self.manifest.num_samples
        return range_parts(order, counts, total * self.rank // self.world_size,
                           total * (self.rank + 1) // self.world_size)  # fmt: skip

    def local_position(self) -> dict[str, Any]:
        """This rank's position after the last batch yielded: epoch, step and raw cursor."""
        return {**self._position, "cursors": dict(self._position["cursors"])}

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield exactly ``steps_per_epoch`` batches: ``uint8 [B, 3, H, W]`` images and ``int64 [B]`` labels."""
        for images, labels, _ in self.epoch_samples(epoch):
            yield images, labels

    def epoch_samples(
        self, epoch: int, start_step: int = 0, resume: dict[str, Any] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Yield ``(images, labels, keys)`` for steps ``start_step ..  steps_per_epoch - 1`` of ``epoch``.

        One epoch at a time: starting another ends this one (resuming it then raises ``RuntimeError``).

        Args:
            epoch: The epoch.
            start_step: First step to yield; earlier samples run through stage 1 only (read, never decoded).
            resume: ``local_position()`` saved at ``(epoch, start_step)``: its cursor also accounts for samples
                skipped before the restart.
        """
        self._generation += 1
        generation = self._generation
        start_step = min(max(start_step, 0), self.steps_per_epoch)
        cursor = resume_cursors(resume, self._fingerprint, epoch, start_step).get(0, start_step * self.batch_size)
        self._position = position_record(self._fingerprint, epoch, start_step, {0: cursor})
        if start_step == self.steps_per_epoch:
            return
        raw = self._read(epoch, cursor)
        try:
            yield from self._decode(self._checked(raw, cursor), self.steps_per_epoch - start_step, generation)
        finally:
            raw.close()  # stops the read pipeline now, also when the consumer leaves the epoch early

    # -- stage 1 ---------------------------------------------------------------------------------------------------

    def _read(self, epoch: int, cursor: int) -> Iterator[tuple[Any, ...]]:
        """Stage 1, per read batch: ``(jpegs, cls, cls source_info, jpeg source_info, mirrors, cursors)``.

        Whole batches (and whole shards) before raw position ``cursor`` are skipped here. ``cls`` and
        ``source_info`` come zero-padded to one width per batch (numpy); the JPEG ``source_info`` stays a DALI
        batch, read only for a sample without ``.cls``; ``cursors`` are the raw positions (1-based) of the samples.
        """
        parts = self._range_parts(epoch)
        chunks = [parts] if self.shard_cache is None else [[part] for part in parts]
        depth = self.shard_cache.prefetch_shards if self.shard_cache is not None else 0
        flips = np.random.default_rng([self.seed, epoch, self.rank, _TAG_FLIP])
        position = 0
        for pass_index in itertools.count():
            self._stats["wraps"] += int(pass_index > 0)  # a rank that skipped samples reads its range again
            for c, chunk in enumerate(chunks):
                size = sum(end - begin for _, begin, end in chunk)
                if position + size <= cursor:  # before the restart point: neither read nor fetched
                    if self.train:
                        flips.random(size)  # their mirror coins
                    position += size
                    self._stats["fast_forwarded"] += size
                    continue
                if self.shard_cache is not None:
                    self.shard_cache.prefetch(shard for later in chunks[c + 1 : c + 1 + depth] for shard, _, _ in later)
                # (the first reader's seed is the one a single reader per epoch always had: same order as before)
                key = [self.seed, epoch, self.rank, _TAG_READER] + ([pass_index, c] if pass_index or c else [])
                reader_seed = int(np.random.default_rng(key).integers(2**31 - 1))
                held: list[int] = []
                pipe = None
                try:
                    pipe = self._reader(*self._chunk_files(chunk, held), reader_seed, min(self.shuffle_buffer, size))
                    remaining = size
                    while remaining:
                        try:
                            jpegs, cls, info, jpeg_info = pipe.run()
                        except RuntimeError as exn:
                            raise ShardError(f"rank {self.rank}: DALI reader failed on {self.manifest.root}: {exn}",
                                             self.manifest.root) from exn  # fmt: skip
                        # The reader goes round its files to fill the last batch: keep what is in this chunk.
                        n = min(len(jpegs), remaining)
                        remaining -= n
                        previous, position = position, position + n
                        mirrors = (flips.random(n) < 0.5).astype(np.int32) if self.train else np.zeros(n, np.int32)
                        if position <= cursor:  # fast-forward a whole batch: nothing is copied out or decoded
                            self._stats["fast_forwarded"] += n
                            continue
                        cursors = np.arange(previous + 1, position + 1)
                        yield jpegs, cls.as_array()[:n], info.as_array()[:n], jpeg_info, mirrors, cursors
                finally:
                    if pipe is not None:
                        shutdown(pipe)
                    for shard in held:
                        self.shard_cache.release(shard)  # type: ignore[union-attr]

    def _chunk_files(self, chunk: list[tuple[int, int, int]], held: list[int]) -> tuple[list[str], list[str]]:
        """Tar and index paths of a chunk's pieces: cached copies of remote shards, trimmed indices at range edges."""
        paths, indices = [], []
        for shard, begin, end in chunk:
            tar, index = self._urls[shard], self.index_paths[shard]
            count = self.manifest.shards[shard].num_samples
            if "://" in tar:
                assert self.shard_cache is not None
                tar, index = self.shard_cache.acquire(shard)
                held.append(shard)
                self._source_urls[tar] = self._urls[shard]
                if shard not in self._checked_indices:  # a local index is checked when the loader is built
                    if (listed := read_index_count(index)) != count:
                        raise ShardError(f"shard {self._urls[shard]}: index {self.index_paths[shard]} lists {listed} "
                                         f"samples but manifest.json says {count}", self._urls[shard])  # fmt: skip
                    self._checked_indices.add(shard)
            if (begin, end) != (0, count):
                index = write_trimmed_index(index, begin, end, self._scratch / f"{shard}-{begin}-{end}.idx")
            paths.append(tar)
            indices.append(index)
        return paths, indices

    def _reader(self, paths: list[str], indices: list[str], seed: int, fill: int) -> Any:
        try:
            return build_reader(paths, indices, self.batch_size, self.prefetch, self.train, seed, fill)
        except RuntimeError as exn:
            raise ShardError(f"rank {self.rank}: DALI cannot open the shards of {self.manifest.root}: {exn}",
                             self.manifest.root) from exn  # fmt: skip


_FORKED_LEFTOVERS: list[Any] = []


def _close(pid: int, decoder: DecodePipeline, scratch: Path, shard_cache: ShardCache | None) -> None:
    if os.getpid() != pid:  # a forked child collecting its copy of a loader: keep it (see dali_batch.shutdown)
        _FORKED_LEFTOVERS.append((decoder, shard_cache))
        return
    decoder.close()
    shutil.rmtree(scratch, ignore_errors=True)
    if shard_cache is not None:
        shard_cache.close()


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
    cache_dir: str | None = None,
    cache_bytes: int = 20 << 30,
    prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
    pin_memory: bool | None = None,
) -> DaliFaceLoader:
    """Build the DALI loader of one rank (see the module docstring for stages, epoch, resume and error policy).

    Missing index files of local shards are built beside the shards first (or under ``index_cache_dir`` where the
    shard directory is read-only; default ``$XDG_CACHE_HOME/facescale/wds_index``). Shards on ``s3://`` are read
    from node-local copies under ``cache_dir`` (see ``shard_cache``); their index files must be on S3 beside them.

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
        cache_dir: ``data.cache_dir``: node-local directory for copies of remote shards (default under the tempdir).
        cache_bytes: ``data.cache_bytes``: the byte budget of that directory.
        prefetch_shards: Remote shards fetched ahead of the one being read.
        pin_memory: CPU-decoded batches in pinned memory (default: when CUDA is available).

    Returns:
        The loader.

    Raises:
        ManifestError: If the manifest cannot be loaded.
        ShardError: If an index is missing for a remote shard or disagrees with the manifest.
        ShardCacheError: Remote shards, and ``cache_dir`` is not writable or ``cache_bytes`` too small.
        DataError: If an epoch would have no step.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    manifest = root_or_manifest if isinstance(root_or_manifest, Manifest) else load_manifest(root_or_manifest)
    cache = index_cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facescale/wds_index"
    index_paths = ensure_indices(manifest, cache_dir=cache)
    remote = any("://" in u for u in manifest.shard_urls())
    shard_cache = build_shard_cache(manifest, index_paths, cache_dir, cache_bytes, prefetch_shards) if remote else None
    return DaliFaceLoader(manifest, index_paths, batch_size, rank, world_size, seed, num_threads=num_threads,
                          decode_device=decode_device, device_id=device_id, on_error=on_error, train=train,
                          shuffle_buffer=shuffle_buffer, shard_cache=shard_cache,
                          pin_memory=pin_memory)  # fmt: skip
