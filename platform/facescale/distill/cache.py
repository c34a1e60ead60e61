"""Teacher-embedding cache: the teacher's embedding of every training sample, computed once, keyed by sample key.

Every student generation of a pipeline distils from the same teacher on the same data, so the teacher's forward
passes are done once (in parallel, one Ray task per group of shards: ``facescale.distill.cache_build``) and each
generation only looks embeddings up -- a generation then costs what a plain student training costs.

A cache lives in a local directory (one that every node using it mounts at the same path) or under an
``s3://bucket/prefix`` (nodes that share no disk); the layout is the same:

    cache.json            teacher model id, dataset digest, embedding size, counts; written LAST (commit marker)
    building.json         while a build runs: its teacher and dataset (an interrupted build of the same resumes)
    shard-00000.npz       ``keys`` (str [n]) and ``embeddings`` (float16 [n, D]) of manifest shard 0, and so on

Local files are written atomically (temporary file, then rename); an S3 object is whole or absent by itself. A cache
without ``cache.json`` is never read.

The embedding of a sample is the L2-normalised sum of the teacher's embedding of the image and of its horizontal
flip -- the evaluation protocol's embedding (DESIGN.md). It does not change when the loader mirrors the image, so
one cached vector serves both orientations the student sees. Stored as float16: unit vectors lose < 1e-3 in any
component, far below what the angular loss resolves, and the cache is half the size (1 GB per million samples at
D = 512).

Each rank holds only the embeddings of the shards it reads (DESIGN.md, "each rank reads and holds its share"):
``TeacherCache.select(loader.local_shards(epoch))`` at each epoch start loads the shards newly needed and drops the
others, so per-rank memory grows with N / W.

A cache made by another teacher, for other data, or left half-built is detected by ``check_cache`` and rebuilt by
the builder (the pipeline's policy); a training run that opens a mismatched cache refuses to start.

This module holds the layout and the read side; the shard files and the commit are written by
:mod:`facescale.distill.cache_write`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from facescale import storage
from facescale.data.manifest import Manifest, load_manifest
from facescale.train.hooks import WorkerHooks

if TYPE_CHECKING:
    from facescale.config import FaceScaleConfig

log = logging.getLogger(__name__)

CACHE_META = "cache.json"
BUILD_MARKER = "building.json"  # teacher and dataset of a build in progress: its shard files may be kept
CACHE_FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"shard-\d{5,}\.npz")
PARALLEL_READS = 4  # shard objects fetched at once from S3


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used; the message names the directory and why."""


@dataclass(frozen=True)
class CacheMeta:
    """What a cache was made from; two caches are interchangeable when these agree."""

    teacher_model_id: str
    dataset_digest: str
    embedding_size: int
    num_shards: int
    num_samples: int = 0
    skipped_samples: int = 0
    format_version: int = CACHE_FORMAT_VERSION


# --- where a cache lives: a local directory or an s3:// prefix (facescale.storage) ---------------------------------


def is_s3(cache_dir: str | Path) -> bool:
    """Whether the cache lives in an object store (the builder then needs no shared directory)."""
    return storage.is_remote(cache_dir)


def cache_uri(cache_dir: str | Path) -> str:
    """The cache's location as one string: the ``s3://`` URL without a trailing ``/``, or the local path."""
    return str(cache_dir).rstrip("/") if storage.is_remote(cache_dir) else str(Path(cache_dir))


def shard_name(shard_index: int) -> str:
    """The file (object) name of manifest shard ``shard_index``'s embeddings."""
    return f"shard-{shard_index:05d}.npz"


def shard_file(cache_dir: str | Path, shard_index: int) -> str:
    """Path or URL of a shard's embedding file."""
    return _location(cache_dir, shard_name(shard_index))


def _location(cache_dir: str | Path, name: str) -> str:
    return storage.join(cache_uri(cache_dir), name)


def _read(cache_dir: str | Path, name: str) -> bytes | None:
    """A cache file's bytes, or None when it does not exist (an unreachable store raises ``StorageError``)."""
    try:
        return storage.read_bytes(_location(cache_dir, name))
    except OSError as exn:  # StorageError is an OSError too
        if storage.is_missing(exn):
            return None
        raise


def write_file(cache_dir: str | Path, name: str, data: bytes) -> None:
    """Writes a cache file whole (``facescale.storage.write_bytes``: never seen half-written)."""
    storage.write_bytes(_location(cache_dir, name), data)


def list_cache(cache_dir: str | Path) -> set[str]:
    """Names of the cache files present (``cache.json``, ``building.json``, shard files): one listing on S3."""
    names = storage.list_objects(cache_uri(cache_dir))
    return {n for n in names if n in (CACHE_META, BUILD_MARKER) or _SHARD_RE.fullmatch(n)}


def delete_files(cache_dir: str | Path, names: list[str]) -> None:
    storage.delete_objects(cache_uri(cache_dir), names)


# --- metadata, checks, build marker --------------------------------------------------------------------------


def read_meta(cache_dir: str | Path) -> CacheMeta | None:
    """The committed metadata of a cache, or None when the cache is absent or was never completed."""
    raw = _read(cache_dir, CACHE_META)
    if raw is None:
        return None
    try:
        return CacheMeta(**json.loads(raw))
    except (ValueError, TypeError) as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        where = _location(cache_dir, CACHE_META)
        raise TeacherCacheError(f"teacher cache {where}: unreadable metadata: {exn}") from exn


def check_cache(cache_dir: str | Path, teacher_model_id: str, manifest: Manifest) -> str | None:
    """Why the cache at ``cache_dir`` cannot serve this teacher and dataset, or None when it can."""
    meta = read_meta(cache_dir)
    if meta is None:
        return f"no complete cache at {cache_uri(cache_dir)}"
    if meta.format_version != CACHE_FORMAT_VERSION:
        return f"cache format {meta.format_version} != {CACHE_FORMAT_VERSION}"
    if meta.teacher_model_id != teacher_model_id:
        return f"made by teacher {meta.teacher_model_id}, not {teacher_model_id}"
    if meta.dataset_digest != manifest.digest:
        return f"made for dataset digest {meta.dataset_digest[:12]}, not {manifest.digest[:12]}"
    if meta.num_shards != len(manifest.shards):
        return f"holds {meta.num_shards} shards, the dataset has {len(manifest.shards)}"
    missing = missing_shards(cache_dir, meta.num_shards)
    if missing:
        return f"shard files missing for shards {missing[:5]}{'...' if len(missing) > 5 else ''}"
    return None


def missing_shards(cache_dir: str | Path, num_shards: int) -> list[int]:
    present = list_cache(cache_dir)
    return [i for i in range(num_shards) if shard_name(i) not in present]


def clear_cache(cache_dir: str | Path) -> None:
    """Removes the files a cache consists of (and nothing else there); the commit marker first."""
    names = list_cache(cache_dir)
    delete_files(cache_dir, [CACHE_META])  # NOTE: uncommitted first, so no reader trusts a cache losing its shards
    delete_files(cache_dir, sorted(names - {CACHE_META}))


def read_build_marker(cache_dir: str | Path) -> dict[str, Any] | None:
    """The teacher and dataset of the build in progress (``building.json``), or None."""
    raw = _read(cache_dir, BUILD_MARKER)
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None  # a torn marker: the build starts afresh


def write_build_marker(cache_dir: str | Path, teacher_model_id: str, dataset_digest: str) -> None:
    write_file(cache_dir, BUILD_MARKER, json.dumps({"teacher_model_id": teacher_model_id,
                                                "dataset_digest": dataset_digest}).encode())


def load_npz(cache_dir: str | Path, shard_index: int) -> Any:
    """The shard file as an open ``NpzFile`` (members load on access); TeacherCacheError when it is missing."""
    if is_s3(cache_dir):
        raw = _read(cache_dir, shard_name(shard_index))
        if raw is not None:
            return np.load(io.BytesIO(raw))
    elif Path(shard_file(cache_dir, shard_index)).is_file():
        return np.load(shard_file(cache_dir, shard_index))
    raise TeacherCacheError(f"teacher cache {cache_uri(cache_dir)}: {shard_name(shard_index)} is missing")


# --- read side ----------------------------------------------------------------------------------------------------


class TeacherCache:
    """Read side of a cache, opened by each training worker: ``lookup(keys)`` → teacher embeddings.

    It holds the embeddings of the shards selected (all of them unless ``shards`` says otherwise); ``select`` changes
    the selection at an epoch start. Keys are held as one sorted byte-string array (``np.searchsorted``), not a
    Python dict: ~(key length + 8) bytes per sample beside its ``2 * D`` bytes of embedding.

    Args:
        cache_dir: A complete cache: local directory or ``s3://`` prefix.
        dataset_root: The training data; the cache must have been made for its manifest digest.
        teacher_model_id: When given, the cache must have been made by this teacher.
        shards: Indices into ``manifest.shards`` to hold (``loader.local_shards(epoch)``); None holds every shard.

    Raises:
        TeacherCacheError: When the cache is incomplete or made for another dataset or teacher.
    """

    def __init__(self, cache_dir: str | Path, dataset_root: str | Path, teacher_model_id: str | None = None,
                 shards: Iterable[int] | None = None) -> None:  # fmt: skip
        self.cache_dir = cache_uri(cache_dir)
        manifest = load_manifest(dataset_root)
        meta = read_meta(self.cache_dir)
        if meta is None:
            raise TeacherCacheError(f"teacher cache {self.cache_dir} is incomplete or absent (no {CACHE_META})")
        problem = check_cache(self.cache_dir, teacher_model_id or meta.teacher_model_id, manifest)
        if problem:
            raise TeacherCacheError(f"teacher cache {self.cache_dir} cannot be used for {dataset_root}: {problem}")
        self.meta = meta
        self._parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (keys as bytes, float16 [n, D])
        self._index()
        self.select(range(meta.num_shards) if shards is None else shards)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def embedding_size(self) -> int:
        return self.meta.embedding_size

    @property
    def shards(self) -> list[int]:
        """The shards held now, in order."""
        return sorted(self._parts)

    def select(self, shard_ids: Iterable[int]) -> None:
        """Holds exactly the embeddings of ``shard_ids``: drops the others, then loads the ones newly needed.

        Raises:
            TeacherCacheError: A shard index outside the manifest, a missing or malformed shard file, or a sample key
                that two held shards share.
        """
        wanted = sorted({int(i) for i in shard_ids})
        bad = [i for i in wanted if not 0 <= i < self.meta.num_shards]
        if bad:
            raise TeacherCacheError(f"teacher cache {self.cache_dir}: no shards {bad[:5]} (it has "
                                    f"{self.meta.num_shards})")  # fmt: skip
        if wanted == self.shards:
            return
        for i in set(self._parts) - set(wanted):
            del self._parts[i]
        self._index()  # frees the old index before the new shards arrive: peak memory stays near one share
        new = [i for i in wanted if i not in self._parts]
        with ThreadPoolExecutor(PARALLEL_READS if is_s3(self.cache_dir) and len(new) > 1 else 1) as pool:
            self._parts.update(zip(new, pool.map(self._load, new)))
        self._index()
        log.debug("teacher cache %s: holding %d of %d shards (%d samples)", self.cache_dir, len(self._parts),
                  self.meta.num_shards, len(self._keys))  # fmt: skip

    def _load(self, shard_index: int) -> tuple[np.ndarray, np.ndarray]:
        with load_npz(self.cache_dir, shard_index) as part:
            keys, emb = part["keys"], part["embeddings"]
        if len(keys) == 0:
            emb = np.zeros((0, self.embedding_size), np.float16)
        if emb.shape != (len(keys), self.embedding_size) or emb.dtype != np.float16:
            raise TeacherCacheError(f"teacher cache {shard_file(self.cache_dir, shard_index)}: embeddings "
                                    f"{emb.dtype} {emb.shape}, expected float16 ({len(keys)}, {self.embedding_size})")
        return np.char.encode(keys, "utf-8"), emb

    def _index(self) -> None:
        """Rebuilds the sorted key index over the held shards: key -> (slot of its shard, row in that shard)."""
        order = sorted(self._parts)
        self._emb = [self._parts[i][1] for i in order]
        sizes = [len(self._parts[i][0]) for i in order]
        keys = np.concatenate([self._parts[i][0] for i in order]) if order else np.empty(0, "S1")
        slot = np.repeat(np.arange(len(order), dtype=np.int32), sizes)
        row = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]) if order else np.empty(0, np.int32)
        sort = np.argsort(keys, kind="stable")
        self._keys, self._slot, self._row = keys[sort], slot[sort], row[sort]
        same = np.flatnonzero(self._keys[1:] == self._keys[:-1])
        if len(same):
            a, b = sort[same[0]], sort[same[0] + 1]
            raise TeacherCacheError(f"teacher cache {self.cache_dir}: sample key {self._keys[same[0]].decode()!r} "
                                    f"is in shards {order[slot[a]]} and {order[slot[b]]}; keys must be unique")

    def lookup(self, keys: Iterable[str]) -> torch.Tensor:
        """float32 ``[B, D]`` unit teacher embeddings of the samples ``keys``.

        Raises:
            TeacherCacheError: Naming the first sample whose key the held shards do not have.
        """
        keys = list(keys)
        out = np.empty((len(keys), self.embedding_size), np.float16)
        if not keys:
            return torch.from_numpy(out).float()
        query = np.array([k.encode("utf-8") for k in keys])
        pos = np.searchsorted(self._keys, query)
        found = pos < len(self._keys)
        found[found] = self._keys[pos[found]] == query[found]
        if not found.all():
            missing = keys[int(np.argmin(found))]
            held = "" if len(self._parts) == self.meta.num_shards else (
                f" in the {len(self._parts)} of {self.meta.num_shards} shards it holds")  # fmt: skip
            raise TeacherCacheError(f"teacher cache {self.cache_dir} has no embedding for sample {missing!r}{held}")
        slots, rows = self._slot[pos], self._row[pos]
        for s in np.unique(slots):
            mask = slots == s
            out[mask] = self._emb[s][rows[mask]]
        return torch.from_numpy(out).float()


def open_teacher(cfg: FaceScaleConfig, shards: list[int]) -> TeacherCache:
    """Opens ``distill.teacher_cache`` for a training worker, holding the embeddings of ``shards`` (the hook).

    Raises:
        ValueError: When the cache's embeddings are not ``model.embedding_size``-d.
    """
    teacher = TeacherCache(cfg.distill.teacher_cache, cfg.data.root, shards=shards)
    if teacher.embedding_size != cfg.model.embedding_size:
        raise ValueError(f"distill.teacher_cache: teacher embeddings are {teacher.embedding_size}-d, "
                         f"model.embedding_size is {cfg.model.embedding_size}")
    return teacher


def teacher_hooks(cfg: FaceScaleConfig, base: WorkerHooks | None = None) -> WorkerHooks | None:
    """The loop hooks of a run: ``base`` plus the teacher reader when ``distill.teacher_cache`` is set.

    Raises:
        FileNotFoundError: When the cache there is not complete (no ``cache.json``), before any worker starts.
    """
    cache = cfg.distill.teacher_cache
    if not cache:
        return base
    if read_meta(cache) is None:  # a local directory or an s3:// prefix
        raise FileNotFoundError(f"distill.teacher_cache: {cache} is not a complete teacher cache (no cache.json)")
    return dataclasses.replace(base or WorkerHooks(), open_teacher=open_teacher)
