"""The shard set's ``manifest.json``: the shard list with per-shard sample counts and digests, read by every loader.

The manifest sits beside the shards (a directory or an ``s3://`` prefix), so every loader sizes its epoch without
scanning (DESIGN.md). The shards themselves -- writing, streaming, checking -- are in :mod:`facescale.data.shards`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from facescale import storage
from facescale.data.errors import ManifestError

MANIFEST_NAME = "manifest.json"
# Aligned-face crop size of ArcFace/InsightFace: the 5-point template in insightface `utils/face_align.py`
# (`arcface_dst`) is defined on a 112x112 canvas, and every public .rec/.bin set uses it.
IMAGE_SIZE = (112, 112)


class ShardInfo(BaseModel):
    """One shard of a dataset.

    Attributes:
        url: Shard file name relative to the manifest's directory (or an absolute path / URL).
        num_samples: Number of samples in the shard.
        sha256: Hex sha256 of the shard file, used by ``verify_manifest`` and the dataset digest.
        index: Name of its DALI index file (``wds2idx`` v1.2 format), relative like ``url``; ``None`` in manifests
            written before indices were (the DALI loader then builds one beside the shard).
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    num_samples: int = Field(ge=0)
    sha256: str | None = None
    index: str | None = None


class Manifest(BaseModel):
    """``manifest.json``: what a shard set contains, read by every loader.

    Attributes:
        shards: Shards in order.
        num_samples: Total number of samples; equals the sum over shards.
        num_classes: Number of class ids; every label is in ``[0, num_classes)``.
        image_size: ``[height, width]`` of every image.
        digest: Hex sha256 over the shards' raw sha256 digests, concatenated in shard order.
        creator: ``"facescale <version>"``.
        created_at: ISO 8601 UTC time of writing.
        source: Free text saying where the samples came from.
    """

    model_config = ConfigDict(extra="forbid")

    shards: list[ShardInfo] = Field(min_length=1)
    num_samples: int = Field(ge=0)
    num_classes: int = Field(ge=1)
    image_size: tuple[int, int] = IMAGE_SIZE
    digest: str
    creator: str
    created_at: str
    source: str = ""

    # Where the manifest was loaded from or written to; relative shard URLs resolve against it. Not serialised.
    _root: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _counts_add_up(self) -> Manifest:
        total = sum(s.num_samples for s in self.shards)
        if total != self.num_samples:
            raise ValueError(f"num_samples is {self.num_samples} but the shards hold {total}")
        return self

    @property
    def root(self) -> str | None:
        """Directory (or URL prefix) the shard URLs are relative to, when known."""
        return self._root

    def with_root(self, root: str | os.PathLike[str]) -> Manifest:
        """Return a copy whose relative shard URLs resolve against ``root``."""
        copy = self.model_copy()
        copy._root = str(root)
        return copy

    def shard_urls(self, root: str | os.PathLike[str] | None = None) -> list[str]:
        """Resolve every shard URL against ``root`` (default: the manifest's own root).

        Raises:
            ManifestError: If no root is given and the manifest does not know its own.
        """
        base = str(root) if root is not None else self._root
        if base is None:
            raise ManifestError("manifest has no root directory: pass root= or load it with load_manifest()")
        return [resolve_url(base, s.url) for s in self.shards]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the manifest as JSON, atomically (temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)


def resolve_url(root: str, url: str) -> str:
    """Join a shard URL onto a root unless it is already absolute (a path or ``scheme://`` URL)."""
    if "://" in url or url.startswith("pipe:") or os.path.isabs(url):
        return url
    if "://" in root:
        return root.rstrip("/") + "/" + url
    return os.path.join(root, url)


def load_manifest(path_or_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest.

    Args:
        path_or_dir: A ``manifest.json`` file, or the directory holding one; either may be an ``s3://`` URL.

    Returns:
        The manifest, with its root set to the file's directory (or URL prefix).

    Raises:
        ManifestError: If the directory or file is missing, the JSON is malformed, or fields are wrong.
    """
    if storage.is_remote(path_or_dir):
        url, text = read_manifest_text(str(path_or_dir))
        return parse_manifest(text, url).with_root(url.rsplit("/", 1)[0])
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        if path.suffix != ".json" or not path.parent.is_dir():
            missing = path if path.suffix != ".json" else path.parent
            raise ManifestError(f"dataset directory not found: {missing}", path=str(missing))
        raise ManifestError(f"manifest file not found: {path}", path=str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exn:
        raise ManifestError(f"cannot read manifest {path}: {exn}", path=str(path)) from exn
    return parse_manifest(text, str(path)).with_root(path.parent)


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
        return url, storage.read_bytes(url).decode("utf-8")
    except storage.StorageError as exn:
        missing = exn.code in ("NoSuchKey", "404", "NoSuchBucket")
        what = "manifest file not found (or its push has not finished)" if missing else "cannot read manifest"
        raise ManifestError(f"{what}: {url}: {exn}", path=url) from exn
    except UnicodeDecodeError as exn:
        raise ManifestError(f"cannot read manifest {url}: {exn}", path=url) from exn


def parse_manifest(text: str, where: str) -> Manifest:
    """Parse and validate manifest JSON (no root set).

    Args:
        text: The JSON text.
        where: The manifest's path or URL, named in errors.

    Raises:
        ManifestError: If the JSON is malformed or fields are wrong.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ManifestError(f"cannot read manifest {where}: {exn}", path=where) from exn
    try:
        return Manifest.model_validate(data)
    except ValidationError as exn:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exn.errors())
        raise ManifestError(f"invalid manifest {where}: {problems}", path=where) from exn


def digest_of(shard_sha256s: list[str]) -> str:
    """Dataset digest: sha256 over the shards' raw 32-byte sha256 digests, concatenated in order."""
    h = hashlib.sha256()
    for hex_digest in shard_sha256s:
        h.update(bytes.fromhex(hex_digest))
    return h.hexdigest()
