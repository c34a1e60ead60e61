"""Teacher-embedding cache: the teacher's embedding of every training sample, computed once, keyed by sample key.

Every student generation of a pipeline distils from the same teacher on the same data, so the teacher's forward
passes are done once (in parallel, one Ray task per group of shards: ``facescale.train.teacher_cache``) and each
generation only looks embeddings up -- a generation then costs what a plain student training costs.

Layout of a cache directory:

    cache.json            teacher model id, dataset digest, embedding size, counts; written LAST (commit marker)
    building.json         while a build runs: its teacher and dataset (an interrupted build of the same resumes)
    shard-00000.npz       ``keys`` (str [n]) and ``embeddings`` (float16 [n, D]) of manifest shard 0, and so on

The embedding of a sample is the L2-normalised sum of the teacher's embedding of the image and of its horizontal
flip -- the evaluation protocol's embedding (DESIGN.md). It does not change when the loader mirrors the image, so
one cached vector serves both orientations the student sees. Stored as float16: unit vectors lose < 1e-3 in any
component, far below what the angular loss resolves, and the cache is half the size (1 GB per million samples at
D = 512).

A cache made by another teacher, for other data, or left half-built is detected by ``check_cache`` and rebuilt by
the builder (the pipeline's policy); a training run that opens a mismatched cache refuses to start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facescale.data.errors import ImageDecodeError
from facescale.data.shards import Manifest, decode_image, iter_shard, load_manifest
from facescale.eval.verification import compute_embeddings

log = logging.getLogger(__name__)

CACHE_META = "cache.json"
BUILD_MARKER = "building.json"  # teacher and dataset of a build in progress: its shard files may be kept
CACHE_FORMAT_VERSION = 1


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


def shard_file(cache_dir: str | Path, shard_index: int) -> Path:
    return Path(cache_dir) / f"shard-{shard_index:05d}.npz"


def read_meta(cache_dir: str | Path) -> CacheMeta | None:
    """The committed metadata of a cache, or None when the cache is absent or was never completed."""
    path = Path(cache_dir) / CACHE_META
    if not path.is_file():
        return None
    try:
        return CacheMeta(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exn:
        raise TeacherCacheError(f"teacher cache {path}: unreadable metadata: {exn}") from exn


def check_cache(cache_dir: str | Path, teacher_model_id: str, manifest: Manifest) -> str | None:
    """Why the cache at ``cache_dir`` cannot serve this teacher and dataset, or None when it can."""
    meta = read_meta(cache_dir)
    if meta is None:
        return f"no complete cache at {cache_dir}"
    if meta.format_version != CACHE_FORMAT_VERSION:
        return f"cache format {meta.format_version} != {CACHE_FORMAT_VERSION}"
    if meta.teacher_model_id != teacher_model_id:
        return f"made by teacher {meta.teacher_model_id}, not {teacher_model_id}"
    if meta.dataset_digest != manifest.digest:
        return f"made for dataset digest {meta.dataset_digest[:12]}, not {manifest.digest[:12]}"
    if meta.num_shards != len(manifest.shards):
        return f"holds {meta.num_shards} shards, the dataset has {len(manifest.shards)}"
    missing = [i for i in range(meta.num_shards) if not shard_file(cache_dir, i).is_file()]
    if missing:
        return f"shard files missing for shards {missing[:5]}{'...' if len(missing) > 5 else ''}"
    return None


def clear_cache(cache_dir: str | Path) -> None:
    """Removes the files a cache consists of (and nothing else in the directory)."""
    cache_dir = Path(cache_dir)
    (cache_dir / CACHE_META).unlink(missing_ok=True)
    (cache_dir / BUILD_MARKER).unlink(missing_ok=True)
    for path in cache_dir.glob("shard-*.npz"):
        path.unlink()


def embed_shard(teacher: nn.Module, manifest: Manifest, shard_index: int, cache_dir: str | Path,
                batch_size: int = 128, device: torch.device | str = "cpu", on_error: str = "fail") -> tuple[int, int]:
    """Embeds every sample of one shard with the teacher and writes ``shard-<i>.npz`` atomically.

    Args:
        teacher: The teacher backbone (put in eval mode here).
        manifest: The dataset manifest.
        shard_index: Index of the shard in ``manifest.shards``.
        cache_dir: Cache directory.
        batch_size: Images per forward pass.
        device: Where the teacher runs.
        on_error: ``"skip"`` leaves a corrupt image out (the training loader skips it too), ``"fail"`` raises.

    Returns:
        ``(embedded, skipped)`` sample counts.
    """
    url = manifest.shard_urls()[shard_index]
    keys: list[str] = []
    images: list[np.ndarray] = []
    skipped = 0
    for sample in iter_shard(url):
        try:
            images.append(decode_image(sample, manifest.image_size))
        except ImageDecodeError:
            if on_error == "fail":
                raise
            skipped += 1
            continue
        keys.append(sample["__key__"])
    teacher.eval()
    with torch.no_grad():
        emb = compute_embeddings(teacher, np.stack(images), batch_size, device) if images else np.zeros((0, 0))
    target = shard_file(cache_dir, shard_index)
    tmp = target.with_name(target.name + ".tmp.npz")
    np.savez(tmp, keys=np.asarray(keys, dtype=str), embeddings=emb.astype(np.float16), skipped=np.int64(skipped))
    os.replace(tmp, target)  # a shard file is either complete or absent
    return len(keys), skipped


def commit_cache(cache_dir: str | Path, teacher_model_id: str, manifest: Manifest, embedding_size: int) -> CacheMeta:
    """Counts the shard files and writes ``cache.json`` last: only now does the cache count as complete."""
    num_samples = skipped = 0
    for i in range(len(manifest.shards)):
        with np.load(shard_file(cache_dir, i)) as part:  # npz members load lazily: the keys only
            num_samples += len(part["keys"])
            skipped += int(part["skipped"])
    meta = CacheMeta(teacher_model_id=teacher_model_id, dataset_digest=manifest.digest, embedding_size=embedding_size,
                     num_shards=len(manifest.shards), num_samples=num_samples, skipped_samples=skipped)
    path = Path(cache_dir) / CACHE_META
    tmp = path.with_name(CACHE_META + ".tmp")
    tmp.write_text(json.dumps(meta.__dict__, indent=2))
    os.replace(tmp, path)
    return meta


class TeacherCache:
    """Read side of a cache, opened by each training worker: ``lookup(keys)`` → teacher embeddings.

    Args:
        cache_dir: A complete cache directory.
        dataset_root: The training data; the cache must have been made for its manifest digest.
        teacher_model_id: When given, the cache must have been made by this teacher.

    Raises:
        TeacherCacheError: When the cache is incomplete or made for another dataset or teacher.
    """

    def __init__(self, cache_dir: str | Path, dataset_root: str | Path, teacher_model_id: str | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        manifest = load_manifest(dataset_root)
        meta = read_meta(self.cache_dir)
        if meta is None:
            raise TeacherCacheError(f"teacher cache {self.cache_dir} is incomplete or absent (no {CACHE_META})")
        problem = check_cache(self.cache_dir, teacher_model_id or meta.teacher_model_id, manifest)
        if problem:
            raise TeacherCacheError(f"teacher cache {self.cache_dir} cannot be used for {dataset_root}: {problem}")
        self.meta = meta
        parts = [np.load(shard_file(self.cache_dir, i)) for i in range(meta.num_shards)]
        self._embeddings = torch.from_numpy(np.concatenate([p["embeddings"] for p in parts]).astype(np.float16))
        keys = np.concatenate([p["keys"] for p in parts])
        self._rows = {str(k): i for i, k in enumerate(keys.tolist())}
        if len(self._rows) != len(keys):
            raise TeacherCacheError(f"teacher cache {self.cache_dir}: sample keys are not unique")

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def embedding_size(self) -> int:
        return self.meta.embedding_size

    def lookup(self, keys: Iterable[str]) -> torch.Tensor:
        """float32 ``[B, D]`` unit teacher embeddings of the samples ``keys``."""
        try:
            rows = [self._rows[k] for k in keys]
        except KeyError as exn:
            missing = exn.args[0]
            raise TeacherCacheError(f"teacher cache {self.cache_dir} has no embedding for sample {missing!r}") from None
        return self._embeddings[rows].float()

