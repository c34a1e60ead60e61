"""Bad data is reported, never silently lost: each case gives an error naming where, or a counted skip."""

from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import webdataset as wds

from facescale.data import (
    MANIFEST_NAME,
    ConvertError,
    ImageDecodeError,
    LabelError,
    RecordIOError,
    ShardError,
    ShardSetWriter,
    build_loader,
    from_rec,
    iter_shard,
    load_manifest,
    verify_manifest,
)
from facescale.data.recordio import MAGIC


def _jpeg(i: int) -> bytes:
    return simplejpeg.encode_jpeg(np.random.default_rng(i).integers(0, 256, (112, 112, 3), np.uint8), quality=80)


def _write_set(root: Path, num_samples: int = 16, per_shard: int = 4, num_classes: int = 4,
               corrupt: tuple[str, ...] = ()) -> None:  # fmt: skip
    writer = ShardSetWriter(root, samples_per_shard=per_shard)
    for i in range(num_samples):
        key = f"k{i:03d}"
        writer.write(key, _jpeg(i)[: len(_jpeg(i)) // 2] if key in corrupt else _jpeg(i), i % num_classes)
    writer.close(num_classes=num_classes, source="test")


def _loader(root: Path, on_error: str = "fail", num_workers: int = 0):
    return build_loader(root, batch_size=4, rank=0, world_size=1, seed=0, num_workers=num_workers,
                        on_error=on_error, train=False)  # fmt: skip


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``{member name: (header offset, data end offset)}`` of a tar."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data + m.size) for m in tar.getmembers()}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_jpeg_is_a_counted_skip_or_an_error_naming_shard_and_key(tmp_path: Path, num_workers: int) -> None:
    _write_set(tmp_path, corrupt=("k006",))  # k006 lies in the second shard
    with pytest.raises(ImageDecodeError, match=r"shard .*shard-000001\.tar: sample 'k006': corrupt JPEG") as info:
        list(_loader(tmp_path, num_workers=num_workers).epoch_batches(0))
    if num_workers == 0:  # a DataLoader worker's error comes back as the same type, rebuilt from its message
        assert info.value.key == "k006" and info.value.shard.endswith("shard-000001.tar")
    lenient = _loader(tmp_path, "skip", num_workers)
    batches = list(lenient.epoch_batches(0))
    assert len(batches) == lenient.steps_per_epoch == 4, "the epoch stays full: a wrap-around fills the gap"
    assert lenient.stats["skipped_samples"] == 1 and lenient.stats["samples"] == 16


def test_truncated_tar_names_shard_and_offset(tmp_path: Path) -> None:
    _write_set(tmp_path)
    shard = tmp_path / "shard-000002.tar"
    offsets = _member_offsets(shard)
    header, end = offsets["k009.jpg"]
    cut = header + 512 + 300  # inside k009.jpg's data
    shard.write_bytes(shard.read_bytes()[:cut])
    message = (rf"shard {shard}: truncated or corrupt tar: ends at byte offset {cut} inside member 'k009\.jpg' "
               rf"\(header at byte offset {header}")  # fmt: skip
    with pytest.raises(ShardError, match=message):
        list(iter_shard(str(shard)))
    with pytest.raises(ShardError, match=message):
        list(_loader(tmp_path).epoch_batches(0))
    with pytest.raises(ShardError, match=message):
        verify_manifest(load_manifest(tmp_path))
    lenient = _loader(tmp_path, "skip")
    assert len(list(lenient.epoch_batches(0))) == 4 and lenient.stats["skipped_shards"] == 1


def test_tar_cut_at_a_member_boundary_names_the_offset(tmp_path: Path) -> None:
    _write_set(tmp_path)
    shard = tmp_path / "shard-000000.tar"
    boundary = _member_offsets(shard)["k002.cls"][0]  # k001's files are complete, k002's header is missing
    shard.write_bytes(shard.read_bytes()[:boundary])
    with pytest.raises(ShardError, match=rf"ends at byte offset {boundary} after member 'k001\.jpg' without the "
                                         r"end-of-archive block \(truncated\)"):  # fmt: skip
        list(iter_shard(str(shard)))
    data = bytearray((tmp_path / "shard-000001.tar").read_bytes())
    garbled = _member_offsets(tmp_path / "shard-000001.tar")["k005.cls"][0]
    data[garbled : garbled + 8] = b"garbage!"
    (tmp_path / "shard-000001.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"shard-000001\.tar: .*invalid header at byte offset {garbled}"):
        list(iter_shard(str(tmp_path / "shard-000001.tar")))


def test_sample_without_cls_names_its_key(tmp_path: Path) -> None:
    _write_set(tmp_path)
    with wds.TarWriter(str(tmp_path / "shard-000003.tar"), encoder=False) as tar:
        for i in range(12, 16):
            tar.write({"__key__": f"k{i:03d}", "jpg": _jpeg(i), **({"cls": b"1"} if i != 14 else {"txt": b"x"})})
    for on_error in ("fail", "skip"):  # a shard built wrong is never skipped
        with pytest.raises(LabelError, match=r"shard-000003\.tar: sample 'k014' has no \.cls \(has: jpg, txt\)"):
            list(_loader(tmp_path, on_error).epoch_batches(0))


def test_label_beyond_num_classes_is_an_error(tmp_path: Path) -> None:
    _write_set(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["num_classes"] = 3
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    for on_error in ("fail", "skip"):
        with pytest.raises(LabelError, match=r"sample 'k0(03|07|11|15)' has label 3 >= num_classes 3"):
            list(_loader(tmp_path, on_error).epoch_batches(0))


def _record(payload: bytes) -> bytes:
    return struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)


def _write_rec(root: Path, labels: list[float]) -> list[int]:
    offsets, data = [], b""
    for key, label in enumerate(labels):
        offsets.append(len(data))
        data += _record(struct.pack("<IfQQ", 0, label, key, 0) + _jpeg(key))
    (root / "train.rec").write_bytes(data)
    (root / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    return offsets


def test_rec_with_bad_magic_names_the_byte_offset(tmp_path: Path) -> None:
    offsets = _write_rec(tmp_path, [0.0, 1.0, 0.0, 1.0])
    data = bytearray((tmp_path / "train.rec").read_bytes())
    data[offsets[2]] ^= 0xFF
    (tmp_path / "train.rec").write_bytes(bytes(data))
    rec = tmp_path / "train.rec"
    with pytest.raises(RecordIOError, match=rf"{rec}: bad RecordIO magic 0x[0-9A-F]{{8}} at byte offset {offsets[2]}"
                       ) as info:  # fmt: skip
        from_rec(rec, tmp_path / "out", num_threads=1, progress=False)
    assert info.value.offset == offsets[2] and info.value.path == str(rec)
    (tmp_path / "train.idx").write_text(f"0\t{offsets[1] + 4}\n")  # an index that points into a record
    with pytest.raises(RecordIOError, match=rf"at byte offset {offsets[1] + 4}"):
        from_rec(rec, tmp_path / "out2", num_threads=1, progress=False)


def test_rec_labels_must_be_class_ids(tmp_path: Path) -> None:
    _write_rec(tmp_path, [0.0, 2.5, 1.0])
    with pytest.raises(LabelError, match=r"record 1 at byte offset \d+: label 2\.5 is not a class id"):
        from_rec(tmp_path / "train.rec", tmp_path / "out", num_threads=1, progress=False)
    _write_rec(tmp_path, [0.0, 1.0, 5.0])
    (tmp_path / "property").write_text("3,112,112")
    with pytest.raises(LabelError, match=r"record 2 at byte offset \d+: label 5\.0 is not a class id \(num_classes 3"):
        from_rec(tmp_path / "train.rec", tmp_path / "out", num_threads=1, progress=False)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_rec_corrupt_image_is_counted(tmp_path: Path) -> None:
    offsets = _write_rec(tmp_path, [0.0, 1.0, 0.0, 1.0])
    data = bytearray((tmp_path / "train.rec").read_bytes())
    start = offsets[1] + 8 + 24  # record 1's JPEG: overwrite its start of scan onwards with junk
    data[start + 200 : offsets[2] - 8] = b"\x00" * (offsets[2] - 8 - start - 200)
    (tmp_path / "train.rec").write_bytes(bytes(data))
    report = from_rec(tmp_path / "train.rec", tmp_path / "out", num_threads=1, progress=False)
    assert (report.read, report.written, report.skipped) == (4, 3, {"corrupt image": 1})
    assert "record 1" in report.examples[0]
    with pytest.raises(ConvertError, match=rf"{tmp_path / 'train.rec'}: record 1: corrupt image"):
        from_rec(tmp_path / "train.rec", tmp_path / "out2", on_error="fail", num_threads=1, progress=False)
