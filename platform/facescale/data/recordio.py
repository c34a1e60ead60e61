"""InsightFace ``train.rec``/``train.idx`` reader in pure Python (no mxnet).

The container is dmlc RecordIO (dmlc-core ``include/dmlc/recordio.h``). Every part of a record is:

- a little-endian ``uint32`` magic word ``0xCED7230A``;
- a ``uint32`` whose top 3 bits are the continuation flag and whose low 29 bits are the part's length: flag 0 is a
  whole record, 1 the first part, 2 a middle part, 3 the last part;
- the payload, zero-padded to a multiple of 4 bytes.

The dmlc writer splits a payload wherever the magic word appears at a 4-byte-aligned offset inside it and drops
that word, so the reader puts the magic back between parts. ``train.idx`` is text, one ``key\\toffset`` line per
record (mxnet ``MXIndexedRecordIO``).

A record written by mxnet ``recordio.pack`` starts with the ``IRHeader`` struct ``<IfQQ`` (flag, label, id, id2).
``flag > 0`` means ``flag`` float32 labels follow the header (and ``label`` is unused); the image bytes come after.
InsightFace (``recognition/arcface_torch/dataset.py``) stores in record 0 a header whose two labels are
``[id_start, id_end)``: records ``1 .. id_start - 1`` are images, records ``id_start .. id_end - 1`` are identity
records whose two labels are the ``[first, end)`` image range of one identity. Without that header (flag 0 in record
0) every record of the index is an image. The ``property`` file beside the ``.rec`` holds ``num_classes,height,width``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from facescale.data.errors import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
FLAG_WHOLE, FLAG_FIRST, FLAG_MIDDLE, FLAG_LAST = 0, 1, 2, 3
_IR_FORMAT = "<IfQQ"  # mxnet python/mxnet/recordio.py: _IR_FORMAT = 'IfQQ' (native order; little-endian in practice)
IR_HEADER_SIZE = struct.calcsize(_IR_FORMAT)  # 24 bytes


class RecordIOError(DataError):
    """A ``.rec``/``.idx``/``property`` file breaks the format; names the file and, where known, the byte offset.

    Args:
        message: What is wrong; already names the file and offset.
        path: The file concerned.
        offset: Byte offset in the file where the problem was found.
    """

    def __init__(self, message: str, path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class IRHeader(NamedTuple):
    """mxnet's image record header.

    Attributes:
        flag: Number of float labels that follow the header (0: the single ``label`` field is the label).
        label: The label (``flag == 0``) or the tuple of ``flag`` labels.
        id: First record id field (the record's own index in InsightFace sets).
        id2: Second id field (unused by InsightFace).
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def unpack_record(record: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record into its ``IRHeader`` (with array labels read when ``flag > 0``) and the image bytes.

    Args:
        record: Record payload as returned by ``RecordIOReader``.
        where: Names the record in error messages (file and offset).

    Returns:
        ``(header, image_bytes)``.

    Raises:
        RecordIOError: If the record is shorter than its header and labels.
    """
    if len(record) < IR_HEADER_SIZE:
        raise RecordIOError(f"{where}: {len(record)} bytes, shorter than the {IR_HEADER_SIZE}-byte IRHeader")
    flag, label, id1, id2 = struct.unpack_from(_IR_FORMAT, record)
    body = record[IR_HEADER_SIZE:]
    if flag == 0:
        return IRHeader(flag, label, id1, id2), body
    if len(body) < 4 * flag:
        raise RecordIOError(f"{where}: IRHeader flag {flag} announces {flag} float labels, record is too short")
    labels = struct.unpack_from(f"<{flag}f", body)
    return IRHeader(flag, labels, id1, id2), body[4 * flag :]


def first_label(header: IRHeader) -> float:
    """The label InsightFace trains on: ``label`` when ``flag == 0``, else the first of the array labels."""
    return header.label if isinstance(header.label, float) else header.label[0]


def read_index(path: str | os.PathLike[str]) -> dict[int, int]:
    """Read a ``.idx`` file: ``{record key: byte offset in the .rec}``, in file order.

    Raises:
        RecordIOError: If a line is not ``key<TAB>offset`` with integers (names the file and line).
    """
    index: dict[int, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (IndexError, ValueError):
                message = f"{path}:{number}: expected 'key<TAB>offset', got {line.strip()!r}"
                raise RecordIOError(message, str(path)) from None
            index[key] = offset
    return index


def read_property(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Read InsightFace's ``property`` file: ``num_classes,height,width``.

    Raises:
        RecordIOError: If the file does not hold three positive comma-separated integers.
    """
    text = Path(path).read_text().strip()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width', got {text[:64]!r}", str(path))
    return values  # type: ignore[return-value]


class RecordIOReader:
    """Reads dmlc RecordIO records from a ``.rec`` file, sequentially or at byte offsets.

    Args:
        path: The ``.rec`` file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._file: BinaryIO = open(self.path, "rb")  # closed by close() / the context manager
        self.size = os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """Read the record that starts at ``offset``.

        Returns:
            ``(payload, next_offset)``: the record with multi-part payloads joined (magic words put back), and the
            offset just past its last part.

        Raises:
            RecordIOError: On a bad magic word, a bad continuation flag sequence, or a record cut short by the end of
                the file; the message names the file and the byte offset.
        """
        parts: list[bytes] = []
        pos = offset
        while True:
            self._file.seek(pos)
            head = self._file.read(8)
            if len(head) < 8:
                raise RecordIOError(f"{self.path}: record cut short at byte offset {pos} (end of file)", self.path, pos)
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.path}: bad RecordIO magic 0x{magic:08X} at byte offset {pos} (expected 0x{MAGIC:08X})",
                    self.path, pos,
                )  # fmt: skip
            flag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            expected = (FLAG_WHOLE, FLAG_FIRST) if not parts else (FLAG_MIDDLE, FLAG_LAST)
            if flag not in expected:
                raise RecordIOError(
                    f"{self.path}: continuation flag {flag} at byte offset {pos} where {expected} was expected",
                    self.path, pos,
                )  # fmt: skip
            payload = self._file.read(length)
            if len(payload) < length:
                raise RecordIOError(
                    f"{self.path}: record part at byte offset {pos} needs {length} bytes, the file ends first",
                    self.path, pos,
                )  # fmt: skip
            parts.append(payload)
            pos += 8 + length + (-length % 4)  # payloads are zero-padded to 4 bytes
            if flag in (FLAG_WHOLE, FLAG_LAST):
                return _MAGIC_BYTES.join(parts), pos

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, payload)`` of every record, scanning from the start (no ``.idx`` needed)."""
        pos = 0
        while pos < self.size:
            payload, next_pos = self.read_at(pos)
            yield pos, payload
            pos = next_pos


class InsightFaceRec:
    """An InsightFace ``train.rec`` + ``train.idx`` pair: image records, identity ranges and the class count.

    Args:
        rec: The ``.rec`` file.
        idx: The ``.idx`` file (default: ``rec`` with suffix ``.idx``).
        property_file: The ``property`` file (default: ``property`` beside the ``.rec``, used if it exists).

    Attributes:
        image_keys: Record keys of the images, in index order.
        identity_ranges: ``[first, end)`` image key range of each identity, from the identity records (empty when
            record 0 has no InsightFace header).
        num_classes: From ``property`` if present, else from the identity records, else ``None`` (the converter
            then takes ``max label + 1``).
        image_size: ``(height, width)`` from ``property``, or ``None``.
        num_missing_images: Image keys ``1 .. id_start - 1`` that the index lacks.

    Raises:
        RecordIOError: On an unreadable index or property file, or a malformed header or identity record.
    """

    def __init__(
        self,
        rec: str | os.PathLike[str],
        idx: str | os.PathLike[str] | None = None,
        property_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.rec_path = str(rec)
        self.idx_path = str(idx) if idx is not None else str(Path(rec).with_suffix(".idx"))
        self.index = read_index(self.idx_path)
        if not self.index:
            raise RecordIOError(f"{self.idx_path}: empty index", self.idx_path)
        prop = Path(property_file) if property_file is not None else Path(rec).parent / "property"
        self.num_classes: int | None = None
        self.image_size: tuple[int, int] | None = None
        if property_file is not None or prop.is_file():
            self.num_classes, height, width = read_property(prop)
            self.image_size = (height, width)
        self.reader = RecordIOReader(self.rec_path)
        self.identity_ranges: list[tuple[int, int]] = []
        self.num_missing_images = 0
        self.image_keys = self._read_layout()

    def _read_layout(self) -> list[int]:
        if 0 not in self.index:
            return list(self.index)
        header, _ = self.read(0)
        # NOTE: arcface_torch dataset.py takes record 0 as the InsightFace header only when flag > 0; otherwise
        # every record of the index, record 0 included, is an image.
        if header.flag == 0:
            return list(self.index)
        if header.flag < 2:
            raise RecordIOError(
                f"{self.rec_path}: header record 0 has {header.flag} label(s), expected 2", self.rec_path, self.index[0]
            )
        id_start, id_end = (int(v) for v in header.label[:2])  # type: ignore[index]
        for key in range(id_start, id_end):
            identity, _ = self.read(key)
            if identity.flag < 2:
                raise RecordIOError(
                    f"{self.rec_path}: identity record {key} at byte offset {self.index[key]} has no image range",
                    self.rec_path, self.index[key],
                )  # fmt: skip
            first, end = (int(v) for v in identity.label[:2])  # type: ignore[index]
            self.identity_ranges.append((first, end))
        if self.num_classes is None and self.identity_ranges:
            self.num_classes = len(self.identity_ranges)
        keys = [key for key in range(1, id_start) if key in self.index]
        self.num_missing_images = id_start - 1 - len(keys)
        return keys

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` in the ``.rec``.

        Raises:
            RecordIOError: If the index has no such key.
        """
        try:
            return self.index[key]
        except KeyError:
            raise RecordIOError(f"{self.idx_path}: no record {key} in the index", self.idx_path) from None

    def read(self, key: int) -> tuple[IRHeader, bytes]:
        """Read and unpack record ``key``: ``(header, image_bytes)``.

        Raises:
            RecordIOError: On a missing key or a malformed record (names the file and byte offset).
        """
        offset = self.offset(key)
        payload, _ = self.reader.read_at(offset)
        return unpack_record(payload, where=f"{self.rec_path}: record {key} at byte offset {offset}")

    def close(self) -> None:
        """Close the ``.rec`` file."""
        self.reader.close()

    def __enter__(self) -> InsightFaceRec:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
