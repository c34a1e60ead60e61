"""Builds the node-local shard cache (:mod:`facescale.data.shard_cache`) of a manifest whose shards are on S3.

The files to keep (each remote shard's tar and its DALI index) and their sizes come from one listing per prefix;
the directory is one per dataset content (the manifest digest), so datasets never share copies by name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from facescale.data.manifest import Manifest
from facescale.data.shard_cache import DEFAULT_PREFETCH_SHARDS, CachedFile, ShardCache, ShardCacheError

DEFAULT_CACHE_ROOT = "facescale-shards"  # under tempfile.gettempdir() when data.cache_dir is not set


def default_cache_dir(cache_dir: str | None, digest: str) -> Path:
    """``<cache_dir or <tempdir>/facescale-shards>/<digest[:16]>``: one directory per dataset content."""
    base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / DEFAULT_CACHE_ROOT
    return base / digest[:16]


def build_shard_cache(manifest: Manifest, index_urls: list[str], cache_dir: str | None, cache_bytes: int,
                      prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
                      observer: Callable[[int], None] | None = None) -> ShardCache:  # fmt: skip
    """The cache of a manifest's shards on S3 (and their indices), the files' sizes from one listing per prefix.

    Args:
        manifest: The ``Manifest`` (shard URLs, sha256s, digest).
        index_urls: The DALI index URL of each shard, in manifest order (``wds_index.ensure_indices``).
        cache_dir: ``data.cache_dir``; ``None`` for ``<tempdir>/facescale-shards``.
        cache_bytes: ``data.cache_bytes``.
        prefetch_shards: Shards fetched ahead of the one being read.
        observer: See ``ShardCache``.

    Raises:
        ShardCacheError: A shard or index is not on S3, the directory is not writable, or the budget too small.
    """
    from facescale import storage  # lazy: boto3 loads only when s3:// is used (DESIGN.md)

    urls, shards = manifest.shard_urls(), manifest.shards
    remote = [i for i, u in enumerate(urls) if storage.is_s3_url(u)]
    wanted = [u for i in remote for u in (urls[i], index_urls[i])]
    sizes: dict[str, int] = {}
    for prefix in sorted({u.rsplit("/", 1)[0] for u in wanted}):
        sizes.update({f"{prefix}/{name}": size for name, size in storage.list_objects(prefix).items()})
    names = [u.rsplit("/", 1)[1] for u in wanted]
    unique = len(set(names)) == len(names)
    files: dict[int, list[CachedFile]] = {}
    for i in remote:
        url, index_url = urls[i], index_urls[i]
        entry = []
        for u, sha in ((url, shards[i].sha256), (index_url, None)):
            if u not in sizes:
                raise ShardCacheError(f"shard {url}: {u} is not on S3 (manifest {manifest.root})")
            name = u.rsplit("/", 1)[1] if unique else f"{i:06d}-{u.rsplit('/', 1)[1]}"
            entry.append(CachedFile(name, u, sizes[u], sha))
        files[i] = entry
    root = default_cache_dir(cache_dir, manifest.digest)
    return ShardCache(root, files, cache_bytes, prefetch_shards, observer)
