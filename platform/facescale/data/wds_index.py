"""DALI index files for WebDataset shards: written with the shards, or built later for shard sets without them.

DALI's ``fn.readers.webdataset`` seeks straight to each sample when it has an index file; without one it scans every
tar at pipeline start. The format is the one DALI's ``wds2idx`` tool writes (version ``v1.2``)::

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member_name> [<ext> <data_offset> <size> <member_name> ...]   one line per sample

Offsets are byte offsets of a member's data (after its 512-byte header) inside the tar. Members are grouped into
samples the way webdataset and ``wds2idx`` group them: consecutive regular files whose names agree up to the first
``.`` of the last path component. The index of ``shard-000000.tar`` is ``shard-000000.idx`` beside it.

This module reads tar headers with ``tarfile`` (it seeks over member data, so indexing reads a few kB per sample),
and does not need DALI installed: shards written on a machine without DALI still get their indices. Its output is
byte-identical to DALI's ``wds2idx.IndexCreator`` (DALI 2.4) on FaceScale shards (tests/test_dali_loader.py compares
them), but that tool is not used here, for what it lacks (each checked against DALI 2.4's ``wds2idx.py``):

* correct offsets for GNU long names: it takes offsets from ``tar --list --block-num``, which reports the
  ``././@LongLink`` header of a member in a GNU-format tar, so the member's offset points at a header, not its data;
* errors: a truncated tar is indexed as far as ``tar`` listed it, without an error (its exit status is not read),
  a member name with whitespace is written and splits its index line, and the index file is opened for writing
  before the tar is read (a failed run leaves an empty index); here each is a ``ShardError`` and the write atomic;
* a name without an extension: its ``split_name`` gives key ``name[:-1]``; here the key is the whole name;
* streams: it reads a local path through the ``tar`` program (two processes per shard), never an ``s3://`` object
  -- neither does this module: a remote shard set must carry its indices (``facescale data index`` before pushing).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from facescale.data.errors import ShardError

logger = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"  # DALI `tools/wds2idx.py`, `IndexCreator.index_file_version`
INDEX_SUFFIX = ".idx"


def index_name(shard_name: str) -> str:
    """File name (or URL) of the index of ``shard_name``: its ``.tar`` suffix replaced by ``.idx``."""
    return (shard_name[: -len(".tar")] if shard_name.endswith(".tar") else shard_name) + INDEX_SUFFIX


def split_member(name: str) -> tuple[str, str]:
    """``(sample key, extension)`` of a tar member name, as DALI's webdataset reader and ``wds2idx`` split it.

    The split is at the first dot of the last path component; a name without one is all key (extension ``""``).
    This is the one copy of DALI's rule (``dali_batch`` takes sample keys from it). The torch loader's reader
    (``tar_reader``) uses webdataset's own ``base_plus_ext``, which agrees on every ``<key>.<ext>`` name a FaceScale
    writer produces but skips names without an extension and some hidden files.
    """
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_text(shard_path: str | os.PathLike[str]) -> tuple[str, int]:
    """Build the DALI index of one local tar shard.

    Args:
        shard_path: Path of the tar file.

    Returns:
        ``(index file text, number of samples)``.

    Raises:
        ShardError: If the tar cannot be read, a member name holds whitespace (the index is space separated), or
            the tar holds no sample; names the shard.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    try:
        with tarfile.open(shard_path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_member(member.name)
                if not key or key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
                    continue  # hidden files and names without a key: skipped by DALI's reader too
                if any(c.isspace() for c in member.name):
                    raise ShardError(f"shard {shard_path}: member {member.name!r} has whitespace in its name, which a "
                                     "DALI index cannot hold", str(shard_path), key)  # fmt: skip
                component = (ext, member.offset_data, member.size, member.name)
                if key != last_key:
                    samples.append([component])
                    last_key = key
                else:
                    samples[-1].append(component)
    except (OSError, tarfile.TarError) as exn:
        raise ShardError(f"shard {shard_path}: cannot index: {exn}", shard=str(shard_path)) from exn
    if not samples:
        raise ShardError(f"shard {shard_path}: no samples to index", shard=str(shard_path))
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    return "\n".join(lines) + "\n", len(samples)


def write_index(shard_path: str | os.PathLike[str], index_path: str | os.PathLike[str] | None = None) -> Path:
    """Write the DALI index of a local shard (atomically: temporary file, then rename); returns its path.

    Raises:
        ShardError: See ``index_text``; or the index cannot be written.
    """
    index_path = Path(index_path) if index_path is not None else Path(index_name(str(shard_path)))
    text, _ = index_text(shard_path)
    # NOTE: several ranks may build the same missing index at once; a rename makes the last writer win whole.
    tmp = index_path.with_name(f"{index_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, index_path)
    except OSError as exn:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"shard {shard_path}: cannot write index {index_path}: {exn}", str(shard_path)) from exn
    return index_path


def read_index_count(index_path: str | os.PathLike[str]) -> int:
    """Number of samples an index file declares (its header line).

    Raises:
        ShardError: If the file is unreadable or its header is not ``v1.2 <count>``; names the index file.
    """
    try:
        with open(index_path) as f:
            header = f.readline().split()
    except (OSError, UnicodeDecodeError) as exn:
        raise ShardError(f"index {index_path}: cannot read: {exn}", shard=str(index_path)) from exn
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardError(f"index {index_path}: header {' '.join(header)!r} is not '{INDEX_VERSION} <num_samples>'",
                         shard=str(index_path))  # fmt: skip
    return int(header[1])


def ensure_indices(manifest: Any, cache_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> list[str]:
    """Index paths for every shard of a local manifest, building the missing ones.

    An index is looked up where the manifest says (``ShardInfo.index``), then beside its shard. A missing one is
    built beside the shard and cached there; if that directory is not writable, under ``cache_dir``. Every index is
    checked against the manifest's per-shard sample count, so a stale index is an error, never a silent misread.

    Args:
        manifest: A ``Manifest`` that knows its root; its shards must be local files.
        cache_dir: Where to put indices that cannot be written beside their shard (default: no fallback).
        progress: Show a progress bar while building.

    Returns:
        One index path per shard, in manifest order.

    Raises:
        ShardError: A shard is remote and has no index, an index disagrees with the manifest, or building fails.
    """
    urls = manifest.shard_urls()
    paths: list[str] = []
    missing: list[int] = []
    for i, (info, url) in enumerate(zip(manifest.shards, urls)):
        listed = getattr(info, "index", None)
        candidate = _resolve_beside(url, listed) if listed else index_name(url)
        if "://" in candidate or os.path.isfile(candidate):
            paths.append(candidate)
        elif "://" in url:
            raise ShardError(f"shard {url}: no DALI index ({candidate}); build one with `facescale data index` "
                             "before pushing the shard set", shard=url)  # fmt: skip
        else:
            paths.append(candidate)
            missing.append(i)
    if missing:
        logger.info("%s: building %d missing DALI index files", manifest.root, len(missing))
    for i in tqdm(missing, desc="index shards", unit="shard", disable=not progress):
        paths[i] = str(_build_cached(urls[i], paths[i], cache_dir))
    for info, url, path in zip(manifest.shards, urls, paths):
        if "://" in path:
            continue  # remote index: DALI reads it; its count is checked by DALI against the tar
        count = read_index_count(path)
        if count != info.num_samples:
            raise ShardError(f"shard {url}: index {path} lists {count} samples but manifest.json says "
                             f"{info.num_samples}; rebuild it with `facescale data index`", shard=url)  # fmt: skip
    return paths


def _resolve_beside(shard_url: str, name: str) -> str:
    if "://" in name or os.path.isabs(name):
        return name
    head = shard_url.rsplit("/", 1)[0] if "/" in shard_url else "."
    return f"{head}/{name}"


def _cache_path(shard: str, beside: str, cache_dir: str | os.PathLike[str]) -> Path:
    digest = hashlib.sha256(os.path.abspath(shard).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{digest}-{Path(beside).name}"


def _build_cached(shard: str, beside: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Write the index beside its shard; where that directory is read-only, under ``cache_dir`` instead."""
    if cache_dir is not None and _cache_path(shard, beside, cache_dir).is_file():
        return _cache_path(shard, beside, cache_dir)
    try:
        return write_index(shard, beside)
    except ShardError as exn:
        if cache_dir is None or not isinstance(exn.__cause__, OSError):
            raise
        cached = _cache_path(shard, beside, cache_dir)
        cached.parent.mkdir(parents=True, exist_ok=True)
        logger.warning("cannot write %s (%s); caching the index at %s", beside, exn.__cause__, cached)
        return write_index(shard, cached)
