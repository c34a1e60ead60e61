"""One storage interface over local paths and ``s3://`` URLs: open, read, list, delete, upload, download.

Shard readers and converters (``facescale.data``), the checkpoint store (``facescale.checkpoint.store``) and the
teacher cache (``facescale.distill``) call these functions with whatever root the user configured; the backend is
chosen here from the URL, and S3 specifics (clients, retries from botocore's own config, error codes) stay in
:mod:`facescale.storage.s3`, which is imported -- with boto3 -- only the first time an ``s3://`` URL is used.

Local semantics match S3's where callers rely on them: :func:`upload_file` and :func:`download_file` replace the
destination atomically (``<dest>.tmp``, then a rename); :func:`list_objects` lists every file under a prefix at
any depth with its size; :func:`delete_objects` ignores names that do not exist.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from facescale.storage.base import S3_SCHEME, StorageError, is_s3_url, split_s3_url


def _s3() -> ModuleType:
    from facescale.storage import s3  # boto3 loads here, on the first s3:// URL (DESIGN.md)

    return s3


def is_remote(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names an object store (``s3://``) rather than a path of this machine's file system."""
    return is_s3_url(url)


def s3_client() -> Any:
    """The process's boto3 S3 client (see :func:`facescale.storage.s3.s3_client`)."""
    return _s3().s3_client()


def join(root: str | os.PathLike[str], name: str) -> str:
    """``root/name``: a key under an ``s3://`` prefix, or a path under a local directory."""
    root = str(root)
    return root.rstrip("/") + "/" + name if is_s3_url(root) else os.path.join(root, name)


def absolute(root: str | os.PathLike[str]) -> str:
    """A canonical form of ``root``: an ``s3://`` prefix without a trailing ``/``, or an absolute local path."""
    root = str(root)
    return root.rstrip("/") if is_s3_url(root) else os.path.abspath(root)


def open_read(url: str) -> BinaryIO:
    """A binary stream of the object or file (S3: resumes a broken stream, see ``S3ReadStream``).

    Raises:
        StorageError: For an ``s3://`` object that is missing or unreadable (names the URL).
        OSError: For a local file that cannot be opened.
    """
    if is_s3_url(url):
        return _s3().open_read(url)  # type: ignore[no-any-return]
    return open(url, "rb")  # noqa: SIM115  (the caller closes it)


def read_bytes(url: str) -> bytes:
    """The whole object or file.

    Raises:
        StorageError: For an ``s3://`` object (``code`` is ``NoSuchKey`` for a missing one).
        OSError: For a local file (``FileNotFoundError`` for a missing one).
    """
    if is_s3_url(url):
        return _s3().read_bytes(url)  # type: ignore[no-any-return]
    return Path(url).read_bytes()


def is_missing(exn: BaseException) -> bool:
    """Whether a read failed because the object or file does not exist (not because the store is unreachable)."""
    if isinstance(exn, StorageError):
        return exn.code in ("NoSuchKey", "404", "NotFound")
    return isinstance(exn, FileNotFoundError)


def write_bytes(url: str, data: bytes) -> None:
    """Writes a whole object or file; readers see the old bytes or the new, never a part (local: a temporary file
    beside it, then a rename; parent directories are created).

    Raises:
        StorageError: If an S3 upload fails after retries (names the URL).
    """
    if is_s3_url(url):
        with tempfile.TemporaryDirectory(prefix="facescale-put-") as tmp_dir:
            tmp = Path(tmp_dir) / "object"
            tmp.write_bytes(data)
            upload_file(tmp, url)
        return
    target = Path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def list_objects(prefix: str) -> dict[str, int]:
    """Every object (file) under a prefix (directory), at any depth: relative name (``a/b.pt``) -> bytes.

    A local prefix that does not exist lists nothing, as an empty S3 prefix does.
    """
    if is_s3_url(prefix):
        return _s3().list_objects(prefix)  # type: ignore[no-any-return]
    root = Path(prefix)
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def delete_objects(prefix: str, names: list[str]) -> None:
    """Deletes the named objects (files) under a prefix, in the order given; missing ones are no error."""
    if is_s3_url(prefix):
        _s3().delete_objects(prefix, names)
        return
    for name in names:
        Path(prefix, name).unlink(missing_ok=True)


def upload_file(path: str | os.PathLike[str], url: str) -> None:
    """Puts a local file at ``url`` (S3: multipart above 16 MiB; local: copy to ``<url>.tmp``, then rename).

    Raises:
        StorageError: If an S3 upload fails after retries (names the file and URL).
    """
    if is_s3_url(url):
        _s3().upload_file(path, url)
        return
    _copy_atomic(Path(path), Path(url))


def download_file(url: str, path: str | os.PathLike[str]) -> None:
    """Fetches ``url`` into a local file (written to ``<path>.tmp``, then renamed).

    Raises:
        StorageError: If an S3 download fails after retries (names the URL).
    """
    if is_s3_url(url):
        _s3().download_file(url, path)
        return
    _copy_atomic(Path(url), Path(path))


def _copy_atomic(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        shutil.copyfile(src, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


__all__ = ["S3_SCHEME", "StorageError", "absolute", "delete_objects", "download_file", "is_missing", "is_remote",
           "is_s3_url", "join", "list_objects", "open_read", "read_bytes", "s3_client", "split_s3_url",
           "upload_file", "write_bytes"]
