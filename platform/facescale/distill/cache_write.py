"""Writing a teacher-embedding cache: one shard's embeddings at a time, then the commit (``cache.json``, last).

The layout and the rules (whole files, the commit marker) are in :mod:`facescale.distill.cache`, which also reads
caches; :mod:`facescale.distill.cache_build` runs :func:`embed_shard` over the shards as Ray tasks and commits.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facescale.data.errors import ImageDecodeError
from facescale.data.manifest import Manifest
from facescale.data.shards import decode_image, iter_shard
from facescale.distill.cache import (
    BUILD_MARKER,
    CACHE_META,
    PARALLEL_READS,
    CacheMeta,
    TeacherCacheError,
    cache_uri,
    delete_files,
    is_s3,
    load_npz,
    missing_shards,
    shard_name,
    write_file,
)
from facescale.eval.verification import compute_embeddings


def write_shard(cache_dir: str | Path, shard_index: int, keys: list[str] | np.ndarray, embeddings: np.ndarray,
                skipped: int = 0) -> None:
    """Writes ``shard-<i>.npz`` whole: sample keys, their float16 embeddings, and how many samples were skipped."""
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.asarray(keys, dtype=str), embeddings=np.asarray(embeddings, dtype=np.float16),
             skipped=np.int64(skipped))  # fmt: skip
    write_file(cache_dir, shard_name(shard_index), buffer.getvalue())


def embed_shard(teacher: nn.Module, manifest: Manifest, shard_index: int, cache_dir: str | Path,
                batch_size: int = 128, device: torch.device | str = "cpu", on_error: str = "fail") -> tuple[int, int]:
    """Embeds every sample of one shard with the teacher and writes ``shard-<i>.npz`` whole.

    Args:
        teacher: The teacher backbone (put in eval mode here).
        manifest: The dataset manifest.
        shard_index: Index of the shard in ``manifest.shards``.
        cache_dir: Cache directory or ``s3://`` prefix.
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
    write_shard(cache_dir, shard_index, keys, emb, skipped)
    return len(keys), skipped


def shard_counts(cache_dir: str | Path, shard_index: int) -> tuple[int, int]:
    """``(embedded, skipped)`` of a shard file already written (local files: reads the keys only)."""
    with load_npz(cache_dir, shard_index) as part:
        return len(part["keys"]), int(part["skipped"])


def commit_cache(cache_dir: str | Path, teacher_model_id: str, manifest: Manifest, embedding_size: int,
                 counts: dict[int, tuple[int, int]] | None = None) -> CacheMeta:
    """Checks every shard file is there, then writes ``cache.json`` last: only now does the cache count as complete.

    Args:
        cache_dir: Cache directory or ``s3://`` prefix.
        teacher_model_id: Identity of the teacher.
        manifest: The dataset manifest.
        embedding_size: Teacher embedding size.
        counts: ``{shard: (embedded, skipped)}`` as ``embed_shard`` returned them; shards not in it are read back.

    Raises:
        TeacherCacheError: When a shard file is not visible here, e.g. a local ``cache_dir`` that Ray tasks on other
            nodes wrote to their own disks.
    """
    missing = missing_shards(cache_dir, len(manifest.shards))
    if missing:
        raise TeacherCacheError(f"teacher cache {cache_uri(cache_dir)}: shard files of shards {missing[:5]} are not "
                                "visible here after the build; a local cache directory must be a filesystem every "
                                "node mounts at that path (else use an s3:// cache_dir)")  # fmt: skip
    counts = dict(counts or {})
    todo = [i for i in range(len(manifest.shards)) if i not in counts]
    with ThreadPoolExecutor(PARALLEL_READS if is_s3(cache_dir) else 1) as pool:
        counts.update(zip(todo, pool.map(lambda i: shard_counts(cache_dir, i), todo)))
    meta = CacheMeta(teacher_model_id=teacher_model_id, dataset_digest=manifest.digest, embedding_size=embedding_size,
                     num_shards=len(manifest.shards), num_samples=sum(n for n, _ in counts.values()),
                     skipped_samples=sum(s for _, s in counts.values()))  # fmt: skip
    write_file(cache_dir, CACHE_META, json.dumps(meta.__dict__, indent=2).encode())  # the commit
    delete_files(cache_dir, [BUILD_MARKER])
    return meta
