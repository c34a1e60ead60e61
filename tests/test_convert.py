"""Image-folder import: class ids from sorted folder names, resize policies counted, bad files reported."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from facescale.cli import main as facescale_main
from facescale.data import ConvertError, build_loader, from_folder, iter_shard, load_manifest, verify_manifest
from facescale.data.convert_images import prepare_image


def _image(seed: int, height: int = 112, width: int = 112, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _make_folder(root: Path) -> dict[str, tuple[str, bytes]]:
    """Three identities (one empty folder, one stray file, one text file); returns {relative path: (class, bytes)}."""
    files = {
        "bob/1.jpg": _image(1),
        "bob/2.JPG": _image(2, 150, 150),  # stretched
        "alice/a.png": _image(3, fmt="PNG"),  # re-encoded, not resized
        "alice/nested/b.jpg": _image(4, 112, 96),  # resized
        "carol/c.jpeg": _image(5, mode="L"),  # grayscale JPEG: re-encoded as RGB
        "carol/broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "carol/notes.txt": b"ignored",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "empty_identity").mkdir()
    (root / "stray.jpg").write_bytes(_image(6))
    return {name: (name.split("/")[0], data) for name, data in files.items()}


def _samples(out: Path) -> dict[str, dict]:
    manifest = load_manifest(out)
    return {json.loads(s["json"])["path"]: s for url in manifest.shard_urls() for s in iter_shard(url)}


def test_from_folder_assigns_sorted_ids_and_counts(tmp_path: Path) -> None:
    root, out = tmp_path / "faces", tmp_path / "out"
    files = _make_folder(root)
    report = from_folder(root, out, samples_per_shard=2, seed=0, num_threads=2, progress=False)
    assert (report.read, report.written, report.num_classes) == (6, 5, 3)
    assert report.skipped == {"corrupt image": 1} and "broken.jpg" in report.examples[0]
    assert (report.resized, report.reencoded) == (2, 4)
    assert report.notes == {"files outside identity folders (ignored)": 1, "non-image files (ignored)": 1,
                            "identity folders without images (no class id)": 1}  # fmt: skip
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert classes == ["alice", "bob", "carol"], "sorted folder names -> 0..N-1"
    manifest = load_manifest(out)
    assert manifest.num_classes == 3 and manifest.num_samples == 5 and len(manifest.shards) == 3
    verify_manifest(manifest, decode_images=True)
    samples = _samples(out)
    assert set(samples) == set(files) - {"carol/broken.jpg", "carol/notes.txt"}
    for path, sample in samples.items():
        assert classes[int(sample["cls"])] == files[path][0] == json.loads(sample["json"])["class"]
    assert samples["bob/1.jpg"]["jpg"] == files["bob/1.jpg"][1], "a 112x112 colour JPEG is copied unchanged"
    assert simplejpeg.decode_jpeg_header(samples["carol/c.jpeg"]["jpg"])[2] == "YCbCr"
    again = from_folder(root, tmp_path / "again", samples_per_shard=2, seed=0, num_threads=1, progress=False)
    assert again.written == 5 and load_manifest(tmp_path / "again").digest == manifest.digest, "deterministic"


def test_from_folder_resize_off_skips_and_fail_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    _make_folder(root)
    report = from_folder(root, tmp_path / "off", resize="off", num_threads=1, progress=False)
    assert report.skipped == {"corrupt image": 1, "wrong size": 2} and report.resized == 0
    with pytest.raises(ConvertError, match=r"broken\.jpg"):
        from_folder(root, tmp_path / "fail", on_error="fail", num_threads=1, progress=False)
    assert not (tmp_path / "fail" / "manifest.json").exists()
    with pytest.raises(ConvertError, match="image folder not found"):
        from_folder(tmp_path / "nowhere", tmp_path / "x", progress=False)


def test_center_crop_keeps_proportions() -> None:
    # A 112 (h) x 224 (w) image whose left and right quarters are red, middle green: a centre crop keeps the
    # green middle only, a stretch keeps all three bands.
    pixels = np.zeros((112, 224, 3), np.uint8)
    pixels[:, :56, 0] = pixels[:, 168:, 0] = 255
    pixels[:, 56:168, 1] = 255
    data = simplejpeg.encode_jpeg(pixels, quality=95)
    cropped, resized, _ = prepare_image(data, "x", resize="center_crop")
    stretched, _, _ = prepare_image(data, "x", resize="stretch")
    assert resized
    crop, stretch = simplejpeg.decode_jpeg(cropped), simplejpeg.decode_jpeg(stretched)
    assert crop.shape == stretch.shape == (112, 112, 3)
    assert crop[:, 5, 1].mean() > 200 and crop[:, 5, 0].mean() < 50
    assert stretch[:, 5, 0].mean() > 200


def test_folder_shards_train_through_the_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "faces"
    _make_folder(root)
    code = facescale_main(["data", "from-folder", "--root", str(root), "--out", str(tmp_path / "out"),
                           "--samples-per-shard", "3", "--threads", "1"])  # fmt: skip
    assert code == 0 and "skipped 1 (1 corrupt image)" in capsys.readouterr().out
    loader = build_loader(tmp_path / "out", batch_size=5, rank=0, world_size=1, seed=0, num_workers=0, train=False)
    (images, labels, keys), = list(loader.epoch_samples(0))
    assert images.shape == (5, 3, 112, 112) and sorted(labels.tolist()) == [0, 0, 1, 1, 2]
    assert facescale_main(["data", "from-folder", "--root", str(tmp_path / "nowhere"), "--out", "x"]) == 1
    assert "image folder not found" in capsys.readouterr().err
