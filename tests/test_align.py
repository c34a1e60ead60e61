"""5-landmark alignment: synthetic faces with known landmarks land on the ArcFace template within 1 px through
`facescale data from-folder --landmarks`; missing, malformed and degenerate rows are counted skips (or errors under
`--on-error fail`, naming the CSV line); a row for an image the folder lacks is an error before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from scipy import ndimage

from facescale.cli import main as facescale_main
from facescale.data import ConvertError, from_folder, iter_shard, load_manifest
from facescale.data.align import (
    ARCFACE_TEMPLATE,
    DegenerateLandmarks,
    LandmarksError,
    estimate_alignment,
    read_landmarks,
)

BACKGROUND, BLOB = 30.0, 230.0
BLOB_SIGMA = 2.5  # template pixels


def similarity(scale: float, angle_deg: float, shift: np.ndarray) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), shift[0]],
                     [scale * math.sin(a), scale * math.cos(a), shift[1]], [0, 0, 1]])


def render_face(rng: np.random.Generator, size: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """A "face": five Gaussian blobs at the template landmarks, put through a random similarity into a larger image.

    Returns:
        ``(uint8 [size, size, 3] image, [5, 2] landmarks where the blobs' centres are)``.
    """
    scale, angle = rng.uniform(1.2, 2.0), rng.uniform(-40, 40)
    centre = rng.uniform(0.4 * size, 0.6 * size, 2)
    rot = similarity(scale, angle, np.zeros(2))
    shift = centre - rot[:2, :2] @ np.array([56.0, 72.0])
    m = similarity(scale, angle, shift)
    landmarks = ARCFACE_TEMPLATE @ m[:2, :2].T + m[:2, 2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)  # pixel centres at integer coordinates
    img = np.full((size, size), BACKGROUND)
    sigma = BLOB_SIGMA * scale
    for x, y in landmarks:
        img += (BLOB - BACKGROUND) * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.stack([img, img, img], axis=-1), landmarks


def blob_centres(image: np.ndarray) -> np.ndarray:
    """``[K, 2]`` intensity-weighted centres ``(x, y)`` of the bright blobs of an image."""
    gray = image.astype(np.float64).mean(axis=2) - BACKGROUND
    labels, count = ndimage.label(gray > 0.3 * (BLOB - BACKGROUND))
    centres = ndimage.center_of_mass(gray.clip(min=0), labels, range(1, count + 1))
    return np.array([(c, r) for r, c in centres])


def csv_row(path: str, points: np.ndarray) -> str:
    return ",".join([path, *(f"{v:.4f}" for v in np.asarray(points).ravel())])


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def shard_samples(out: Path) -> dict[str, dict]:
    manifest = load_manifest(out)
    return {json.loads(s["json"])["path"]: s for url in manifest.shard_urls() for s in iter_shard(url)}


# Rows that cannot align a face, and the skip reason each gets.
BAD_ROWS = {
    "carol/wrong_columns.png": ("carol/wrong_columns.png,1,2,3,4,5,6,7,8,9", "malformed landmarks"),
    "carol/not_a_number.png": ("carol/not_a_number.png,40,50,70,50,56,70,x,90,70,90", "malformed landmarks"),
    "carol/collinear.png": (csv_row("carol/collinear.png", [[10, 10], [20, 20], [30, 30], [40, 40], [50, 50.5]]),
                            "degenerate landmarks"),
    "carol/coincident.png": (csv_row("carol/coincident.png", np.r_[ARCFACE_TEMPLATE[:4], ARCFACE_TEMPLATE[3:4]]),
                             "degenerate landmarks"),
    # left and right swapped (eyes and mouth corners): the mirror image of a face
    "carol/mirrored.png": (csv_row("carol/mirrored.png", ARCFACE_TEMPLATE[[1, 0, 2, 4, 3]]), "degenerate landmarks"),
    # nose above the eyes, mouth corners at the eyes: not a face's points in this order
    "carol/scrambled.png": (csv_row("carol/scrambled.png", ARCFACE_TEMPLATE[[1, 3, 2, 4, 0]] * 1.5 + 20),
                            "degenerate landmarks"),
}


def make_folder(root: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Good faces in alice/ and bob/ (one without a CSV row), and one image per bad row in carol/."""
    rng = np.random.default_rng(seed)
    good, rows = {}, ["path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"]
    for name in ["alice/0.png", "alice/1.png", "alice/sub/2.png", "bob/0.png", "bob/1.png"]:
        image, landmarks = render_face(rng)
        save_png(root / name, image)
        good[name] = landmarks
        rows.append(csv_row(name, landmarks))
    save_png(root / "bob/no_row.png", render_face(rng)[0])
    for name, (row, _) in BAD_ROWS.items():
        save_png(root / name, render_face(rng)[0])
        rows.append(row)
    csv = root.parent / "landmarks.csv"
    csv.write_text("\n".join(rows) + "\n\n")
    return csv, good


def test_aligned_shards_put_the_blobs_on_the_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = tmp_path / "faces", tmp_path / "out"
    csv, good = make_folder(root)
    rc = facescale_main(["data", "from-folder", "--root", str(root), "--out", str(out), "--landmarks", str(csv),
                         "--threads", "2"])
    printed = capsys.readouterr().out
    assert rc == 0 and "5 aligned from landmarks" in printed
    report = json.loads((out / "convert_report.json").read_text())
    assert report["skipped"] == {"no landmarks": 1, "malformed landmarks": 2, "degenerate landmarks": 4}
    assert (report["written"], report["aligned"], report["resized"]) == (5, 5, 0)
    samples = shard_samples(out)
    assert set(samples) == set(good)
    worst = 0.0
    for name, sample in samples.items():
        aligned = simplejpeg.decode_jpeg(sample["jpg"])
        assert aligned.shape == (112, 112, 3)
        centres = blob_centres(aligned)
        assert len(centres) == 5, name
        # each template point's nearest blob centre: the re-aligned landmarks match the template within 1 px
        dist = np.linalg.norm(ARCFACE_TEMPLATE[:, None] - centres[None], axis=2).min(axis=1)
        assert dist.max() < 1.0, (name, dist)
        worst = max(worst, float(dist.max()))
        meta = json.loads(sample["json"])
        assert meta["align_rms_px"] < 0.01 and meta["landmarks_line"] >= 2
    assert worst < 1.0
    reasons = {e.split(": ")[0].split("/")[-1]: e for e in report["examples"]}
    assert f"{csv}:8: malformed landmarks row: x4 'x' is not a finite number" in reasons["not_a_number.png"]
    assert "malformed landmarks row: 10 columns, expected 11" in reasons["wrong_columns.png"]
    assert "collinear landmarks" in reasons["collinear.png"]
    assert "coincident landmarks: left mouth corner and right mouth corner" in reasons["coincident.png"]
    assert "mirrored landmarks" in reasons["mirrored.png"]
    assert "miss the template by" in reasons["scrambled.png"]
    assert f"no landmarks: {csv} has no row for it" in reasons["no_row.png"]


def test_without_landmarks_the_same_folder_is_stretched(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    make_folder(root)
    report = from_folder(root, tmp_path / "plain", num_threads=1, progress=False)
    assert (report.written, report.aligned, report.resized) == (12, 0, 12)


def test_on_error_fail_names_the_image_and_csv_line(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    csv, good = make_folder(root)
    with pytest.raises(ConvertError, match=rf"carol/\w+\.png: {csv}:\d+: |no_row\.png: no landmarks"):
        from_folder(root, tmp_path / "fail", landmarks=csv, on_error="fail", num_threads=1, progress=False)
    assert not (tmp_path / "fail" / "manifest.json").exists()
    only = tmp_path / "only.csv"  # one degenerate row, the rest good: the error is that row's
    rows = [csv_row(n, p) for n, p in good.items()] + [BAD_ROWS["carol/mirrored.png"][0]]
    only.write_text("\n".join(rows) + "\n")
    for name in [*BAD_ROWS, "bob/no_row.png"]:
        if name != "carol/mirrored.png":
            (root / name).unlink()
    with pytest.raises(ConvertError, match=rf"mirrored\.png: {only}:6: degenerate landmarks: mirrored landmarks"):
        from_folder(root, tmp_path / "fail2", landmarks=only, on_error="fail", num_threads=1, progress=False)


def test_rows_that_do_not_fit_the_folder_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "faces"
    csv, good = make_folder(root)
    stray = tmp_path / "stray.csv"
    stray.write_text(csv.read_text() + csv_row("dave/0.png", ARCFACE_TEMPLATE) + "\n")
    with pytest.raises(LandmarksError, match=rf"{stray}:14: 'dave/0.png' is not an image of the folder"):
        from_folder(root, tmp_path / "x", landmarks=stray, progress=False)
    assert not (tmp_path / "x").exists(), "nothing written"
    rc = facescale_main(["data", "from-folder", "--root", str(root), "--out", str(tmp_path / "y"), "--landmarks",
                         str(stray)])
    assert rc == 1 and "stray.csv:14: 'dave/0.png' is not an image" in capsys.readouterr().err
    dup = tmp_path / "dup.csv"
    dup.write_text(csv_row("alice/0.png", ARCFACE_TEMPLATE) + "\n" + csv_row("./alice//0.png", ARCFACE_TEMPLATE))
    with pytest.raises(LandmarksError, match=r"dup.csv:2: 'alice/0.png' already has landmarks on line 1"):
        read_landmarks(dup)
    (tmp_path / "nopath.csv").write_text(csv_row("", ARCFACE_TEMPLATE) + "\n")
    with pytest.raises(LandmarksError, match=r"nopath.csv:1: row without an image path"):
        read_landmarks(tmp_path / "nopath.csv")
    with pytest.raises(LandmarksError, match="cannot read landmarks file"):
        read_landmarks(tmp_path / "missing.csv")


def test_estimate_alignment_inverts_a_known_similarity() -> None:
    m = similarity(1.7, 23.0, np.array([40.0, -12.0]))
    landmarks = ARCFACE_TEMPLATE @ m[:2, :2].T + m[:2, 2]
    alignment = estimate_alignment(landmarks)
    np.testing.assert_allclose(alignment.matrix, np.linalg.inv(m), atol=1e-9)
    np.testing.assert_allclose(alignment.apply(landmarks), ARCFACE_TEMPLATE, atol=1e-9)
    assert alignment.scale == pytest.approx(1 / 1.7) and alignment.rotation_deg == pytest.approx(-23.0)
    assert alignment.rms_residual_px < 1e-9


def test_degenerate_rules_and_what_they_keep() -> None:
    # insightface's left-profile reference points (face_align.py, src1) still align: the rules only catch non-faces
    profile = np.array([[51.642, 50.115], [57.617, 49.990], [35.740, 69.007], [51.157, 89.050], [57.025, 89.702]])
    assert 13 < estimate_alignment(profile).rms_residual_px < 15
    cases = {
        "coincident landmarks: left eye and right eye": np.r_[ARCFACE_TEMPLATE[:1], ARCFACE_TEMPLATE[:1] + 0.5,
                                                              ARCFACE_TEMPLATE[2:]],
        "collinear landmarks": np.c_[np.linspace(0, 80, 5), np.linspace(0, 40, 5) + [0, 1, 0, -1, 0]],
        "mirrored landmarks": ARCFACE_TEMPLATE * [-1, 1],
        "miss the template by": ARCFACE_TEMPLATE[[1, 3, 2, 4, 0]],
        "expected 5 finite": ARCFACE_TEMPLATE[:4],
    }
    for message, points in cases.items():
        with pytest.raises(DegenerateLandmarks, match=message):
            estimate_alignment(points)
    upside_down = ARCFACE_TEMPLATE[::-1]  # read in reverse order: the same face turned 180 degrees, a valid similarity
    assert abs(estimate_alignment(upside_down).rotation_deg) > 170
