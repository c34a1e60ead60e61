"""Streaming tar reader for shards that says where a broken shard breaks.

webdataset's own tar iterator stops silently at a header it cannot parse and reports a cut-off member only as
"unexpected end of data". A shard cut short (a half-copied file, an interrupted upload) must instead be an error
that names the shard and the byte offset, so this module reads the tar stream itself with ``tarfile`` (streaming
mode, nothing is seeked or kept in memory beyond one member) and groups members into samples with webdataset's
rule: consecutive files that share the part of their name before the first ``.`` of the last path component form
one sample, keyed by that prefix, each file stored under its lower-cased extension.

A complete tar ends with a zero block (POSIX ustar; ``tarfile`` and GNU tar write two, then pad to a 10 KiB record).
``tarfile`` treats a missing, partial or garbled next header as the end of the archive; here the block after the
last member is checked, so a shard cut at a member boundary is reported too.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from webdataset.tariterators import base_plus_ext

from facescale.data.errors import ShardError

_BLOCK = tarfile.BLOCKSIZE
# tarfile's stream mode reads ahead at most one record (RECORDSIZE = 20 blocks) past the header it parses, so a tail of
# a few records always holds the block after the last member when the iteration ends.
_TAIL_BYTES = 4 * tarfile.RECORDSIZE
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset skips `__*__` members (its own metadata)


class _CountingReader:
    """Read-only wrapper that counts the bytes read and keeps the last ``_TAIL_BYTES`` of them."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.pos = 0
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > _TAIL_BYTES:
            del self.tail[: len(self.tail) - _TAIL_BYTES]
        return data

    def block_at(self, offset: int) -> bytes:
        """The bytes read so far in ``[offset, offset + 512)`` (shorter if the stream ended first)."""
        start = offset - (self.pos - len(self.tail))
        assert start >= 0, "tail window too short"
        return bytes(self.tail[start : start + _BLOCK])


def iter_tar_files(stream: BinaryIO | Any, url: str) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(member name, data, header byte offset)`` of every regular file of a tar stream, in order.

    Args:
        stream: Readable binary stream of the tar (only ``read`` is used).
        url: Names the shard in errors.

    Raises:
        ShardError: If the stream is not a tar, a member is cut off, or the archive ends without its end-of-archive
            block; the message names the shard and the byte offset where it breaks.
    """
    reader = _CountingReader(stream)
    member: tarfile.TarInfo | None = None
    tar: tarfile.TarFile | None = None
    try:
        tar = tarfile.open(fileobj=reader, mode="r|*")  # type: ignore[call-overload]
        for member in tar:
            if not member.isreg():
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            data = extracted.read()
            yield member.name, data, member.offset
            tar.members = []  # tarfile keeps every TarInfo otherwise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exn:
        if member is not None and reader.pos < member.offset_data + member.size:
            where = (f"ends at byte offset {reader.pos} inside member {member.name!r} (header at byte offset "
                     f"{member.offset}, {member.size} data bytes from byte offset {member.offset_data})")  # fmt: skip
        else:  # the archive itself (offset 0) or the header after the last complete member
            where = f"breaks at byte offset {tar.offset if tar is not None else 0}"
        raise ShardError(f"shard {url}: truncated or corrupt tar: {where}: {exn}", shard=url) from exn
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return  # compressed: offsets in the raw stream are not tar offsets, and gzip checks its own length
    end = tar.offset  # where the header after the last member starts
    block = reader.block_at(end)
    if len(block) == _BLOCK and block.count(0) == _BLOCK:
        return
    last = f" after member {member.name!r}" if member is not None else ""
    if not block:
        problem = f"ends at byte offset {end}{last} without the end-of-archive block (truncated)"
    elif len(block) < _BLOCK:
        problem = f"ends at byte offset {end + len(block)} inside the header at byte offset {end}{last} (truncated)"
    else:
        problem = f"has an invalid header at byte offset {end}{last}"
    raise ShardError(f"shard {url}: truncated or corrupt tar: {problem}", shard=url)


def iter_tar_samples(stream: BinaryIO | Any, url: str) -> Iterator[dict[str, Any]]:
    """Yield webdataset-style samples (``__key__``, ``__url__``, extension -> bytes) of a tar stream.

    Args:
        stream: Readable binary stream of the tar.
        url: The shard URL, stored as ``__url__`` and named in errors.

    Raises:
        ShardError: From ``iter_tar_files``, or if a sample has two files with the same extension (names the key
            and the byte offset of the second).
    """
    sample: dict[str, Any] | None = None
    for name, data, offset in iter_tar_files(stream, url):
        if _META_RE.match(name):
            continue
        key, ext = base_plus_ext(name)  # webdataset's own key rule: the part before the first dot of the last
        if key is None:  # path component; no extension: not part of any sample (webdataset skips these too)
            continue
        ext = ext.lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ShardError(f"shard {url}: sample {key!r} has a second .{ext} at byte offset {offset}", url, key)
        sample[ext] = data
    if sample is not None:
        yield sample
