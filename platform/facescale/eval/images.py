"""Aligned face crops from image files: for IJB image lists and 1:N gallery/probe/distractor folders.

Evaluation expects crops already aligned to the ArcFace 112×112 template (as ``.bin`` sets ship them); nothing
here detects or aligns faces, and a crop of another size is an error naming the file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
JPEG_SOI = b"\xff\xd8"  # the start-of-image marker every JPEG stream begins with


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes as uint8 ``[H, W, 3]`` RGB: simplejpeg for a JPEG, PIL for anything else.

    A JPEG that libjpeg-turbo rejects (simplejpeg raises ``ValueError`` for every failure) gets a second try with
    PIL, as does every image where simplejpeg is not installed. The one copy of this fallback: ``.bin`` sets
    (``verification.load_bin``) and image folders (``read_aligned_image``) both decode with it.

    Raises:
        Exception: Whatever PIL raises for bytes it cannot read either (many types); callers re-raise it naming
            the file or image.
    """
    if data[:2] == JPEG_SOI:  # simplejpeg reads only JPEG; anything else would fail there anyway
        try:
            import simplejpeg

            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except (ImportError, ValueError):
            pass
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class ImageFolderError(ValueError):
    """A missing, undecodable or wrongly sized image, or a folder without images; names the path."""


def read_aligned_image(path: Path, image_size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """One aligned crop as uint8 ``[H, W, 3]`` RGB.

    Args:
        path: Image file.
        image_size: Expected ``(H, W)``.

    Returns:
        The image.

    Raises:
        ImageFolderError: Missing, undecodable or of another size.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageFolderError(f"cannot read image {path}: {exc}") from exc
    try:
        arr = decode_rgb(data)
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for bad files; re-raised naming it
        raise ImageFolderError(f"cannot decode image {path}: {exc}") from exc
    if arr.shape != (*image_size, 3):
        raise ImageFolderError(f"image {path} is {arr.shape[1]}x{arr.shape[0]}, expected an aligned "
                               f"{image_size[1]}x{image_size[0]} crop")
    return arr


def read_images(root: str | Path, names: Sequence[str], desc: str = "images") -> np.ndarray:
    """Reads ``root / name`` for every name, in order.

    Args:
        root: Directory the names are relative to.
        names: Image file names (e.g. the first column of an IJB meta file).
        desc: Progress-bar label.

    Returns:
        uint8 ``[len(names), 112, 112, 3]``.
    """
    root = Path(root)
    out = np.empty((len(names), 112, 112, 3), dtype=np.uint8)
    for i, name in enumerate(tqdm(names, desc=desc, unit="img", mininterval=2.0)):
        out[i] = read_aligned_image(root / name)
    return out


def list_identity_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images of a folder with one sub-folder per identity (``root/<identity>/<image>``).

    Args:
        root: The folder.

    Returns:
        ``(paths, labels [N] int64, identity names)``; ``labels`` index into the sorted identity names.

    Raises:
        ImageFolderError: Missing folder or no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"image folder not found: {root}")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(label)
    if not paths:
        raise ImageFolderError(f"{root}: no images in <identity>/ sub-folders")
    return paths, np.asarray(labels, np.int64), names


def list_images(root: str | Path) -> list[Path]:
    """Every image under ``root`` (recursively), sorted; raises :class:`ImageFolderError` if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ImageFolderError(f"{root}: no images")
    return paths
