"""RecordIO reader and ``from-rec``: a .rec/.idx pair written here byte by byte, round-tripped through shards."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import simplejpeg

from facescale.cli import main as facescale_main
from facescale.data import InsightFaceRec, from_rec, iter_shard, load_manifest, verify_manifest
from facescale.data.recordio import MAGIC, RecordIOReader, unpack_record

_MAGIC = struct.pack("<I", MAGIC)


# --- a test writer that follows dmlc-core recordio.cc and mxnet recordio.py ------------------------------------


def write_record(f: BinaryIO, payload: bytes) -> int:
    """Write one record as dmlc's ``RecordIOWriter::WriteRecord`` does; return its offset.

    The payload is cut wherever the magic word sits at a 4-byte-aligned offset (only up to the last whole word);
    that word is dropped and the parts get flags 1 (first), 2 (middle), 3 (last), or 0 if there is one part.
    """
    offset = f.tell()
    cuts, start = [], 0
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i : i + 4] == _MAGIC:
            cuts.append(payload[start:i])
            start = i + 4
    parts = [*cuts, payload[start:]]
    for n, part in enumerate(parts):
        flag = 0 if len(parts) == 1 else 1 if n == 0 else 3 if n == len(parts) - 1 else 2
        f.write(struct.pack("<II", MAGIC, flag << 29 | len(part)))
        f.write(part + b"\0" * (-len(part) % 4))
    return offset


def pack(label: float | list[float], image: bytes, id1: int = 0, id2: int = 0) -> bytes:
    """mxnet ``recordio.pack``: a scalar label goes in the header; an array sets flag = len and follows it."""
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, id1, id2) + np.asarray(label, "<f4").tobytes() + image
    return struct.pack("<IfQQ", 0, label, id1, id2) + image


def jpeg(value: int, size: int = 112, comment: bytes = b"") -> bytes:
    rng = np.random.default_rng(value)
    data = simplejpeg.encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), quality=85)
    if comment:  # a COM segment right after SOI: still a valid JPEG
        data = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    return data


def write_insightface(
    root: Path, labels: list[int], sizes: dict[int, int] | None = None, magic_record: int | None = None,
    header: bool = True,
) -> dict[int, tuple[bytes, int]]:
    """Write ``root/train.rec``, ``train.idx`` and ``property`` in InsightFace's layout.

    Images are records ``1..n`` (sorted by label, as InsightFace packs them), identity records follow, record 0
    holds ``[id_start, id_end]``. Odd images carry array labels ``[label, 99]``. Returns ``{key: (jpeg, label)}``.
    """
    sizes = sizes or {}
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    images: dict[int, tuple[bytes, int]] = {}
    offsets: dict[int, int] = {}
    num_classes = max(labels) + 1
    with open(root / "train.rec", "wb") as f:
        first_key = 1 if header else 0
        id_start = first_key + len(labels)
        if header:
            offsets[0] = write_record(f, pack([float(id_start), float(id_start + num_classes)], b""))
        for n, i in enumerate(order):
            key = first_key + n
            comment = b""
            if key == magic_record:
                assert key % 2, "the padding below assumes the 8 bytes of array labels that odd keys carry"
                # Magic words at aligned payload offsets: id (offset 8) and id2 (offset 16) of the header, and one
                # in the JPEG comment, padded to a 4-aligned payload offset (24 header + 8 labels + 6 SOI/COM bytes).
                comment = b"\0" * (-(24 + 8 + 6) % 4) + _MAGIC + b"tail"
            data = jpeg(key, sizes.get(key, 112), comment)
            label: float | list[float] = [float(labels[i]), 99.0] if key % 2 else float(labels[i])
            id1, id2 = (MAGIC, MAGIC) if key == magic_record else (key, 0)
            offsets[key] = write_record(f, pack(label, data, id1, id2))
            images[key] = (data, labels[i])
        if header:
            keys_by_class = {c: [k for k, (_, lab) in images.items() if lab == c] for c in range(num_classes)}
            for c in range(num_classes):
                ks = keys_by_class[c]
                first, end = (min(ks), max(ks) + 1) if ks else (0, 0)
                offsets[id_start + c] = write_record(f, pack([float(first), float(end)], b""))
    (root / "train.idx").write_text("".join(f"{k}\t{off}\n" for k, off in offsets.items()))
    (root / "property").write_text(f"{num_classes},112,112\n")
    return images


# --- reader ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"abc", _MAGIC, b"abcd" + _MAGIC, _MAGIC + _MAGIC + b"xy", b"a" + _MAGIC + b"bcd", b"wxyz" * 3 + _MAGIC * 2],
)
def test_reader_joins_split_parts(tmp_path: Path, payload: bytes) -> None:
    with open(tmp_path / "r.rec", "wb") as f:
        first = write_record(f, payload)
        second = write_record(f, b"next")
    with RecordIOReader(tmp_path / "r.rec") as reader:
        assert reader.read_at(first)[0] == payload
        assert [p for _, p in reader] == [payload, b"next"]
        assert reader.read_at(second)[0] == b"next"


def part_flags(raw: bytes, pos: int = 0, one_record: bool = False) -> list[int]:
    """Continuation flags of the parts from ``pos`` (to the end, or to the end of one record)."""
    flags = []
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        length = lrec & (1 << 29) - 1
        pos += 8 + length + (-length % 4)
        if one_record and flags[-1] in (0, 3):
            break
    return flags


def test_writer_splits_at_aligned_magic_only(tmp_path: Path) -> None:
    with open(tmp_path / "r.rec", "wb") as f:
        write_record(f, b"abcd" + _MAGIC + b"ef")  # aligned: 2 parts
        write_record(f, b"a" + _MAGIC + b"bcd")  # unaligned: 1 part
    assert part_flags((tmp_path / "r.rec").read_bytes()) == [1, 3, 0]


def test_unpack_array_labels() -> None:
    header, image = unpack_record(pack([3.0, 7.0, 9.0], b"IMG", id1=5))
    assert header.flag == 3 and header.label == (3.0, 7.0, 9.0) and header.id == 5 and image == b"IMG"
    header, image = unpack_record(pack(4.0, b"IMG"))
    assert header.flag == 0 and header.label == 4.0 and image == b"IMG"


def test_insightface_layout(tmp_path: Path) -> None:
    labels = [2, 0, 1, 2, 0, 2]
    images = write_insightface(tmp_path, labels, magic_record=3)
    with InsightFaceRec(tmp_path / "train.rec") as rec:
        assert rec.num_classes == 3 and rec.image_size == (112, 112)
        assert rec.image_keys == [1, 2, 3, 4, 5, 6]
        assert rec.identity_ranges == [(1, 3), (3, 4), (4, 7)]
        header, image = rec.read(3)
        assert header.id == MAGIC and header.id2 == MAGIC and image == images[3][0]
        offset = rec.offset(3)
    # id, id2 and the JPEG comment each hold the magic word at an aligned offset: first, 2 middle, last part.
    assert part_flags((tmp_path / "train.rec").read_bytes(), offset, one_record=True) == [1, 2, 2, 3]


# --- from-rec ----------------------------------------------------------------------------------------------------


def test_from_rec_round_trips_every_image_and_label(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    labels = [i % 5 for i in range(23)]
    images = write_insightface(src, labels, sizes={4: 128}, magic_record=7)
    report = from_rec(src / "train.rec", out, samples_per_shard=8, seed=1, num_threads=2, progress=False)
    assert (report.read, report.written, report.skipped, report.resized) == (23, 23, {}, 1)
    assert report.num_classes == 5 and report.notes == {}
    manifest = load_manifest(out)
    assert manifest.num_samples == 23 and manifest.num_classes == 5 and len(manifest.shards) == 3
    verify_manifest(manifest, decode_images=True)
    samples = [s for url in manifest.shard_urls() for s in iter_shard(url)]
    by_record = {json.loads(s["json"])["record"]: s for s in samples}
    assert sorted(by_record) == sorted(images)
    for key, (data, label) in images.items():
        sample = by_record[key]
        assert sample["cls"] == str(label).encode(), f"record {key}"
        if key != 4:
            assert sample["jpg"] == data, f"record {key}: a 112x112 JPEG is copied unchanged"
    assert simplejpeg.decode_jpeg(by_record[4]["jpg"]).shape == (112, 112, 3)
    assert [json.loads(s["json"])["record"] for s in samples] != sorted(images), "globally shuffled"
    assert json.loads((out / "convert_report.json").read_text())["written"] == 23


def test_from_rec_without_header_or_property(tmp_path: Path) -> None:
    labels = [1, 0, 3, 2]
    images = write_insightface(tmp_path, labels, header=False)
    (tmp_path / "property").unlink()
    with InsightFaceRec(tmp_path / "train.rec") as rec:
        assert rec.image_keys == [0, 1, 2, 3] and rec.num_classes is None
    report = from_rec(tmp_path / "train.rec", tmp_path / "out", num_threads=1, progress=False)
    assert report.num_classes == 4 and report.written == 4
    samples = [s for url in load_manifest(tmp_path / "out").shard_urls() for s in iter_shard(url)]
    assert {json.loads(s["json"])["record"]: int(s["cls"]) for s in samples} == {k: v[1] for k, v in images.items()}


def test_cli_from_rec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_insightface(tmp_path, [0, 1, 1, 0])
    code = facescale_main(["data", "from-rec", "--rec", str(tmp_path / "train.rec"), "--idx",
                           str(tmp_path / "train.idx"), "--out", str(tmp_path / "out"), "--threads", "1"])  # fmt: skip
    assert code == 0
    assert "read 4, wrote 4 samples of 2 classes" in capsys.readouterr().out
    assert load_manifest(tmp_path / "out").num_samples == 4
