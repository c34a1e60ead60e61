"""The S3 backend of ``facescale.storage`` (``s3://bucket/key``) through boto3: streaming reads, transfers, listings.

This is the only module of the package that imports boto3 (DESIGN.md); ``facescale.storage`` loads it the first time an
``s3://`` URL is used, so local runs never import boto3.

Where things come from (nothing is configured here that boto3 already resolves):

- **Credentials**: boto3's standard chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE`` and ``~/.aws/{credentials,config}``, web identity (EKS IRSA), container and instance metadata.
- **Endpoint**: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the AWS config file), which
  botocore honours natively since 1.31 (boto3 1.28); this is how MinIO, Ceph or a test server are reached.
- **Retries**: botocore's ``standard`` retry mode (exponential backoff with jitter, base 1 s, capped at 20 s, on
  throttling, 5xx and connection errors) with 8 attempts, unless ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` say
  otherwise. A read that breaks mid-stream (which botocore does not retry) is resumed here with a ranged GET
  pinned to the object's ETag, so a changed object is an error rather than a spliced stream.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig

from facescale.storage.base import StorageError, split_s3_url

logger = logging.getLogger(__name__)

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


def upload_file(path: str | os.PathLike[str], url: str, config: TransferConfig | None = None,
                callback: Callable[[int], Any] | None = None) -> None:
    """Upload one local file to ``s3://bucket/key`` (multipart above the transfer config's threshold).

    ``config`` defaults to ``DEFAULT_TRANSFER``; ``callback`` is called with the bytes sent (a progress bar's update).

    Raises:
        StorageError: If the upload fails after retries (names the file and URL).
    """
    bucket, key = split_s3_url(url)
    try:
        s3_client().upload_file(str(path), bucket, key, Config=config or DEFAULT_TRANSFER, Callback=callback)
    except Exception as exn:  # botocore errors and s3transfer's S3UploadFailedError (which wraps them)
        raise _client_error(exn, f"uploading {path} to", url) from exn


def download_file(url: str, path: str | os.PathLike[str], config: TransferConfig | None = None,
                  callback: Callable[[int], Any] | None = None) -> None:
    """Download ``s3://bucket/key`` to a local file (written to ``<path>.tmp``, then renamed).

    ``config`` and ``callback`` as for :func:`upload_file`.

    Raises:
        StorageError: If the download fails after retries (names the URL).
    """
    bucket, key = split_s3_url(url)
    tmp = Path(str(path) + ".tmp")
    try:
        s3_client().download_file(bucket, key, str(tmp), Config=config or DEFAULT_TRANSFER, Callback=callback)
    except Exception as exn:  # botocore errors, and s3transfer's own for a failed part
        tmp.unlink(missing_ok=True)
        raise _client_error(exn, "downloading", url) from exn
    os.replace(tmp, path)


def delete_object(url: str) -> None:
    """Delete one object (a missing one is no error).

    Raises:
        StorageError: If the request fails (names the URL).
    """
    bucket, key = split_s3_url(url)
    try:
        s3_client().delete_object(Bucket=bucket, Key=key)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exn:
        raise _client_error(exn, "deleting", url) from exn


def list_names(prefix_url: str) -> list[str]:
    """Object names directly under the prefix (no deeper keys).

    Raises:
        StorageError: If listing fails (names the URL).
    """
    bucket, key = split_s3_url(prefix_url.rstrip("/") + "/")
    names = []
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            names += [obj["Key"][len(key) :] for obj in page.get("Contents", [])]
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exn:
        raise _client_error(exn, "listing", prefix_url) from exn
    return names
