"""Encoded batches between the DALI loader's read stage and its decode stage, and the checks made on them.

A batch keeps DALI's own ``TensorListCPU`` of JPEGs when it is exactly one read batch (the common case), so the
decode stage gets it without a per-sample Python copy; batches assembled from leftovers (after a skipped sample, a
restart mid-batch, or a decode failure) hold a list of per-sample ``TensorCPU`` views instead. This module does not
import DALI: it only handles the objects the read stage produced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg

from facescale.data.shards import parse_label

_DIGIT_0, _DIGIT_9 = ord("0"), ord("9")
_MAX_FAST_DIGITS = 18  # int64 holds every 18-digit decimal
_FAILED_SAMPLE_RE = re.compile(r"[Ff]ailed to decode sample #(\d+)")  # DALI decoder error, index in batch


@dataclass
class EncodedBatch:
    """Samples on their way to the decoder, in stream order.

    Attributes:
        jpegs: Stage 1's ``TensorListCPU`` (whole read batch) or a list of per-sample ``TensorCPU``.
        keys: Sample keys.
        shards: Shard path of each sample.
        labels: Class ids, ``int64``.
        mirrors: Mirror flags, ``int32`` (DALI's ``crop_mirror_normalize`` argument type).
        cursors: Raw position (1-based count of samples this rank read) of each sample.
    """

    jpegs: Any
    keys: list[str]
    shards: list[str]
    labels: np.ndarray
    mirrors: np.ndarray
    cursors: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def jpeg(self, i: int) -> Any:
        """Sample ``i``'s encoded JPEG as a DALI ``TensorCPU`` (a view into the read batch)."""
        return self.jpegs[i]

    def select(self, indices: list[int] | np.ndarray) -> EncodedBatch:
        """The samples at ``indices``, in that order (JPEGs become a per-sample list)."""
        idx = [int(i) for i in indices]
        return EncodedBatch([self.jpeg(i) for i in idx], [self.keys[i] for i in idx], [self.shards[i] for i in idx],
                            self.labels[idx], self.mirrors[idx], self.cursors[idx])  # fmt: skip

    @staticmethod
    def concat(parts: list[EncodedBatch]) -> EncodedBatch:
        """One batch of the samples of ``parts``, in order."""
        return EncodedBatch([p.jpeg(i) for p in parts for i in range(len(p))], [k for p in parts for k in p.keys],
                            [s for p in parts for s in p.shards], np.concatenate([p.labels for p in parts]),
                            np.concatenate([p.mirrors for p in parts]),
                            np.concatenate([p.cursors for p in parts]))  # fmt: skip


def parse_source_infos(padded: np.ndarray) -> tuple[list[str], list[str]]:
    """Keys and shard paths from DALI's webdataset ``source_info`` (``tar_path:data_offset:member_name``).

    Args:
        padded: ``uint8 [n, width]``: the ``source_info`` strings, zero-padded to one width.

    Returns:
        ``(keys, shards)``; both empty strings where the sample had no such component.
    """
    width = padded.shape[1] if padded.ndim == 2 else 0
    raw = padded.tobytes()
    keys, shards = [], []
    for i in range(padded.shape[0]):
        info = raw[i * width : (i + 1) * width].rstrip(b"\0").decode("utf-8", "replace")
        path, _, member = info.rpartition(":")
        shards.append(path.rpartition(":")[0])
        # webdataset's key: the member name up to the first dot of its last path component
        base_at = member.rfind("/") + 1
        dot = member.find(".", base_at)
        keys.append(member[:dot] if dot >= 0 else member)
    return keys, shards


def parse_labels(padded: np.ndarray, keys: list[str], shards: list[str], num_classes: int) -> np.ndarray:
    """Class ids from zero-padded ``.cls`` bytes, checked like ``shards.parse_label`` checks one sample.

    Rows that are plain digits (what every FaceScale writer writes) are parsed in one vectorised pass; any other
    row (whitespace, missing, not a number) goes through ``parse_label``, which accepts it or names shard and key.

    Args:
        padded: ``uint8 [n, width]``: each sample's ``.cls`` bytes, zero-padded.
        keys: Sample keys, for errors.
        shards: Shard paths, for errors.
        num_classes: Labels must be below it.

    Returns:
        ``int64 [n]``.

    Raises:
        LabelError: A label is missing, not an integer, or ``>= num_classes``; names shard and key.
    """
    n = padded.shape[0]
    arr = padded.reshape(n, -1) if n else padded.reshape(0, 0)
    digit = (arr >= _DIGIT_0) & (arr <= _DIGIT_9)
    pad = arr == 0
    # A plain row: one or more digits, then only padding (no digit after the first zero byte).
    plain = digit.any(1) & (digit | pad).all(1) & (np.diff(pad.astype(np.int8), axis=1) >= 0).all(1)
    if arr.shape[1] > _MAX_FAST_DIGITS:
        plain[:] = False
    values = np.zeros(n, np.int64)
    for col in range(arr.shape[1] if plain.any() else 0):
        values = np.where(digit[:, col], values * 10 + (arr[:, col].astype(np.int64) - _DIGIT_0), values)
    for i in np.flatnonzero(~plain | (values >= num_classes)):
        raw = arr[i].tobytes().rstrip(b"\0")
        sample = {"__url__": shards[i], "__key__": keys[i], "cls": raw or None}
        values[i] = parse_label(sample, num_classes)  # raises with the standard message, or parses the odd form
    return values


def header_problem(jpeg: np.ndarray, size: tuple[int, ...]) -> str | None:
    """What is wrong with an encoded image that its header already shows, or ``None``."""
    if jpeg.size == 0:
        return "has no .jpg"
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError as exn:
        return f"corrupt JPEG: {exn}"
    return None if (height, width) == size else f"is {height}x{width}, expected {size}"


def failed_index(exn: RuntimeError, batch: EncodedBatch) -> int | None:
    """Index in ``batch`` of the sample DALI failed on: from its message, else the first simplejpeg rejects."""
    match = _FAILED_SAMPLE_RE.search(str(exn))
    if match is not None and int(match.group(1)) < len(batch):
        return int(match.group(1))
    for i in range(len(batch)):
        try:
            simplejpeg.decode_jpeg(np.asarray(batch.jpeg(i)), colorspace="RGB")
        except ValueError:
            return i
    return None


def dali_error_line(exn: Exception) -> str:
    """The line of a DALI error that says what failed (its messages open with the pipeline's traceback)."""
    lines = [line.strip(" :") for line in str(exn).splitlines() if line.strip()]
    for line in lines:
        if _FAILED_SAMPLE_RE.search(line):
            return line
    return lines[0] if lines else repr(exn)
