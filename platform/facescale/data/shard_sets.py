"""Whole shard sets: push to and pull from S3, and DALI indices beside a local set (``facescale data index``).

A push uploads the shards and the other files beside the manifest first and ``manifest.json`` last, after removing
any remote manifest first: a reader never sees a manifest whose shards are not all there. A pull mirrors that
locally and checks every shard's sha256 against the manifest. The object store itself is ``facescale.storage``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from facescale import storage
from facescale.data.errors import DataError, ManifestError, ShardError
from facescale.data.manifest import MANIFEST_NAME, Manifest, load_manifest, parse_manifest, read_manifest_text
from facescale.data.wds_index import index_name, read_index_count, write_index
from facescale.storage import StorageError

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

logger = logging.getLogger(__name__)


def _s3() -> Any:
    from facescale.storage import s3  # boto3: only when a push or pull runs

    return s3


def _upload(path: Path, url: str, config: Any, bar: tqdm) -> None:
    _s3().upload_file(path, url, config, callback=bar.update)


def _download(url: str, path: Path, sha256: str | None, config: Any, bar: tqdm) -> None:
    _s3().download_file(url, path, config, callback=bar.update)
    if sha256 is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        path.unlink()
        raise StorageError(f"{url}: sha256 is {digest.hexdigest()}, the manifest says {sha256}", url)


def push(
    local_dir: str | os.PathLike[str],
    s3_url: str,
    *,
    transfer_config: TransferConfig | None = None,
    progress: bool = True,
) -> Manifest:
    """Upload a shard set (shards, the other files beside the manifest, then ``manifest.json``) to S3.

    Uploaded: every shard the manifest lists, and every other top-level file of ``local_dir`` that is not a
    ``.tar`` or ``.tmp`` (class maps, DALI index files, verification sets, conversion reports). Shards that the
    manifest does not list are left out. Large files go up in parallel multipart uploads.

    Args:
        local_dir: Directory holding ``manifest.json`` and its shards.
        s3_url: Destination prefix ``s3://bucket/prefix``.
        transfer_config: boto3 ``TransferConfig`` (default ``DEFAULT_TRANSFER``: 16 MiB parts, 4 threads a file).
        progress: Show a byte progress bar.

    Returns:
        The local manifest, with its root set to ``s3_url``.

    Raises:
        ManifestError: If the local manifest is missing or invalid, lists an absolute shard URL, or lists a shard
            that is not in ``local_dir``.
        StorageError: If an upload fails after retries (names the file and URL).
    """
    local_dir = Path(local_dir)
    manifest = load_manifest(local_dir)
    storage.split_s3_url(s3_url)
    shard_names = [s.url for s in manifest.shards] + _index_names(manifest)
    for name in shard_names:
        if "://" in name or os.path.isabs(name) or "/" in name:
            raise ManifestError(f"{local_dir / MANIFEST_NAME}: shard URL {name!r} is not a file name beside it")
        if not (local_dir / name).is_file():
            raise ManifestError(f"{local_dir / MANIFEST_NAME}: {local_dir / name} is missing", str(local_dir))
    listed = set(shard_names)
    extras = sorted(p.name for p in local_dir.iterdir() if p.is_file() and p.name != MANIFEST_NAME
                    and p.name not in listed and not p.name.endswith((".tar", ".tmp")))  # fmt: skip
    names = shard_names + extras
    # NOTE: retract the remote manifest first: while shards are being replaced, no reader may trust the old one.
    _s3().delete_object(storage.join(s3_url, MANIFEST_NAME))
    config = transfer_config or _s3().DEFAULT_TRANSFER
    total = sum((local_dir / n).stat().st_size for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"push {s3_url}", disable=not progress) as bar:
        with ThreadPoolExecutor(_s3().PARALLEL_FILES) as pool:
            futures = [pool.submit(_upload, local_dir / n, storage.join(s3_url, n), config, bar) for n in names]
            for future in futures:
                future.result()
        _upload(local_dir / MANIFEST_NAME, storage.join(s3_url, MANIFEST_NAME), config, bar)
    logger.info("pushed %d files (%d shards, %d bytes) to %s", len(names) + 1, len(manifest.shards), total, s3_url)
    return manifest.with_root(s3_url.rstrip("/"))


def _index_names(manifest: Manifest) -> list[str]:
    """DALI index files the manifest lists (``ShardInfo.index``; absent in manifests written before indices)."""
    return [index for s in manifest.shards if (index := getattr(s, "index", None))]


def pull(
    s3_url: str,
    local_dir: str | os.PathLike[str],
    *,
    transfer_config: TransferConfig | None = None,
    progress: bool = True,
) -> Manifest:
    """Download a shard set from S3: the manifest's shards (sha256-checked), the other files, then the manifest.

    Args:
        s3_url: Source prefix ``s3://bucket/prefix`` (or its ``manifest.json``).
        local_dir: Destination directory (created; a stale local ``manifest.json`` is removed first).
        transfer_config: boto3 ``TransferConfig`` for ranged parallel downloads (default ``DEFAULT_TRANSFER``).
        progress: Show a byte progress bar.

    Returns:
        The manifest, loaded from ``local_dir``.

    Raises:
        ManifestError: If there is no (complete) manifest at ``s3_url``.
        StorageError: If a download fails after retries, or a shard's sha256 disagrees with the manifest.
    """
    manifest_url, text = read_manifest_text(s3_url)
    prefix_url = manifest_url.rsplit("/", 1)[0]
    manifest = parse_manifest(text, manifest_url)
    for name in [s.url for s in manifest.shards] + _index_names(manifest):
        if "/" in name:
            raise ManifestError(f"{manifest_url}: shard URL {name!r} is not an object beside the manifest")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / MANIFEST_NAME).unlink(missing_ok=True)
    shards = {s.url: s.sha256 for s in manifest.shards} | dict.fromkeys(_index_names(manifest))
    extras = [n for n in _s3().list_names(prefix_url) if n != MANIFEST_NAME and n not in shards
              and not n.endswith((".tar", ".tmp"))]  # fmt: skip
    items = [(n, shards.get(n)) for n in [*shards, *extras]]
    config = transfer_config or _s3().DEFAULT_TRANSFER
    with tqdm(unit="B", unit_scale=True, desc=f"pull {prefix_url}", disable=not progress) as bar:
        with ThreadPoolExecutor(_s3().PARALLEL_FILES) as pool:
            futures = [pool.submit(_download, storage.join(prefix_url, name), local_dir / name, sha, config, bar)
                       for name, sha in items]  # fmt: skip
            for future in futures:
                future.result()
    tmp = local_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, local_dir / MANIFEST_NAME)  # last, so an interrupted pull never looks complete
    logger.info("pulled %d files (%d shards) from %s to %s", len(items) + 1, len(manifest.shards), prefix_url,
                local_dir)  # fmt: skip
    return load_manifest(local_dir)


def index_shard_set(root: str | os.PathLike[str], force: bool = False, progress: bool = True) -> list[Path]:
    """Write a DALI index beside every shard of a local shard set and record the names in its manifest.

    Args:
        root: Directory holding ``manifest.json`` and its shards.
        force: Rebuild indices that already exist.
        progress: Show a progress bar.

    Returns:
        The index paths, in manifest order.

    Raises:
        ManifestError: If the manifest cannot be loaded.
        ShardError: If a shard is remote or cannot be indexed, or an index disagrees with the manifest.
    """
    manifest = load_manifest(root)
    urls = manifest.shard_urls()
    written: list[Path] = []
    shards = []
    for info, url in tqdm(list(zip(manifest.shards, urls)), desc="index shards", unit="shard", disable=not progress):
        if "://" in url:
            raise ShardError(f"shard {url}: only local shard sets can be indexed; index before pushing", shard=url)
        path = Path(index_name(url))
        if force or not path.is_file():
            write_index(url, path)
        count = read_index_count(path)
        if count != info.num_samples:
            raise ShardError(f"shard {url}: index {path} lists {count} samples but manifest.json says "
                             f"{info.num_samples}; rebuild it with force", shard=url)  # fmt: skip
        written.append(path)
        shards.append(info.model_copy(update={"index": index_name(info.url)}))
    manifest.model_copy(update={"shards": shards}).save(Path(root) / MANIFEST_NAME)
    return written


def _cmd_index(args: argparse.Namespace) -> int:
    try:
        paths = index_shard_set(args.root, force=args.force)
    except (DataError, StorageError) as exn:
        print(f"facescale: {exn}", file=sys.stderr)
        return 1
    print(f"{len(paths)} DALI index files beside the shards of {args.root}; manifest.json lists them")
    return 0


def add_index_command(data: argparse._SubParsersAction) -> None:
    """Register ``facescale data index DIR`` under the ``data`` sub-command group.

    Args:
        data: The ``data`` group's sub-parsers (``add_subparsers`` result).
    """
    index = data.add_parser("index", help="write DALI index files beside the shards of a local shard set")
    index.add_argument("root", help="directory with manifest.json and its shards")
    index.add_argument("--force", action="store_true", help="rebuild index files that exist")
    index.set_defaults(func=_cmd_index)
