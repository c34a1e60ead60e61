"""One source image made into the JPEG a shard stores: copied, re-encoded and resized, or aligned from landmarks.

The converters (:mod:`facescale.data.convert`) call these per image, on their threads; the policies (``resize``,
alignment to the ArcFace template) are described there.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from facescale.data.align import DegenerateLandmarks, LandmarkRow, LandmarkTable, align_face
from facescale.data.manifest import IMAGE_SIZE

Resize = Literal["stretch", "center_crop", "off"]
JPEG_QUALITY = 95  # re-encoded images only; JPEGs of the right size are copied unchanged


class SkipImage(Exception):
    """An image that is not converted; ``reason`` is the report's count key, the message names the image."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def prepare_image(data: bytes, where: str, image_size: tuple[int, int] = IMAGE_SIZE,
                  resize: Resize = "stretch") -> tuple[bytes, bool, bool]:  # fmt: skip
    """Turn source image bytes into the JPEG stored in a shard.

    Args:
        data: Encoded image (any format Pillow reads).
        where: Names the image in skip messages.
        image_size: Target ``(height, width)``.
        resize: Policy for images of another size (see :mod:`facescale.data.convert`).

    Returns:
        ``(jpeg, resized, reencoded)``.

    Raises:
        SkipImage: If the image cannot be decoded, or has another size under ``resize="off"``.
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        height = width = -1
        colorspace = ""
    if (height, width) == tuple(image_size) and colorspace in ("YCbCr", "RGB"):
        try:
            simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: a truncated or garbled stream raises
            return data, False, False
        except ValueError as exn:
            raise SkipImage("corrupt image", f"{where}: corrupt image: JPEG: {exn}") from exn
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")  # decodes fully: a cut-off file fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        raise SkipImage("corrupt image", f"{where}: corrupt image: {exn}") from exn
    target_h, target_w = image_size
    resized = image.size != (target_w, target_h)
    if resized:
        if resize == "off":
            raise SkipImage("wrong size", f"{where}: {image.height}x{image.width}, expected {target_h}x{target_w}")
        if resize == "center_crop":
            scale = min(image.width / target_w, image.height / target_h)
            crop_w, crop_h = target_w * scale, target_h * scale
            left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
            image = image.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))
        # Pillow's bicubic resize is antialiased when shrinking (its filter support scales with the factor).
        image = image.resize((target_w, target_h), Image.Resampling.BICUBIC)
    jpeg = simplejpeg.encode_jpeg(np.asarray(image), quality=JPEG_QUALITY, colorspace="RGB")
    return jpeg, resized, True


def prepare_aligned(data: bytes, where: str, row: LandmarkRow | None,
                    table: LandmarkTable) -> tuple[bytes, dict[str, Any]]:
    """Align source image bytes to the ArcFace template with their landmarks row; the JPEG stored in a shard.

    Args:
        data: Encoded image (any format Pillow reads).
        where: Names the image in skip messages.
        row: Its landmarks row, or None if the CSV has none.
        table: The landmarks CSV (named in skip messages).

    Returns:
        ``(jpeg, key.json fields saying where the alignment came from)``.

    Raises:
        SkipImage: No row, a malformed or degenerate row, or an undecodable image.
    """
    if row is None:
        raise SkipImage("no landmarks", f"{where}: no landmarks: {table.path} has no row for it")
    at = f"{table.path}:{row.line}"
    if row.points is None:
        raise SkipImage("malformed landmarks", f"{where}: {at}: {row.problem}")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = np.asarray(opened.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        raise SkipImage("corrupt image", f"{where}: corrupt image: {exn}") from exn
    try:
        aligned, alignment = align_face(image, row.points)
    except DegenerateLandmarks as exn:
        raise SkipImage("degenerate landmarks", f"{where}: {at}: degenerate landmarks: {exn}") from exn
    jpeg = simplejpeg.encode_jpeg(aligned, quality=JPEG_QUALITY, colorspace="RGB")
    return jpeg, {"landmarks_line": row.line, "align_rms_px": round(alignment.rms_residual_px, 3),
                  "align_scale": round(alignment.scale, 5), "align_rotation_deg": round(alignment.rotation_deg, 3)}
