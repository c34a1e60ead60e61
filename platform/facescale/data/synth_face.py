"""Face traits and drawing primitives of the synthetic renderer (``synth_render``).

The identity traits (name, low, high) a latent in ``[0, 1]^NUM_TRAITS`` decodes into, the skin/hair/iris palettes,
anti-aliased signed-distance helpers, the pose transform and the small records the drawing steps pass each other.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

OCCLUDERS = ("sunglasses", "mask", "patch")  # what the renderer draws in front of a face

# Canonical landmarks, in [-1, 1] units of a 112x112 crop, from the ArcFace alignment template (insightface
# `utils/face_align.py`, `arcface_dst`): eyes (38.3, 51.7) and (73.5, 51.5), nose tip (56.0, 71.7), mouth corners
# (41.5, 92.4) and (70.7, 92.2). Identity traits vary around them: eye_dx ~0.31, eye_y ~-0.08, nose ~0.28, mouth ~0.65.
_TRAITS: tuple[tuple[str, float, float], ...] = (
    ("head_w", 0.62, 0.80), ("head_h", 0.98, 1.12), ("head_cy", -0.05, 0.08), ("jaw", 0.05, 0.40),
    ("skin_tone", 0.0, 1.0), ("skin_red", 0.0, 1.0), ("hair_color", 0.0, 0.999), ("hair_light", -0.12, 0.12),
    ("hair_style", 0.0, 0.999), ("hairline", -0.80, -0.42), ("hair_curve", 0.0, 0.5), ("hair_tilt", -0.2, 0.2),
    ("hair_volume", 0.03, 0.16), ("hair_freq", 15.0, 60.0),
    ("eye_dx", 0.27, 0.36), ("eye_y", -0.14, -0.02), ("eye_w", 0.09, 0.135), ("eye_h", 0.38, 0.60),
    ("eye_tilt", -0.15, 0.15), ("iris", 0.0, 0.999), ("iris_r", 0.45, 0.62),
    ("brow_dy", 0.11, 0.19), ("brow_th", 0.018, 0.05), ("brow_arch", 0.0, 0.07), ("brow_slant", -0.06, 0.06),
    ("brow_len", 0.9, 1.4), ("nose_v", 0.20, 0.34), ("nose_w", 0.07, 0.13), ("nose_shade", 0.06, 0.25),
    ("mouth_v", 0.56, 0.70), ("mouth_w", 0.17, 0.29), ("lip_up", 0.018, 0.045), ("lip_lo", 0.025, 0.065),
    ("lip_red", 0.0, 1.0), ("mouth_curve", -0.04, 0.04), ("ear_v", -0.05, 0.15), ("ear_h", 0.10, 0.17),
    ("blush", 0.0, 0.25), ("freckles", 0.0, 1.0), ("beard", 0.0, 0.999), ("mole_n", 0.0, 1.0),
    ("mole_size", 0.012, 0.028), ("mole1_u", -0.5, 0.5), ("mole1_v", -0.3, 0.8), ("mole2_u", -0.5, 0.5),
    ("mole2_v", -0.3, 0.8), ("mole3_u", -0.5, 0.5), ("mole3_v", -0.3, 0.8),
)  # fmt: skip
_NAMES = tuple(t[0] for t in _TRAITS)
_LO = np.array([t[1] for t in _TRAITS], np.float64)
_HI = np.array([t[2] for t in _TRAITS], np.float64)
NUM_TRAITS = len(_TRAITS)

_SKIN = np.array([(0.96, 0.80, 0.69), (0.89, 0.70, 0.56), (0.76, 0.56, 0.41), (0.58, 0.40, 0.28), (0.38, 0.25, 0.17)])
_HAIR = np.array(
    [(0.08, 0.07, 0.07), (0.22, 0.14, 0.09), (0.40, 0.27, 0.16), (0.55, 0.25, 0.12), (0.80, 0.66, 0.42),
     (0.62, 0.62, 0.60), (0.88, 0.87, 0.84)]
)  # fmt: skip
_IRIS = np.array([(0.25, 0.15, 0.08), (0.45, 0.28, 0.12), (0.50, 0.45, 0.20), (0.30, 0.50, 0.30),
                  (0.30, 0.50, 0.75), (0.50, 0.55, 0.60)])  # fmt: skip



def _soft(d: np.ndarray, aa: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (negative inside)."""
    alpha = d * (-1.0 / aa)
    alpha += 0.5
    return np.clip(alpha, 0.0, 1.0, out=alpha)


def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse."""
    du, dv = (u - cx) / a, (v - cy) / b
    return (np.sqrt(du * du + dv * dv) - 1.0) * min(a, b)  # np.hypot is ~10x slower than this


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | tuple[float, float, float]) -> None:
    """Alpha-blend a colour into a planar ``[3, H, W]`` image (planar keeps numpy's inner loops long)."""
    img += alpha * (np.asarray(colour, np.float32)[:, None, None] - img)


def _lerp_palette(palette: np.ndarray, t: float) -> np.ndarray:
    x = t * (len(palette) - 1)
    i = min(int(x), len(palette) - 2)
    return palette[i] + (x - i) * (palette[i + 1] - palette[i])


class _Pose:
    """Similarity transform from canonical face coordinates to image coordinates, plus a yaw-like feature shift."""

    def __init__(self, roll: float, scale: float, tx: float, ty: float, yaw: float) -> None:
        self.cos, self.sin, self.scale, self.tx, self.ty, self.yaw = math.cos(roll), math.sin(roll), scale, tx, ty, yaw

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        x = self.scale * (self.cos * u - self.sin * v) + self.tx
        return x, self.scale * (self.sin * u + self.cos * v) + self.ty


class _FaceFrame(NamedTuple):
    """What an occluder needs of the face under it: canonical-frame grids (``uf``: with the yaw shift of the inner
    features), the head's coverage, the anti-aliasing width and the landmarks' canonical positions."""

    v: np.ndarray
    uf: np.ndarray
    head: np.ndarray
    aa: float
    eye_y: float
    eye_dx: float
    nose_v: float


class _Frame(NamedTuple):
    """One sample's canonical-frame grids: ``u, v`` of each pixel, ``uf`` with the yaw shift of the inner
    features, and the anti-aliasing width ``aa``."""

    pose: _Pose
    u: np.ndarray
    v: np.ndarray
    uf: np.ndarray
    aa: float


class _Expression(NamedTuple):
    """One sample's expression nuisance."""

    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    gaze: tuple[float, float]


class _Head(NamedTuple):
    """What the later drawing steps need of the head: colours, hair style and strand texture, the head's coverage,
    its half-width per row, its normalised coordinates ``nx, ny`` and radius ``head_r`` (for the shading)."""

    skin: np.ndarray
    hair: np.ndarray
    style: int
    strands: np.ndarray | None
    head: np.ndarray
    half_w: np.ndarray
    nx: np.ndarray
    ny: np.ndarray
    head_r: np.ndarray
