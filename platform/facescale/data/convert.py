"""Converters into the shard contract: an InsightFace ``.rec``/``.idx`` pair, or an image folder per identity.

Both write globally shuffled WebDataset shards through ``ShardSetWriter`` (streaming readers only shuffle within a
buffer, so the order on disk must already be random), with the class id as an ASCII integer in ``key.cls`` and the
source of each sample in ``key.json``. Each returns a ``ConvertReport`` (records read, written, skipped and why,
resized, re-encoded), also saved as ``convert_report.json`` beside the manifest; ``manifest.json`` is written last.

**Images.** A JPEG that already has the target size and a colour (YCbCr/RGB) encoding is copied byte for byte
after a full decode check; anything else (PNG, grayscale, CMYK, other sizes) is decoded with Pillow, converted to
RGB, resized if needed and re-encoded as JPEG. ``resize`` chooses what happens to an image of another size:
``"stretch"`` resizes it to the target (right for aligned crops at another resolution, such as 224x224),
``"center_crop"`` first crops the centre to the target's aspect ratio (keeps proportions of e.g. 112x96 crops),
``"off"`` skips it. An image that cannot be decoded is skipped under ``on_error="skip"`` (the default: one bad file
in millions should not stop a conversion) and raises ``ConvertError`` naming it under ``"fail"``.

**Alignment from landmarks** (``from_folder(landmarks=...)``, ``--landmarks``). With a CSV of five detected
points per image (format and rules in :mod:`facescale.data.align`), each image is aligned to the ArcFace 112x112
template by a similarity transform and warped, as InsightFace's ``norm_crop`` prepares its training sets, instead
of being resized (``resize`` does not apply then). An image without a row, with a malformed row or with a
degenerate one (coincident, collinear or mirrored points, an absurd fit) is a counted skip -- ``no landmarks``,
``malformed landmarks``, ``degenerate landmarks`` -- whose message names the image, the CSV and its line; under
``on_error="fail"`` the first one raises ``ConvertError`` with that message. A row naming an image the folder does
not have is always an error, raised before anything is written (``LandmarksError``).

**Class ids of a folder.** Sub-folders of ``root`` that contain at least one image file (by extension), sorted by
name (Python string order, i.e. by code point), get ids ``0 .. N-1``; ``classes.json`` beside the manifest lists
the names in id order. Ids depend only on the file listing, never on which images decode, so a re-run with a fixed
image gives the same ids.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from tqdm import tqdm

from facescale.data.align import read_landmarks
from facescale.data.convert_images import Resize, SkipImage, prepare_aligned, prepare_image
from facescale.data.errors import DataError, LabelError
from facescale.data.manifest import MANIFEST_NAME
from facescale.data.recordio import InsightFaceRec, first_label
from facescale.data.shards import ShardSetWriter

logger = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]
CLASSES_NAME = "classes.json"
REPORT_NAME = "convert_report.json"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_FLOAT32_EXACT = 1 << 24  # float32 holds every integer up to 2**24 = 16,777,216 exactly (24-bit significand)
_MAX_EXAMPLES = 20  # skip messages kept in the report
_T = TypeVar("_T")
_R = TypeVar("_R")
# (key, (jpeg, resized, reencoded) or the reason it is skipped, label, key.json metadata)
_Prepared = tuple[str, "tuple[bytes, bool, bool] | SkipImage", int, dict[str, Any]]


class ConvertError(DataError):
    """A source image or record cannot be converted; the message names the file (and record)."""


@dataclass
class ConvertReport:
    """What a conversion read, wrote and skipped.

    Attributes:
        source: What was converted (``.rec`` path or folder).
        out: Output directory.
        read: Source images (records or files) read.
        written: Samples written to shards.
        skipped: Skipped images by reason.
        resized: Written images that were resized.
        reencoded: Written images that were re-encoded (not a JPEG of the target size and colour encoding).
        aligned: Written images aligned from landmarks (also counted as re-encoded).
        num_classes: Classes in the manifest.
        notes: Other findings (ignored files, label disagreements), by kind.
        examples: The first few skip messages, naming each file or record.
    """

    source: str
    out: str
    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    resized: int = 0
    reencoded: int = 0
    aligned: int = 0
    num_classes: int = 0
    notes: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, detail: str) -> None:
        """Count one skipped image under ``reason`` and keep ``detail`` if there are few examples so far."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(detail)
        logger.warning("skipping %s", detail)

    def summary(self) -> str:
        """One human-readable paragraph."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        notes = "".join(f"; {n} {kind}" for kind, n in sorted(self.notes.items()))
        aligned = f"{self.aligned} aligned from landmarks, " if self.aligned else ""
        return (f"{self.source}: read {self.read}, wrote {self.written} samples of {self.num_classes} classes to "
                f"{self.out} ({aligned}{self.resized} resized, {self.reencoded} re-encoded); "
                f"skipped {sum(self.skipped.values())} ({reasons}){notes}")  # fmt: skip


def _ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], num_threads: int) -> Iterator[_R]:
    """``map`` on a thread pool that keeps input order and only a bounded window of work in flight."""
    if num_threads <= 1:
        yield from map(fn, items)
        return
    window: deque[Future[_R]] = deque()
    with ThreadPoolExecutor(num_threads) as pool:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * num_threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _default_threads() -> int:
    return min(8, os.cpu_count() or 1)


def _write_all(
    writer: ShardSetWriter,
    report: ConvertReport,
    prepared: Iterator[_Prepared],
    on_error: OnError,
    total: int,
    progress: bool,
) -> None:
    """Write prepared samples ``(key, jpeg or skip, label, meta)``, counting into ``report``.

    On any error the writer is aborted (its partial shard removed), so no manifest describes a half conversion.
    """
    try:
        for key, result, label, meta in tqdm(prepared, total=total, desc="convert", unit="img", disable=not progress):
            report.read += 1
            if isinstance(result, SkipImage):
                if on_error == "fail":
                    raise ConvertError(str(result)) from result
                report.skip(result.reason, str(result))
                continue
            jpeg, resized, reencoded = result
            writer.write(key, jpeg, label, meta)
            report.written += 1
            report.resized += resized
            report.reencoded += reencoded
    except BaseException:
        writer.abort()
        raise


def _finish(writer: ShardSetWriter, report: ConvertReport, out: Path, source: str) -> ConvertReport:
    if report.written == 0:
        writer.abort()
        raise ConvertError(f"{report.source}: no image could be converted ({report.summary()})")
    (out / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    writer.close(num_classes=report.num_classes, source=source)  # writes manifest.json, last
    logger.info("%s", report.summary())
    return report


class _RecordLabels:
    """The image records of a ``.rec`` with their labels checked, and what disagrees counted into ``report.notes``.

    Reads stay on the calling thread (one file position); ``max_label`` grows as records are read.
    """

    def __init__(self, source: InsightFaceRec, rec: str | os.PathLike[str], report: ConvertReport) -> None:
        self.source, self.rec, self.report = source, rec, report
        # Identity records hold contiguous [first, end) image ranges in class order: a binary search finds the
        # range, if any, that holds an image key.
        self.starts = np.array([first for first, _ in source.identity_ranges], np.int64)
        self.ends = np.array([end for _, end in source.identity_ranges], np.int64)
        if source.num_classes is not None and len(self.starts) and len(self.starts) != source.num_classes:
            report.notes[f"identity records ({len(self.starts)}) that disagree with property num_classes"] = 1
        self.num_classes, self.max_label = source.num_classes, -1
        if source.num_missing_images:
            report.notes["image records missing from the index"] = source.num_missing_images
        self.rec_name = os.path.basename(str(rec))

    def read(self, position: int) -> tuple[str, bytes, int, dict[str, Any]]:
        """``(sample key, image bytes, label, key.json)`` of the image record at ``position`` in the index."""
        source, rec, num_classes = self.source, self.rec, self.num_classes
        key = source.image_keys[position]
        header, image = source.read(key)  # file reads stay on the calling thread (one file position)
        where = f"{rec}: record {key} at byte offset {source.offset(key)}"
        raw = first_label(header)
        label = int(raw)
        if raw != label or label < 0 or (num_classes is not None and label >= num_classes):
            limit = f" (num_classes {num_classes})" if num_classes is not None else ""
            raise LabelError(f"{where}: label {raw!r} is not a class id{limit}", str(rec), str(key))
        return f"r{key:010d}", image, label, {"source": "rec", "file": self.rec_name, "record": key}

    def labelled(self, order: list[int]) -> Iterator[tuple[str, bytes, int, dict[str, Any]]]:
        """The records at ``order``'s positions, read in that order; a label outside its identity range is noted."""
        for position in order:
            item = self.read(position)
            key, label = item[3]["record"], item[2]
            self.max_label = max(self.max_label, label)
            owner = int(np.searchsorted(self.starts, key, side="right")) - 1
            if owner >= 0 and key < self.ends[owner] and owner != label:
                what = "labels that disagree with their identity record"
                self.report.notes[what] = self.report.notes.get(what, 0) + 1
            yield item


def from_rec(
    rec: str | os.PathLike[str],
    out: str | os.PathLike[str],
    idx: str | os.PathLike[str] | None = None,
    *,
    samples_per_shard: int = 1000,
    seed: int = 0,
    resize: Resize = "stretch",
    on_error: OnError = "skip",
    num_threads: int | None = None,
    progress: bool = True,
) -> ConvertReport:
    """Convert an InsightFace ``train.rec``/``train.idx`` pair into shuffled shards in ``out``.

    Labels are the image records' (first) float labels as integers; ``num_classes`` comes from the ``property``
    file beside the ``.rec``, else from the identity records, else ``max label + 1``. An image whose label
    disagrees with the identity record whose range holds it is written with its own label and counted in
    ``notes`` (arcface_torch trains on the image label too).

    Args:
        rec: The ``.rec`` file.
        out: Output directory.
        idx: The ``.idx`` file (default: beside ``rec``).
        samples_per_shard: Samples per shard.
        seed: Seed of the global shuffle.
        resize: Policy for images that are not 112x112.
        on_error: ``"skip"`` counts undecodable images; ``"fail"`` raises on the first.
        num_threads: Threads checking and re-encoding images. Default 1: ``.rec`` images are nearly always
            112x112 JPEGs, whose decode check holds the GIL, so threads only contend with the writer (measured on
            2 cores: 1,340 img/s with 1 thread, 850 with 2); pass more when many images need resizing.
        progress: Show a progress bar.

    Returns:
        The report (also in ``out/convert_report.json``).

    Raises:
        RecordIOError: A malformed ``.rec``/``.idx``/``property`` (names the file and byte offset).
        LabelError: A negative, fractional or out-of-range label (names the record).
        ConvertError: Under ``on_error="fail"``, an undecodable image; or nothing could be converted.
    """
    out = Path(out)
    source = InsightFaceRec(rec, idx)
    report = ConvertReport(source=str(rec), out=str(out))
    with source:
        records = _RecordLabels(source, rec, report)
        order = np.random.default_rng(seed).permutation(len(source.image_keys))

        def prepare(item: tuple[str, bytes, int, dict[str, Any]]) -> _Prepared:
            key, image, label, meta = item
            try:
                return key, prepare_image(image, f"{rec}: record {meta['record']}", resize=resize), label, meta
            except SkipImage as skip:
                return key, skip, label, meta

        writer = ShardSetWriter(out, prefix="shard", samples_per_shard=samples_per_shard)
        prepared = _ordered_map(prepare, records.labelled(order.tolist()), num_threads or 1)
        _write_all(writer, report, prepared, on_error, len(order), progress)
    num_classes, max_label = records.num_classes, records.max_label
    report.num_classes = num_classes if num_classes is not None else max_label + 1
    if max_label >= _FLOAT32_EXACT:
        logger.warning("%s: labels reach %d; float32 .rec labels are exact only below %d", rec, max_label,
                       _FLOAT32_EXACT)  # fmt: skip
    return _finish(writer, report, out, f"InsightFace RecordIO {os.path.abspath(rec)}")


def list_folder(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[Path, int]], Counter[str]]:
    """List an image folder: class names in id order, ``(image path, class id)`` in sorted order, and notes.

    Raises:
        ConvertError: If ``root`` is not a directory or has no identity folder with an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConvertError(f"image folder not found: {root}")
    notes: Counter[str] = Counter()
    names, images = [], []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.is_dir():
            notes["files outside identity folders (ignored)"] += 1
            continue
        files = sorted(p for p in entry.rglob("*") if p.is_file())
        pictures = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        notes["non-image files (ignored)"] += len(files) - len(pictures)
        if not pictures:
            notes["identity folders without images (no class id)"] += 1
            continue
        images += [(p, len(names)) for p in pictures]
        names.append(entry.name)
    if not names:
        raise ConvertError(f"{root}: no sub-folder with images ({', '.join(IMAGE_EXTENSIONS)})")
    return names, images, +notes


def from_folder(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    samples_per_shard: int = 1000,
    seed: int = 0,
    resize: Resize = "stretch",
    on_error: OnError = "skip",
    num_threads: int | None = None,
    progress: bool = True,
    landmarks: str | os.PathLike[str] | None = None,
) -> ConvertReport:
    """Convert a folder with one sub-folder per identity into shuffled shards in ``out``.

    Class ids are the sorted sub-folder names' positions (see the module docstring); ``out/classes.json`` holds the
    names in id order. With ``landmarks``, images are aligned to the ArcFace template instead of resized.

    Args:
        root: Folder of identity folders (images may sit in nested folders inside an identity's folder).
        out: Output directory.
        samples_per_shard: Samples per shard.
        seed: Seed of the global shuffle.
        resize: Policy for images that are not 112x112 (not used with ``landmarks``).
        on_error: ``"skip"`` counts undecodable images (and, with ``landmarks``, images without usable landmarks);
            ``"fail"`` raises on the first.
        num_threads: Threads reading and re-encoding images (default: CPU count, at most 8; Pillow's decode and
            resize release the GIL: 122 -> 207 img/s from 1 to 2 threads for 250x250 inputs on 2 cores).
        progress: Show a progress bar.
        landmarks: CSV of five landmarks per image (:mod:`facescale.data.align`): align each image with them.

    Returns:
        The report (also in ``out/convert_report.json``).

    Raises:
        ConvertError: A missing or empty ``root``; under ``on_error="fail"``, an unreadable image (or one without
            usable landmarks, named with the CSV line).
        LandmarksError: The landmarks CSV is unreadable, or names an image the folder does not have (file, line).
    """
    root, out = Path(root), Path(out)
    names, images, notes = list_folder(root)
    table = read_landmarks(landmarks) if landmarks is not None else None
    if table is not None:  # a CSV for another folder: stop before anything is written
        table.check_images(path.relative_to(root).as_posix() for path, _ in images)
    report = ConvertReport(source=str(root), out=str(out), num_classes=len(names), notes=dict(notes))
    order = np.random.default_rng(seed).permutation(len(images))

    def prepare(index: int) -> _Prepared:
        path, label = images[index]
        relative = path.relative_to(root).as_posix()
        meta: dict[str, Any] = {"source": "folder", "path": relative, "class": names[label]}
        key = f"f{index:010d}"
        try:
            if table is not None:
                jpeg, provenance = prepare_aligned(path.read_bytes(), str(path), table.get(relative), table)
                return key, (jpeg, False, True), label, {**meta, **provenance}
            return key, prepare_image(path.read_bytes(), str(path), resize=resize), label, meta
        except OSError as exn:
            return key, SkipImage("unreadable file", f"{path}: {exn}"), label, meta
        except SkipImage as skip:
            return key, skip, label, meta

    writer = ShardSetWriter(out, prefix="shard", samples_per_shard=samples_per_shard)
    out.joinpath(CLASSES_NAME).write_text(json.dumps({"root": str(root.resolve()), "classes": names}, indent=1))
    prepared = _ordered_map(prepare, order.tolist(), num_threads or _default_threads())
    _write_all(writer, report, prepared, on_error, len(order), progress)
    report.aligned = report.written if table is not None else 0
    aligned = f", aligned to the ArcFace template with {table.path.resolve()}" if table is not None else ""
    return _finish(writer, report, out, f"image folder {root.resolve()}{aligned}")


__all__ = ["CLASSES_NAME", "MANIFEST_NAME", "REPORT_NAME", "ConvertError", "ConvertReport", "from_folder",
           "from_rec", "list_folder", "prepare_aligned", "prepare_image"]  # fmt: skip
