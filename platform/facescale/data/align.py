"""Face alignment from five landmarks to the ArcFace 112×112 template, and the landmarks CSV that gives them.

A face detector (RetinaFace, SCRFD, MTCNN) reports five points per face: left eye, right eye, nose tip, left and
right mouth corner -- "left" as the image shows it (the subject's right eye). InsightFace aligns each face with
the similarity transform (rotation, uniform scale, translation; no shear, no mirror) that maps those points onto
five reference points by least squares, and warps the image with it to 112×112 (``norm_crop`` / ``estimate_norm``
in ``python-package/insightface/utils/face_align.py``, reference points ``arcface_src``; arcface_torch's training
sets are aligned this way). Here the transform is ``skimage.transform.SimilarityTransform.from_estimate`` (Umeyama's
least-squares estimate, as ``face_align.py`` uses) and the warp is bilinear with a black border, as
``cv2.warpAffine``'s defaults in ``norm_crop``. Coordinates are pixels, x to the right, y down, the centre of the
top-left pixel at (0, 0) -- the convention of detectors and of both libraries.

**When a row cannot align a face** (:class:`DegenerateLandmarks`; the converter counts it as a skip). InsightFace
aligns whatever the detector gives; these rules only catch points that cannot describe a face, and are loose
enough to keep profile views (insightface's left-profile reference points fit the frontal template at 14.0 px RMS):

- *coincident*: two points closer than 1 px, or than 1 % of the largest distance between two of the points;
- *collinear*: the points' spread across their main axis is under 10 % of the spread along it (smaller over
  larger singular value of the centred points; the template has 0.80, a left profile 0.45);
- *mirrored*: the least-squares affine map onto the template has a negative determinant -- the points are a mirror
  image of a face (left and right swapped); a similarity cannot mirror, so it would align such a face upside down
  or sideways rather than fail;
- *residual*: the fitted points miss the template by more than 20 px RMS in the 112×112 output. The worst any fit
  can do is 23.2 px, the template's own RMS spread (the transform that shrinks the points to the template's
  centre), so 20 px means the points explain less than a quarter of the template's shape: points of something
  that is not a face, or out of order. A row in the wrong column order (``x1..x5,y1..y5``) is caught by the mirror
  or this rule only about half the time: the column order must be right.

**The CSV** (``--landmarks``): one row per image, ``path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5`` in the order above,
``path`` relative to the image folder with ``/`` separators. A first row whose first cell is ``path`` is a header.
Blank rows are ignored. A row whose cells are not 11, or whose coordinates are not finite numbers, is *malformed*:
the converter skips its image (counted). A row naming an image twice, a row without a path and a row naming an
image the folder does not have are errors (:class:`LandmarksError`, naming the file, line and path): they mean
the CSV belongs to another folder, and the converter stops before it writes anything.
"""

from __future__ import annotations

import csv
import math
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facescale.data.errors import DataError

# insightface python-package/insightface/utils/face_align.py, ``arcface_src``: where the five points of a
# frontal face fall in an aligned 112×112 crop (left eye, right eye, nose, left mouth corner, right mouth corner).
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])  # fmt: skip
ALIGNED_SIZE = 112
LANDMARK_NAMES = ("left eye", "right eye", "nose", "left mouth corner", "right mouth corner")
MIN_SEPARATION_PX = 1.0
MIN_SEPARATION_FRACTION = 0.01
MIN_SPREAD_RATIO = 0.10
MAX_RMS_RESIDUAL_PX = 20.0
CSV_COLUMNS = 1 + 2 * len(LANDMARK_NAMES)


class LandmarksError(DataError):
    """A landmarks CSV that does not fit the image folder (unknown image, duplicate or pathless row, unreadable)."""


class DegenerateLandmarks(ValueError):
    """Five points from which no face alignment can be estimated; the message says which rule they break."""


@dataclass(frozen=True)
class Alignment:
    """A similarity transform from source-image pixels to the aligned crop.

    Attributes:
        matrix: ``[3, 3]`` homogeneous matrix mapping source ``(x, y, 1)`` to crop coordinates.
        scale: Its scale (crop pixels per source pixel).
        rotation_deg: Its rotation in degrees.
        rms_residual_px: RMS distance of the mapped landmarks from the template, in crop pixels.
    """

    matrix: np.ndarray
    scale: float
    rotation_deg: float
    rms_residual_px: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Maps ``[N, 2]`` source points into the crop."""
        points = np.asarray(points, dtype=np.float64)
        return points @ self.matrix[:2, :2].T + self.matrix[:2, 2]


def estimate_alignment(landmarks: np.ndarray) -> Alignment:
    """The least-squares similarity transform from five detected points to the ArcFace template.

    Args:
        landmarks: ``[5, 2]`` points ``(x, y)`` in source pixels, in :data:`LANDMARK_NAMES` order.

    Returns:
        The alignment.

    Raises:
        DegenerateLandmarks: The points break one of the rules in the module docstring (the message says which).
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != ARCFACE_TEMPLATE.shape or not np.isfinite(points).all():
        raise DegenerateLandmarks(f"expected 5 finite (x, y) points, got an array of shape {points.shape}")
    dist = np.linalg.norm(points[:, None] - points[None], axis=2)
    upper = np.triu_indices(len(points), 1)
    span = float(dist[upper].max())
    i, j = (int(k[np.argmin(dist[upper])]) for k in upper)
    if dist[i, j] < max(MIN_SEPARATION_PX, MIN_SEPARATION_FRACTION * span):
        raise DegenerateLandmarks(f"coincident landmarks: {LANDMARK_NAMES[i]} and {LANDMARK_NAMES[j]} are "
                                  f"{dist[i, j]:.2f} px apart (points {span:.1f} px across)")
    spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    if spread[1] < MIN_SPREAD_RATIO * spread[0]:
        raise DegenerateLandmarks(f"collinear landmarks: spread across their line is {spread[1] / spread[0]:.3f} "
                                  f"of the spread along it (< {MIN_SPREAD_RATIO})")
    # scikit-image is imported here, not at module import: `facescale.data` is imported by code that must run where
    # it is not installed (the GPU check's image), and only alignment needs it.
    from skimage.transform import AffineTransform, SimilarityTransform

    affine = AffineTransform.from_estimate(points, ARCFACE_TEMPLATE)
    if affine and np.linalg.det(affine.params[:2, :2]) < 0:
        raise DegenerateLandmarks("mirrored landmarks: the points are a mirror image of a face (left and right "
                                  "swapped?); a similarity transform cannot align them")
    tform = SimilarityTransform.from_estimate(points, ARCFACE_TEMPLATE)
    if not tform:
        raise DegenerateLandmarks(f"no similarity transform can be estimated: {tform}")
    residual = float(np.sqrt(np.mean(np.sum((tform(points) - ARCFACE_TEMPLATE) ** 2, axis=1))))
    if not residual <= MAX_RMS_RESIDUAL_PX:
        raise DegenerateLandmarks(f"the aligned landmarks miss the template by {residual:.1f} px RMS "
                                  f"(> {MAX_RMS_RESIDUAL_PX:g} px): not a face's five points in order?")
    return Alignment(matrix=np.array(tform.params), scale=float(tform.scale),
                     rotation_deg=math.degrees(float(tform.rotation)), rms_residual_px=residual)


def warp_to_template(image: np.ndarray, alignment: Alignment) -> np.ndarray:
    """Warps an image into the aligned 112×112 crop (bilinear; outside the source is black).

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        alignment: From :func:`estimate_alignment`.

    Returns:
        uint8 ``[112, 112, 3]``.
    """
    from skimage.transform import warp

    # warp() wants the map from output to input pixels; a 3x3 matrix takes its fast (Cython) path.
    inverse = np.linalg.inv(alignment.matrix)
    out = warp(image, inverse, output_shape=(ALIGNED_SIZE, ALIGNED_SIZE), order=1, mode="constant", cval=0.0,
               preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, Alignment]:
    """Aligns one face: :func:`estimate_alignment` then :func:`warp_to_template`."""
    alignment = estimate_alignment(landmarks)
    return warp_to_template(image, alignment), alignment


@dataclass(frozen=True)
class LandmarkRow:
    """One CSV row: its line, and its points or why it is malformed."""

    line: int
    points: np.ndarray | None
    problem: str | None = None


@dataclass
class LandmarkTable:
    """A landmarks CSV, by image path relative to the folder.

    Attributes:
        path: The CSV file.
        rows: Row per normalised relative path.
    """

    path: Path
    rows: dict[str, LandmarkRow] = field(default_factory=dict)

    def get(self, relative_path: str) -> LandmarkRow | None:
        """The row of an image (path relative to the folder), or None."""
        return self.rows.get(normalize_key(relative_path))

    def check_images(self, relative_paths: Iterable[str]) -> None:
        """Raises :class:`LandmarksError` for the first row (file order) naming an image not in ``relative_paths``."""
        known = {normalize_key(p) for p in relative_paths}
        for key, row in sorted(self.rows.items(), key=lambda kv: kv[1].line):
            if key not in known:
                raise LandmarksError(f"{self.path}:{row.line}: {key!r} is not an image of the folder (paths are "
                                     "relative to the folder, e.g. 'alice/1.jpg')")


def normalize_key(path: str) -> str:
    """A relative image path as the CSV and the folder listing compare it (``/`` separators, no ``./``)."""
    return posixpath.normpath(path.strip().replace("\\", "/"))


def _parse_points(cells: list[str]) -> tuple[np.ndarray | None, str | None]:
    if len(cells) != CSV_COLUMNS:
        return None, f"malformed landmarks row: {len(cells)} columns, expected {CSV_COLUMNS} (path,x1,y1,...,x5,y5)"
    values = []
    for n, cell in enumerate(cells[1:]):
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            axis, point = "xy"[n % 2], n // 2 + 1
            return None, f"malformed landmarks row: {axis}{point} {cell.strip()!r} is not a finite number"
        values.append(value)
    return np.asarray(values).reshape(len(LANDMARK_NAMES), 2), None


def read_landmarks(path: str | os.PathLike[str]) -> LandmarkTable:
    """Reads a landmarks CSV (format in the module docstring).

    Args:
        path: The CSV file.

    Returns:
        Its rows; malformed rows are kept with their problem (the converter skips their images).

    Raises:
        LandmarksError: Missing or unreadable file, no rows, a row without a path, an image named twice.
    """
    path = Path(path)
    table = LandmarkTable(path)
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                if not table.rows and cells[0].strip().lower() == "path":
                    continue  # header
                if not cells[0].strip():
                    raise LandmarksError(f"{path}:{line}: row without an image path")
                key = normalize_key(cells[0])
                if key in table.rows:
                    raise LandmarksError(f"{path}:{line}: {key!r} already has landmarks on line "
                                         f"{table.rows[key].line}")
                points, problem = _parse_points(cells)
                table.rows[key] = LandmarkRow(line, points, problem)
    except (OSError, UnicodeDecodeError, csv.Error) as exn:
        raise LandmarksError(f"cannot read landmarks file {path}: {exn}") from exn
    if not table.rows:
        raise LandmarksError(f"{path}: no landmark rows")
    return table


__all__ = ["ALIGNED_SIZE", "ARCFACE_TEMPLATE", "LANDMARK_NAMES", "Alignment", "DegenerateLandmarks", "LandmarkRow",
           "LandmarkTable", "LandmarksError", "align_face", "estimate_alignment", "normalize_key", "read_landmarks",
           "warp_to_template"]  # fmt: skip
