"""What every storage backend shares without importing one: the error type and ``s3://`` URL parsing."""

from __future__ import annotations

import os

S3_SCHEME = "s3://"


class StorageError(OSError):
    """A storage request failed; the message names the URL.

    An ``OSError``: callers that handle I/O failures of local files handle the object store's the same way.

    Args:
        message: What failed, naming the URL.
        url: The URL concerned.
        code: The S3 error code (``NoSuchKey``, ``AccessDenied``, ...) when the service answered with one.
    """

    def __init__(self, message: str, url: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
