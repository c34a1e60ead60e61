"""Shard sets on S3 (``s3://bucket/prefix/``) through boto3: streaming reads, multipart uploads, push and pull.

This is the only module of ``facescale.data`` that imports boto3 (DESIGN.md); ``shards.py`` calls into it lazily for
``s3://`` URLs, so the torch loader streams shards straight from S3.

Where things come from (nothing is configured here that boto3 already resolves):

- **Credentials**: boto3's standard chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE`` and ``~/.aws/{credentials,config}``, web identity (EKS IRSA), container and instance metadata.
- **Endpoint**: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the AWS config file), which
  botocore honours natively since 1.31 (boto3 1.28); this is how MinIO, Ceph or a test server are reached.
- **Retries**: botocore's ``standard`` retry mode (exponential backoff with jitter, base 1 s, capped at 20 s, on
  throttling, 5xx and connection errors) with 8 attempts, unless ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` say
  otherwise. A read that breaks mid-stream (which botocore does not retry) is resumed here with a ranged GET
  pinned to the object's ETag, so a changed object is an error rather than a spliced stream.

A push uploads the shards and the other files beside the manifest first and ``manifest.json`` last, after removing
any remote manifest first: a reader never sees a manifest whose shards are not all there. A pull mirrors that
locally and checks every shard's sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from tqdm import tqdm

from facescale.data.errors import DataError, ManifestError
from facescale.data.shards import MANIFEST_NAME, Manifest, load_manifest, parse_manifest

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
DEFAULT_MAX_ATTEMPTS = 8
# S3 parts must be >= 5 MiB except the last (S3 API limits); 16 MiB parts keep a 1 GB shard at 64 parts, far below
# the 10,000-part limit, and let s3transfer upload 4 of them at once.
DEFAULT_TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
PARALLEL_FILES = 4  # files pushed or pulled at once; each may also use DEFAULT_TRANSFER's threads for its parts
_READ_RESUMES = 5  # how many times one stream may reconnect after a mid-stream failure
_STREAM_ERRORS = (
    botocore.exceptions.ConnectionError,  # includes ReadTimeoutError, ConnectionClosedError
    botocore.exceptions.HTTPClientError,  # includes ResponseStreamingError (urllib3 ProtocolError while reading)
    botocore.exceptions.IncompleteReadError,
    urllib3.exceptions.HTTPError,
    OSError,
)


class StorageError(DataError):
    """An object store request failed; the message names the URL.

    Args:
        message: What failed, naming the ``s3://`` URL.
        url: The URL concerned.
        code: The S3 error code (``NoSuchKey``, ``AccessDenied``, ...) when the service answered with one.
    """

    def __init__(self, message: str, url: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.code = code


def is_s3_url(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` is an ``s3://`` URL."""
    return str(url).startswith(S3_SCHEME)


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    Raises:
        StorageError: If the URL has no bucket.
    """
    if not is_s3_url(url):
        raise StorageError(f"not an s3:// URL: {url!r}", url)
    bucket, _, key = url[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"s3 URL without a bucket: {url!r}", url)
    return bucket, key


_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def s3_client() -> Any:
    """A boto3 S3 client for this process and the current ``AWS_*`` environment (cached).

    Clients are thread-safe but must not cross a fork, so the cache is keyed by process id; it is also keyed by the
    ``AWS_*`` environment so that a changed endpoint or credential takes effect.
    """
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    cache_key = (os.getpid(), env)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            retries = None
            if "AWS_RETRY_MODE" not in os.environ and "AWS_MAX_ATTEMPTS" not in os.environ:
                retries = {"mode": "standard", "max_attempts": DEFAULT_MAX_ATTEMPTS}
            config = botocore.config.Config(retries=retries, max_pool_connections=4 * PARALLEL_FILES)
            client = boto3.session.Session().client("s3", config=config)
            _clients[cache_key] = client
    return client


def _client_error(exn: Exception, what: str, url: str) -> StorageError:
    code = None
    if isinstance(exn, botocore.exceptions.ClientError):
        code = str(exn.response.get("Error", {}).get("Code", "")) or None
    return StorageError(f"{what} {url} failed{f' ({code})' if code else ''}: {exn}", url, code)


class S3ReadStream:
    """A readable stream of one S3 object that resumes with a ranged GET when the connection breaks.

    Args:
        url: ``s3://bucket/key`` of the object.
        client: boto3 S3 client (default: ``s3_client()``).

    Raises:
        StorageError: If the object cannot be opened (missing, forbidden, endpoint unreachable after retries).
    """

    def __init__(self, url: str, client: Any = None) -> None:
        self.url = url
        self.bucket, self.key = split_s3_url(url)
        self._client = client or s3_client()
        self.pos = 0
        self.resumes = 0
        response = self._get()
        self.etag: str = response["ETag"]
        self.size: int = response["ContentLength"]
        self._body = response["Body"]

    def _get(self, **range_args: str) -> dict[str, Any]:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self.key, **range_args)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exn:
            raise _client_error(exn, "reading", self.url) from exn

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes (all the rest for ``size < 0``); ``b""`` at the end of the object.

        Raises:
            StorageError: If the stream breaks more than ``_READ_RESUMES`` times, or the object changed meanwhile.
        """
        while True:
            try:
                data = self._body.read(None if size < 0 else size)
                self.pos += len(data)
                return data
            except _STREAM_ERRORS as exn:
                if self.resumes >= _READ_RESUMES:
                    raise StorageError(f"reading {self.url} broke at byte {self.pos}, {self.resumes} resumes: {exn}",
                                       self.url) from exn  # fmt: skip
                self.resumes += 1
                delay = min(20.0, 0.5 * 2**self.resumes) * random.uniform(0.5, 1.0)  # full-jitter-ish backoff
                logger.warning("%s: stream broke at byte %d (%s); resuming in %.1f s", self.url, self.pos, exn, delay)
                time.sleep(delay)
                self._body.close()
                # NOTE: If-Match pins the version we started reading; a changed object answers 412 -> StorageError.
                self._body = self._get(Range=f"bytes={self.pos}-", IfMatch=self.etag)["Body"]

    def readable(self) -> bool:
        """Always True (a file-like object that ``tarfile`` and ``io`` accept)."""
        return True

    def close(self) -> None:
        """Close the HTTP stream."""
        self._body.close()

    def __enter__(self) -> S3ReadStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_read(url: str) -> S3ReadStream:
    """Open ``s3://bucket/key`` for streaming reads (see ``S3ReadStream``)."""
    return S3ReadStream(url)


def read_bytes(url: str) -> bytes:
    """Read a whole ``s3://`` object."""
    with open_read(url) as stream:
        return stream.read()


def read_manifest_text(url: str) -> tuple[str, str]:
    """Read a manifest from S3.

    Args:
        url: ``s3://bucket/prefix/manifest.json`` or the prefix ``s3://bucket/prefix[/]``.

    Returns:
        ``(manifest URL, JSON text)``.

    Raises:
        ManifestError: If there is no manifest there (for instance a push that has not finished) or it is unreadable.
    """
    if not url.endswith(".json"):
        url = url.rstrip("/") + "/" + MANIFEST_NAME
    try:
        return url, read_bytes(url).decode("utf-8")
    except StorageError as exn:
        missing = exn.code in ("NoSuchKey", "404", "NoSuchBucket")
        what = "manifest file not found (or its push has not finished)" if missing else "cannot read manifest"
        raise ManifestError(f"{what}: {url}: {exn}", path=url) from exn
    except UnicodeDecodeError as exn:
        raise ManifestError(f"cannot read manifest {url}: {exn}", path=url) from exn


def _join(prefix_url: str, name: str) -> str:
    return prefix_url.rstrip("/") + "/" + name


def _upload(client: Any, path: Path, url: str, config: TransferConfig, bar: tqdm) -> None:
    bucket, key = split_s3_url(url)
    try:
        client.upload_file(str(path), bucket, key, Config=config, Callback=bar.update)
    except Exception as exn:  # botocore errors and s3transfer's S3UploadFailedError (which wraps them)
        raise _client_error(exn, f"uploading {path} to", url) from exn


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
    split_s3_url(s3_url)
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
    client = s3_client()
    bucket, prefix_key = split_s3_url(_join(s3_url, MANIFEST_NAME))
    # NOTE: retract the remote manifest first: while shards are being replaced, no reader may trust the old one.
    try:
        client.delete_object(Bucket=bucket, Key=prefix_key)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exn:
        raise _client_error(exn, "removing the old manifest", _join(s3_url, MANIFEST_NAME)) from exn
    config = transfer_config or DEFAULT_TRANSFER
    total = sum((local_dir / n).stat().st_size for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"push {s3_url}", disable=not progress) as bar:
        with ThreadPoolExecutor(PARALLEL_FILES) as pool:
            futures = [pool.submit(_upload, client, local_dir / n, _join(s3_url, n), config, bar) for n in names]
            for future in futures:
                future.result()
        _upload(client, local_dir / MANIFEST_NAME, _join(s3_url, MANIFEST_NAME), config, bar)
    logger.info("pushed %d files (%d shards, %d bytes) to %s", len(names) + 1, len(manifest.shards), total, s3_url)
    return manifest.with_root(s3_url.rstrip("/"))


def _index_names(manifest: Manifest) -> list[str]:
    """DALI index files the manifest lists (``ShardInfo.index``; absent in manifests written before indices)."""
    return [index for s in manifest.shards if (index := getattr(s, "index", None))]


def _list_names(client: Any, s3_url: str) -> list[str]:
    """Object names directly under the prefix (no deeper keys)."""
    bucket, key = split_s3_url(s3_url.rstrip("/") + "/")
    names = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            names += [obj["Key"][len(key) :] for obj in page.get("Contents", [])]
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exn:
        raise _client_error(exn, "listing", s3_url) from exn
    return names


def _download(client: Any, url: str, path: Path, sha256: str | None, config: TransferConfig, bar: tqdm) -> None:
    bucket, key = split_s3_url(url)
    tmp = path.with_name(path.name + ".tmp")
    try:
        client.download_file(bucket, key, str(tmp), Config=config, Callback=bar.update)
    except Exception as exn:  # botocore errors, and s3transfer's own for a failed part
        tmp.unlink(missing_ok=True)
        raise _client_error(exn, "downloading", url) from exn
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            tmp.unlink()
            raise StorageError(f"{url}: sha256 is {digest.hexdigest()}, the manifest says {sha256}", url)
    os.replace(tmp, path)


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
    client = s3_client()
    shards = {s.url: s.sha256 for s in manifest.shards} | dict.fromkeys(_index_names(manifest))
    extras = [n for n in _list_names(client, prefix_url) if n != MANIFEST_NAME and n not in shards
              and not n.endswith((".tar", ".tmp"))]  # fmt: skip
    items = [(n, shards.get(n)) for n in [*shards, *extras]]
    config = transfer_config or DEFAULT_TRANSFER
    with tqdm(unit="B", unit_scale=True, desc=f"pull {prefix_url}", disable=not progress) as bar:
        with ThreadPoolExecutor(PARALLEL_FILES) as pool:
            futures = [pool.submit(_download, client, _join(prefix_url, name), local_dir / name, sha, config, bar)
                       for name, sha in items]  # fmt: skip
            for future in futures:
                future.result()
    tmp = local_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, local_dir / MANIFEST_NAME)  # last, so an interrupted pull never looks complete
    logger.info("pulled %d files (%d shards) from %s to %s", len(items) + 1, len(manifest.shards), prefix_url,
                local_dir)  # fmt: skip
    return load_manifest(local_dir)


# --- Object helpers for stores that are not shard sets (the training checkpoint store, facescale.train) ---------


def list_objects(prefix_url: str) -> dict[str, int]:
    """Every object under a prefix, at any depth.

    Args:
        prefix_url: ``s3://bucket/prefix`` (a trailing ``/`` is implied).

    Returns:
        Object name relative to the prefix (``a/b.pt`` for ``prefix/a/b.pt``) -> size in bytes.

    Raises:
        StorageError: If listing fails (names the URL).
    """
    bucket, key = split_s3_url(prefix_url.rstrip("/") + "/")
    objects: dict[str, int] = {}
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            objects.update((obj["Key"][len(key) :], int(obj["Size"])) for obj in page.get("Contents", []))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exn:
        raise _client_error(exn, "listing", prefix_url) from exn
    return objects


def delete_objects(prefix_url: str, names: list[str]) -> None:
    """Delete the named objects under a prefix (missing ones are no error); in the order given, 1,000 a request.

    Args:
        prefix_url: ``s3://bucket/prefix``.
        names: Object names relative to the prefix. Callers that need an order (a manifest before the files it
            lists) make separate calls: the objects of one batch request are deleted in no defined order.

    Raises:
        StorageError: If a request fails or the service reports a key it could not delete (names the URL).
    """
    bucket, key = split_s3_url(prefix_url.rstrip("/") + "/")
    client = s3_client()
    for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1,000 keys (S3 API reference)
        batch = [{"Key": key + name} for name in names[start : start + 1000]]
        try:
            response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exn:
            raise _client_error(exn, "deleting objects under", prefix_url) from exn
        if errors := response.get("Errors"):
            first = errors[0]
            raise StorageError(f"deleting s3://{bucket}/{first.get('Key')} failed ({first.get('Code')}): "
                               f"{first.get('Message')} ({len(errors)} keys not deleted)", prefix_url,
                               first.get("Code"))  # fmt: skip


def upload_file(path: str | os.PathLike[str], url: str) -> None:
    """Upload one local file to ``s3://bucket/key`` (multipart above ``DEFAULT_TRANSFER``'s threshold).

    Raises:
        StorageError: If the upload fails after retries (names the file and URL).
    """
    bucket, key = split_s3_url(url)
    try:
        s3_client().upload_file(str(path), bucket, key, Config=DEFAULT_TRANSFER)
    except Exception as exn:  # botocore errors and s3transfer's S3UploadFailedError (which wraps them)
        raise _client_error(exn, f"uploading {path} to", url) from exn


def download_file(url: str, path: str | os.PathLike[str]) -> None:
    """Download ``s3://bucket/key`` to a local file (written to ``<path>.tmp``, then renamed).

    Raises:
        StorageError: If the download fails after retries (names the URL).
    """
    bucket, key = split_s3_url(url)
    tmp = Path(str(path) + ".tmp")
    try:
        s3_client().download_file(bucket, key, str(tmp), Config=DEFAULT_TRANSFER)
    except Exception as exn:  # botocore errors, and s3transfer's own for a failed part
        tmp.unlink(missing_ok=True)
        raise _client_error(exn, "downloading", url) from exn
    os.replace(tmp, path)
