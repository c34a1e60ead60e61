"""The shard contract: WebDataset tar shards plus a ``manifest.json`` that describes them.

One sample is ``key.jpg`` (aligned 112x112 RGB JPEG), ``key.cls`` (the integer class id as ASCII, never a float:
float32 is exact only below 2**24 identities) and an optional ``key.json``. The manifest beside the shards holds the
shard list with per-shard sample counts, so that every loader sizes its epoch without scanning (DESIGN.md); its
model and reader are in :mod:`facescale.data.manifest`.

Writers keep samples in the order they are given: callers shuffle globally before writing, because streaming
readers only shuffle inside a buffer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import simplejpeg
import webdataset as wds
from tqdm import tqdm

from facescale import storage
from facescale.data.errors import ImageDecodeError, LabelError, ShardError
from facescale.data.manifest import IMAGE_SIZE, MANIFEST_NAME, Manifest, ShardInfo, digest_of
from facescale.data.manifest import load_manifest as load_manifest  # re-exported: loaders import it from here
from facescale.data.tar_reader import iter_tar_samples
from facescale.data.wds_index import index_name, write_index

logger = logging.getLogger(__name__)

# A fixed tar mtime makes shard bytes, and so the manifest digest, reproducible (webdataset TarWriter docs). It must
# be an int: tarfile writes a float mtime as an extra PAX header per member, which doubles the size of small files.
_TAR_MTIME = 0
_LABEL_RE = re.compile(rb"\s*(\d+)\s*")


def _facescale_version() -> str:
    try:
        import facescale

        return str(facescale.__version__)
    except (ImportError, AttributeError):
        return "0.1.0"


class _HashingFile:
    """File wrapper that feeds every byte written or read through sha256."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._fileobj = fileobj
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self._fileobj.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self._fileobj.read(size)
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class ShardSetWriter:
    """Writes samples into ``{prefix}-{i:06d}.tar`` shards and, on ``close``, the manifest.

    Samples are written in the order given. Any stale ``manifest.json`` in ``out_dir`` is removed when writing
    starts, so an interrupted write never leaves a manifest that describes shards which are not there.

    Args:
        out_dir: Output directory (created if needed).
        prefix: Shard file name prefix.
        samples_per_shard: Samples per shard; the last shard may hold fewer.
    """

    def __init__(self, out_dir: str | os.PathLike[str], prefix: str = "shard", samples_per_shard: int = 1000) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty file name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self._shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._tar: wds.TarWriter | None = None
        self._count = 0
        self._keys: set[str] = set()
        self._max_label = -1
        self._max_label_at = ("", "")  # (shard, key) of the largest label, for the error message
        self._closed = False

    @property
    def _shard_name(self) -> str:
        return f"{self.prefix}-{len(self._shards):06d}.tar"

    def write(self, key: str, jpeg: bytes, label: int, meta: dict[str, Any] | None = None) -> None:
        """Append one sample.

        Args:
            key: Sample key: unique (checked within a shard); no ``.`` (webdataset splits names at the first
                dot), no ``/``.
            jpeg: Encoded JPEG bytes.
            label: Class id, a non-negative integer.
            meta: Optional JSON-serialisable metadata, stored as ``key.json``.

        Raises:
            ShardError: If the key is malformed or repeated within the shard.
            LabelError: If the label is not a non-negative integer.
        """
        if self._closed:
            raise ShardError(f"{self.out_dir}: write() after close()", shard=str(self.out_dir), key=key)
        shard = str(self.out_dir / self._shard_name)
        if not key or "." in key or "/" in key or key.startswith("__"):
            raise ShardError(f"shard {shard}: invalid sample key {key!r} (no '.', '/', leading '__')", shard, key)
        if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 0:
            raise LabelError(f"shard {shard}: sample {key!r} has label {label!r}, not a non-negative int", shard, key)
        if key in self._keys:
            raise ShardError(f"shard {shard}: duplicate sample key {key!r}", shard, key)
        if self._tar is None:
            self._open_shard()
        sample: dict[str, Any] = {"__key__": key, "jpg": bytes(jpeg), "cls": str(int(label)).encode("ascii")}
        if meta is not None:
            sample["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
        try:
            self._tar.write(sample)
        except ValueError as exn:  # tarfile: name too long for the USTAR header
            raise ShardError(f"shard {shard}: cannot write sample {key!r}: {exn}", shard, key) from exn
        self._keys.add(key)
        self._count += 1
        if label > self._max_label:
            self._max_label, self._max_label_at = int(label), (shard, key)
        if self._count >= self.samples_per_shard:
            self._close_shard()

    def _open_shard(self) -> None:
        path = self.out_dir / (self._shard_name + ".tmp")
        self._file = open(path, "wb")  # closed in _close_shard
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=_TAR_MTIME)
        self._count = 0
        self._keys = set()

    def _close_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._hashing is not None
        self._tar.close()
        self._file.close()
        name = self._shard_name
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        # The DALI index is written with its shard, so DALI never scans a tar at pipeline start.
        index = write_index(self.out_dir / name, self.out_dir / index_name(name)).name
        self._shards.append(
            ShardInfo(url=name, num_samples=self._count, sha256=self._hashing.hash.hexdigest(), index=index)
        )
        self._tar = self._file = self._hashing = None

    def abort(self) -> None:
        """Stop after an error: discard the shard being written (its ``.tmp`` file) and write no manifest.

        Finished shards stay on disk, but with no manifest nothing reads them as a dataset.
        """
        if self._tar is not None and self._file is not None:
            try:
                self._tar.close()
            finally:
                self._file.close()
                (self.out_dir / (self._shard_name + ".tmp")).unlink(missing_ok=True)
        self._tar = self._file = self._hashing = None
        self._closed = True

    def close(self, num_classes: int, source: str) -> Manifest:
        """Finish the last shard and write ``manifest.json``.

        Args:
            num_classes: Number of classes; every label written must be below it.
            source: Free text describing where the samples came from.

        Returns:
            The manifest written, with its root set to ``out_dir``.

        Raises:
            ShardError: If no sample was written.
            LabelError: If a label written is ``>= num_classes`` (names its shard and key).
        """
        if self._tar is not None:
            self._close_shard()
        self._closed = True
        if not self._shards:
            raise ShardError(f"{self.out_dir}: no samples were written", shard=str(self.out_dir))
        if self._max_label >= num_classes:
            shard, key = self._max_label_at
            raise LabelError(
                f"shard {shard}: sample {key!r} has label {self._max_label} >= num_classes {num_classes}", shard, key
            )
        manifest = Manifest(
            shards=self._shards,
            num_samples=sum(s.num_samples for s in self._shards),
            num_classes=num_classes,
            digest=digest_of([s.sha256 or "" for s in self._shards]),
            creator=f"facescale {_facescale_version()}",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=source,
        ).with_root(self.out_dir)
        manifest.save(self.out_dir / MANIFEST_NAME)
        return manifest


def iter_shard(
    url: str, handler: Callable[[Exception], bool] | None = None, stream: BinaryIO | _HashingFile | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard as webdataset dicts (``__key__``, ``__url__``, extension -> bytes).

    Args:
        url: Local path, ``s3://`` URL (streamed through boto3), or any URL webdataset's ``gopen`` can open.
        handler: Called with the ``ShardError`` when the shard cannot be opened or breaks (truncated or corrupt
            tar); it may raise, or return to end this shard quietly (a tar stream cannot be resumed past damage).
            Default: raise the ``ShardError``, which names the shard and, for a broken tar, the byte offset.
        stream: An already opened stream of the shard (``url`` then only names it; the caller closes it).
    """
    opened = None
    try:
        if stream is None:
            try:
                stream = opened = open_shard(url)
            except Exception as exn:  # any opener error (local OSError, boto3/botocore, pipe) ends up here
                raise ShardError(f"shard {url}: cannot open: {exn}", shard=url) from exn
        yield from iter_tar_samples(stream, url)
    except ShardError as exn:
        if handler is None:
            raise
        handler(exn)
    finally:
        if opened is not None:
            opened.close()


def open_shard(url: str) -> BinaryIO:
    """Open a shard for streaming reads: object stores through ``facescale.storage``, anything else with ``gopen``.

    Raises:
        StorageError: For an ``s3://`` object that is missing or unreadable (names the URL).
        OSError: For a local file that cannot be opened.
    """
    if storage.is_remote(url):
        return storage.open_read(url)
    return wds.gopen(url, "rb")  # local paths and the other URL kinds gopen knows (pipe:, http:)


def parse_label(sample: dict[str, Any], num_classes: int) -> int:
    """Return the class id of a sample, checking the shard contract.

    Raises:
        LabelError: If ``.cls`` is missing, not an ASCII integer, or not below ``num_classes``; names shard and key.
    """
    shard, key = sample.get("__url__"), sample.get("__key__")
    raw = sample.get("cls")
    if raw is None:
        files = sorted(k for k in sample if not k.startswith("__"))
        raise LabelError(f"shard {shard}: sample {key!r} has no .cls (has: {', '.join(files)})", shard, key)
    match = _LABEL_RE.fullmatch(raw)
    if match is None:
        raise LabelError(f"shard {shard}: sample {key!r} has label {raw[:32]!r}, not an integer", shard, key)
    label = int(match.group(1))
    if label >= num_classes:
        raise LabelError(f"shard {shard}: sample {key!r} has label {label} >= num_classes {num_classes}", shard, key)
    return label


def decode_image(sample: dict[str, Any], image_size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """Decode a sample's ``.jpg`` to an RGB ``uint8`` array of shape ``[H, W, 3]``.

    Raises:
        ImageDecodeError: If the JPEG is missing, corrupt, or not ``image_size``; names shard and key.
    """
    shard, key = sample.get("__url__"), sample.get("__key__")
    raw = sample.get("jpg")
    if raw is None:
        raise ImageDecodeError(f"shard {shard}: sample {key!r} has no .jpg", shard, key)
    try:
        image = simplejpeg.decode_jpeg(raw, colorspace="RGB")
    except ValueError as exn:  # simplejpeg raises ValueError for every libjpeg-turbo failure
        raise ImageDecodeError(f"shard {shard}: sample {key!r}: corrupt JPEG: {exn}", shard, key) from exn
    if image.shape[:2] != tuple(image_size):
        size = "x".join(map(str, image.shape[:2]))
        raise ImageDecodeError(f"shard {shard}: sample {key!r} is {size}, expected {image_size}", shard, key)
    return image


def verify_manifest(
    manifest: Manifest,
    root: str | os.PathLike[str] | None = None,
    *,
    decode_images: bool = False,
    progress: bool = False,
) -> None:
    """Open every shard and check it against the manifest.

    Checks the per-shard sample count, every label (present, integer, below ``num_classes``), the shard sha256
    where the manifest records one, and with ``decode_images`` that every JPEG decodes to ``image_size``.

    Args:
        manifest: The manifest to check.
        root: Directory the shard URLs are relative to (default: the manifest's own root).
        decode_images: Also decode every image (slower).
        progress: Show a progress bar over shards.

    Raises:
        ShardError: A count or checksum mismatch (names the shard and both values) or an unreadable shard.
        LabelError: A bad label (names shard, key, label and num_classes).
        ImageDecodeError: With ``decode_images``, a bad image (names shard and key).
    """
    urls = manifest.shard_urls(root)
    for info, url in tqdm(list(zip(manifest.shards, urls)), desc="verify shards", unit="shard", disable=not progress):
        try:
            stream = open_shard(url)
        except Exception as exn:  # local open() errors, a failed pipe command, or an unreadable s3:// object
            raise ShardError(f"shard {url}: cannot open: {exn}", shard=url) from exn
        hashing = _HashingFile(stream)
        count = 0
        try:
            for sample in iter_shard(url, stream=hashing):
                parse_label(sample, manifest.num_classes)
                if decode_images:
                    decode_image(sample, manifest.image_size)
                count += 1
            hashing.drain()
        finally:
            stream.close()
        if count != info.num_samples:
            raise ShardError(f"shard {url}: manifest says {info.num_samples} samples, shard holds {count}", url)
        if info.sha256 is not None and hashing.hash.hexdigest() != info.sha256:
            raise ShardError(
                f"shard {url}: sha256 is {hashing.hash.hexdigest()}, manifest says {info.sha256}", shard=url
            )
