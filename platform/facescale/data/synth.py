"""Procedural synthetic identities: face-like images a CNN has to learn to tell apart.

Each identity is a latent vector in ``[0, 1]^D`` decoded into face traits: head shape, skin and hair colour, hair
style, eye/brow/nose/mouth geometry and spacing, iris colour, ears, beard, blush, freckles and moles. Each sample
adds nuisance drawn from its own seeded generator: pose (roll, shift, scale, a yaw-like shift of the inner
features), expression (smile, open mouth, raised brows, squint), lighting (brightness, gradient, directional shading,
colour cast), background, occluders, blur and noise. ``difficulty`` in ``[0, 1]`` scales every nuisance amplitude
and the share of look-alike identities (copies of an earlier identity with a small latent perturbation): at 0 the
identities are trivially separable, at 1 look-alikes under strong nuisance are confusable.

Faces are drawn in a canonical frame whose landmarks follow the ArcFace 112x112 alignment template, so the output
looks like an aligned crop. Every image depends only on ``(seed, identity, sample)``: same seed, same bytes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import simplejpeg
from tqdm import tqdm

from facescale.data.shards import IMAGE_SIZE, Manifest, ShardSetWriter

JPEG_QUALITY = 90
VERIFICATION_NAME = "verification.bin"
OCCLUDED_VERIFICATION_NAME = "verification_occluded.bin"  # `synthesize(occluded_pairs=N)`: one face per pair occluded
OCCLUDERS = ("sunglasses", "mask", "patch")  # what the renderer draws in front of a face
# Seed-stream tags keep the generators for identities, samples, shuffling and pairs independent of each other.
_TAG_TRAIN_IDS, _TAG_HELD_OUT_IDS, _TAG_SAMPLE, _TAG_SHUFFLE, _TAG_PAIRS = 1, 2, 3, 4, 5
_TAG_OCCLUDED_PAIRS, _TAG_OCCLUDER = 6, 7  # which face of a pair is occluded and by what; the occluder's draws
_SIBLING_SIGMA = 0.05  # latent std of a look-alike around its parent (latent range is [0, 1])
_MAX_SIBLING_SHARE = 0.6  # share of look-alike identities at difficulty 1

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


def sample_identities(num: int, seed: int, difficulty: float, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Draw identity latents; a ``difficulty``-dependent share are look-alikes of an earlier identity of the set.

    Args:
        num: Number of identities.
        seed: Dataset seed.
        difficulty: In ``[0, 1]``; the look-alike share is ``0.6 * difficulty``.
        held_out: Draw from the held-out stream (parents are then held-out identities too).

    Returns:
        ``(latents [num, NUM_TRAITS] float64, parents [num] int64)``; ``parents[i]`` is ``-1`` or the index of the
        identity that ``i`` is a look-alike of.
    """
    rng = np.random.default_rng([seed, _TAG_HELD_OUT_IDS if held_out else _TAG_TRAIN_IDS])
    latents = rng.random((num, NUM_TRAITS))
    is_sibling = rng.random(num) < _MAX_SIBLING_SHARE * difficulty
    parents = np.where(is_sibling, np.floor(rng.random(num) * np.arange(num)).astype(np.int64), -1)
    parents[0:1] = -1
    noise = rng.normal(0.0, _SIBLING_SIGMA, (num, NUM_TRAITS))
    for i in np.flatnonzero(parents >= 0):  # increasing order: a parent is final before its children
        latents[i] = np.clip(latents[parents[i]] + noise[i], 0.0, 1.0)
    return latents, parents


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


class FaceRenderer:
    """Draws one face from an identity latent and a per-sample generator, vectorised over the pixel grid.

    Large layers (background, head, hair, lighting) cover the frame; small features (eyes, brows, nose, mouth,
    marks) are drawn only inside a window around them, which keeps rendering near 2 ms per image on one core.

    Args:
        image_size: Output ``(height, width)``.
    """

    def __init__(self, image_size: tuple[int, int] = IMAGE_SIZE) -> None:
        h, w = image_size
        self.image_size = image_size
        ys = (np.arange(h, dtype=np.float32) + 0.5) / (h / 2) - 1
        xs = (np.arange(w, dtype=np.float32) + 0.5) / (w / 2) - 1
        self.x, self.y = np.meshgrid(xs, ys)
        self.pixel = 2.0 / w

    def _occluder(self, img: np.ndarray, kind: str, face: _FaceFrame, rng: np.random.Generator,
                  where: tuple[list[float], list[float]] | None = None) -> None:
        """Paint one occluder; its colour comes from ``rng``. ``where``: a patch's centre and half-size."""
        if kind == "sunglasses":  # follows the pose, so drawn in the canonical frame
            band = _soft(np.abs(face.v - face.eye_y) - 0.09, face.aa) * _soft(np.abs(face.uf) - face.eye_dx - 0.14,
                                                                              face.aa)  # fmt: skip
            _paint(img, band, rng.uniform(0.0, 0.15, 3))
        elif kind == "mask":  # face mask below the nose
            _paint(img, face.head * _soft(face.nose_v + 0.05 - face.v, face.aa), rng.uniform(0.5, 1.0, 3))
        elif kind == "patch":  # an object in front of the face, axis-aligned in the image
            assert where is not None
            (cx, cy), (ow, oh) = where
            patch = _soft(np.maximum(np.abs(self.x - cx) - ow, np.abs(self.y - cy) - oh), self.pixel)
            _paint(img, patch, rng.uniform(0.0, 1.0, 3))
        else:
            raise ValueError(f"unknown occluder {kind!r}; expected one of {', '.join(OCCLUDERS)}")

    def _occluders(self, img: np.ndarray, face: _FaceFrame, rng: np.random.Generator, d: float,
                   forced: tuple[str, np.random.Generator] | None) -> None:
        """The sample's own occluders (each likelier with difficulty ``d``), then the ``forced`` one on top."""
        if rng.random() < 0.15 * d:
            self._occluder(img, "sunglasses", face, rng)
        if rng.random() < 0.1 * d:
            self._occluder(img, "mask", face, rng)
        for _ in range(int(rng.random() < 0.5 * d) + int(rng.random() < 0.2 * d)):
            self._occluder(img, "patch", face, rng, (rng.uniform(-0.9, 0.9, 2).tolist(),
                                                     rng.uniform(0.15, 0.45, 2).tolist()))  # fmt: skip
        if forced is not None:  # a forced patch lands on the inner face, not anywhere in the frame
            kind, frng = forced
            where = (frng.uniform(-0.35, 0.35, 2).tolist(), frng.uniform(0.2, 0.35, 2).tolist())
            self._occluder(img, kind, face, frng, where if kind == "patch" else None)

    def _window(self, pose: _Pose, u: float, v: float, radius: float) -> tuple[slice, slice]:
        """Pixel slices covering a canonical-frame disc (the yaw shift of inner features included)."""
        x, y = pose.to_image(u + 0.25 * pose.yaw, v)
        r = radius * pose.scale / self.pixel + 2
        col, row = (x + 1) / self.pixel, (y + 1) / self.pixel
        rows = slice(max(int(row - r), 0), max(int(row + r) + 1, 0))
        return rows, slice(max(int(col - r), 0), max(int(col + r) + 1, 0))

    def render(self, latent: np.ndarray, rng: np.random.Generator, difficulty: float,
               occluder: tuple[str, np.random.Generator] | None = None) -> np.ndarray:
        """Render one sample.

        Args:
            latent: Identity latent, shape ``[NUM_TRAITS]`` in ``[0, 1]``.
            rng: The sample's generator (all nuisance comes from it).
            difficulty: Nuisance strength in ``[0, 1]``.
            occluder: ``(kind, generator)``: one more occluder of that kind (``OCCLUDERS``) over the face, drawn
                from its own generator after the sample's own occluders; ``rng`` is used exactly as without it, so
                the image differs from the unoccluded render only where the occluder is (and its blurred edge).

        Returns:
            RGB image, ``uint8 [H, W, 3]``.
        """
        p = dict(zip(_NAMES, (_LO + latent * (_HI - _LO)).tolist()))
        d = float(difficulty)

        def amp(lo: float, hi: float) -> float:
            return lo + (hi - lo) * d

        def normal(std: float) -> float:  # Python floats keep the float32 grids float32 (numpy 2 promotion rules)
            return float(rng.normal(0.0, std))

        # --- per-sample nuisance: pose and expression -------------------------------------------------------
        roll, log_scale = normal(math.radians(amp(1.0, 12.0))), normal(amp(0.015, 0.07))
        shift_x, shift_y, yaw = normal(amp(0.01, 0.06)), normal(amp(0.01, 0.06)), normal(amp(0.02, 0.18))
        pose = _Pose(roll, math.exp(log_scale), shift_x, shift_y, yaw)
        smile, mouth_open = normal(amp(0.005, 0.045)), abs(normal(amp(0.003, 0.035)))
        brow_raise = normal(amp(0.004, 0.025))
        eye_open = min(max(1.0 - abs(normal(amp(0.03, 0.3))), 0.15), 1.0)
        gaze = (normal(amp(0.01, 0.10)), normal(amp(0.01, 0.10)))
        x0, y0 = self.x - pose.tx, self.y - pose.ty
        u = (pose.cos * x0 + pose.sin * y0) / pose.scale
        v = (-pose.sin * x0 + pose.cos * y0) / pose.scale
        aa = 1.2 * self.pixel / pose.scale
        uf = u - 0.25 * pose.yaw  # inner features move with a yaw-like turn, the nose (which protrudes) more

        # --- background, hair behind the head, neck, ears, head ---------------------------------------------
        img = np.empty((3, *self.image_size), np.float32)
        img[:] = rng.uniform(0.1, 0.9, 3).astype(np.float32)[:, None, None]
        img *= 1.0 + normal(0.2) * self.x + normal(0.2) * self.y
        skin = _lerp_palette(_SKIN, p["skin_tone"]) + p["skin_red"] * np.array([0.05, -0.01, -0.03])
        hair = np.clip(_HAIR[int(p["hair_color"] * len(_HAIR))] * (1.0 + p["hair_light"]), 0.0, 1.0)
        style = (0, 1, 1, 2, 3, 4)[int(p["hair_style"] * 6)]  # 0 bald, 1 short, 2 fringe, 3 long, 4 long+fringe
        hw, hh, cy = p["head_w"], p["head_h"], p["head_cy"]
        strands = 0.12 * np.sin(p["hair_freq"] * u + 3.0 * v * v) if style > 0 else None  # wavy strands
        if strands is not None and style >= 3:
            long_hair = _soft(_ellipse(u, v, 0.0, cy + 0.15, hw + 0.2, hh + 0.2), aa) * _soft(v - 1.05, aa * 4)
            _paint(img, long_hair, hair)
            img *= 1.0 + long_hair * strands
        ys, xs = self._window(pose, 0.0, 0.95, 0.62)  # neck
        _paint(img[:, ys, xs], _soft(np.abs(u[ys, xs]) - 0.33, aa) * _soft(0.45 - v[ys, xs], aa), skin * 0.82)
        for side in (-1.0, 1.0):
            ear_scale = min(max(1.0 + side * 2.0 * pose.yaw, 0.3), 1.5)
            ex = side * (hw * (1 - p["jaw"] * max(p["ear_v"], 0.0) ** 2) + 0.01) - 0.1 * pose.yaw
            ys, xs = self._window(pose, ex, p["ear_v"], p["ear_h"] + 0.1)
            ear = _soft(_ellipse(u[ys, xs], v[ys, xs], ex, p["ear_v"], 0.06 * ear_scale, p["ear_h"]), aa)
            _paint(img[:, ys, xs], ear, skin * 0.9)
        half_w = hw * (1.0 - p["jaw"] * np.clip(v - cy, 0.0, 1.0) ** 2)
        nx, ny = u / half_w, (v - cy) / hh
        head_r = np.sqrt(nx * nx + ny * ny)
        head = _soft((head_r - 1.0) * hw, aa)
        _paint(img, head, skin)

        # --- skin marks and beard: freckles, beard and hair use the full frame, the rest small windows -------
        mouth_v = max(p["mouth_v"], p["nose_v"] + 0.2)
        if p["freckles"] > 0.75:  # a fixed per-identity dot pattern over nose and cheeks
            tex = np.random.default_rng(int(latent[_NAMES.index("freckles")] * 2**31)).random((56, 56))
            iu = np.clip(((uf + 1.0) * 28).astype(np.int32), 0, 55)
            iv = np.clip(((v + 1.0) * 28).astype(np.int32), 0, 55)
            spots = np.exp(-((v - 0.15) ** 2) / 0.02 - uf**2 / 0.25) * (tex[iv, iu] > 1.72 - p["freckles"])
            _paint(img, 0.3 * spots.astype(np.float32), skin * 0.6)
        beard = int(p["beard"] * 6)  # 0-2 none, 3 stubble, 4 moustache, 5 full beard
        if beard in (3, 5):
            jaw_area = head * _soft(mouth_v - 0.12 - v, aa * 3) * _soft(np.abs(uf) - half_w * 0.95, aa)
            _paint(img, jaw_area * (0.35 if beard == 3 else 0.9), hair * 0.8)
        if strands is not None:
            hairline = p["hairline"] + p["hair_curve"] * uf**2 + p["hair_tilt"] * uf
            if style in (2, 4):  # a fringe hangs lower in the middle
                hairline = hairline + 0.22 * np.exp(-(uf**2) / 0.15)
            vol = p["hair_volume"]
            cap = _soft(_ellipse(u, v, 0.0, cy - vol, hw + vol, hh + vol), aa) * _soft(v - hairline, aa * 2)
            cap = cap * _soft(v - 0.15, aa)
            _paint(img, cap, hair)
            img *= 1.0 + cap * strands
        red = (0.85, 0.35, 0.35)
        for side in (-1.0, 1.0):
            ys, xs = self._window(pose, side * 0.38, 0.28, 0.35)
            blob = np.exp(-((uf[ys, xs] - side * 0.38) ** 2 + (v[ys, xs] - 0.28) ** 2) / 0.02)
            _paint(img[:, ys, xs], p["blush"] * blob, red)
        for k in range(1, 1 + min(3, int(p["mole_n"] ** 3 * 4))):
            mu, mv, size = p[f"mole{k}_u"], p[f"mole{k}_v"], p["mole_size"]
            ys, xs = self._window(pose, mu, mv, size + 0.03)
            mole = _soft(_ellipse(uf[ys, xs], v[ys, xs], mu, mv, size, size), aa) * head[ys, xs]
            _paint(img[:, ys, xs], mole, (0.25, 0.16, 0.12))

        # --- eyes and brows ----------------------------------------------------------------------------------
        iris = _IRIS[int(p["iris"] * len(_IRIS))]
        ew, eh = p["eye_w"], p["eye_w"] * p["eye_h"]
        brow_colour = hair * 0.75 if hair.mean() < 0.6 else hair * 0.55
        for side in (-1.0, 1.0):
            ex, ey = side * p["eye_dx"], p["eye_y"]
            ys, xs = self._window(pose, ex, ey, 1.6 * ew + 0.06)
            sub = img[:, ys, xs]
            t_cos, t_sin = math.cos(side * p["eye_tilt"]), math.sin(side * p["eye_tilt"])
            lu, lv = uf[ys, xs] - ex, v[ys, xs] - ey
            lu, lv = t_cos * lu + t_sin * lv, -t_sin * lu + t_cos * lv
            _paint(sub, 0.18 * _soft(_ellipse(lu, lv, 0.0, -0.01, ew * 1.5, eh * 2.2), aa * 6), skin * 0.55)
            eye_d = _ellipse(lu, lv, 0.0, 0.0, ew, max(eh * eye_open, 0.004))
            eye = _soft(eye_d, aa)
            _paint(sub, eye, (0.93, 0.91, 0.88))
            ir = p["iris_r"] * ew * 0.75
            iris_d = _ellipse(lu, lv, gaze[0] * ew, gaze[1] * eh, ir, ir)
            _paint(sub, eye * _soft(iris_d, aa), iris)
            _paint(sub, eye * _soft(iris_d + ir * 0.55, aa), (0.03, 0.03, 0.03))
            _paint(sub, _soft(np.abs(eye_d) - 0.006, aa) * _soft(lv, aa * 3), (0.12, 0.08, 0.07))  # upper lid line
            bx, half_len = ex + side * 0.02, ew * p["brow_len"]
            brow_y = ey - p["brow_dy"] - brow_raise
            ys, xs = self._window(pose, bx, brow_y, half_len + 0.1)
            bu, bv = uf[ys, xs], v[ys, xs]
            tb = np.clip((bu - bx) / half_len, -1.5, 1.5)
            centre = brow_y - p["brow_arch"] * (1 - tb**2) - side * p["brow_slant"] * tb
            brow_d = np.abs(bv - centre) - p["brow_th"] * (1.0 - 0.35 * side * tb) / 2
            brow = _soft(brow_d, aa) * _soft(np.abs(bu - bx) - half_len, aa * 2)
            _paint(img[:, ys, xs], brow * 0.9, brow_colour)

        # --- nose and mouth ----------------------------------------------------------------------------------
        nw, nv, ey = p["nose_w"], p["nose_v"], p["eye_y"]
        ys, xs = self._window(pose, 0.15 * pose.yaw, (ey + nv) / 2, (nv - ey) / 2 + 0.12)
        sub, un, nv_ = img[:, ys, xs], u[ys, xs] - 0.4 * pose.yaw, v[ys, xs]
        ridge = np.exp(-((np.abs(un) - nw * 0.55) ** 2) / 0.0012) * _soft(nv_ - nv, aa) * _soft(ey - nv_, aa * 8)
        _paint(sub, p["nose_shade"] * ridge, skin * 0.6)
        _paint(sub, 0.25 * np.exp(-(un**2 / nw**2 + (nv_ - nv - 0.02) ** 2 / 0.003)), skin * 0.55)
        for side in (-1.0, 1.0):
            _paint(sub, _soft(_ellipse(un, nv_, side * nw * 0.5, nv + 0.005, nw * 0.32, nw * 0.17), aa), skin * 0.35)
        mw = p["mouth_w"]
        ys, xs = self._window(pose, 0.0, mouth_v, mw * 1.1 + 0.12)
        sub, mu, mv = img[:, ys, xs], uf[ys, xs], v[ys, xs]
        tm = np.clip(mu / mw, -1.0, 1.0)
        if beard >= 4:  # moustache: a band over the upper lip that follows its curve and thins at the ends
            tb = np.clip(mu / (mw * 1.15), -1.0, 1.0)
            centre = mouth_v - p["lip_up"] - 0.035 - (p["mouth_curve"] + smile) * tb**2
            stache = _soft(np.abs(mu) - mw * 1.15, aa) * _soft(np.abs(mv - centre) - 0.028 * (1.0 - 0.6 * tb**2), aa)
            _paint(sub, stache * 0.9, hair * 0.8)
        profile = np.sqrt(1.0 - tm**2)
        dv = mv - (mouth_v - (p["mouth_curve"] + smile) * tm**2)
        inside = _soft(np.abs(mu) - mw, aa)
        gap = mouth_open * profile
        lips = inside * _soft(np.maximum(-dv - gap - p["lip_up"] * profile, dv - gap - p["lip_lo"] * profile), aa)
        lip_colour = skin * (1.0 - 0.35 * p["lip_red"]) + np.array([0.55, 0.2, 0.22]) * 0.35 * p["lip_red"]
        _paint(sub, lips, lip_colour * 0.9)
        _paint(sub, inside * _soft(np.abs(dv) - np.maximum(gap, 0.004), aa), (0.2, 0.06, 0.06))

        # --- lighting: directional shading on the head, brightness, gradient, colour cast ----------------------
        light = float(rng.uniform(0, 2 * np.pi))
        strength = float(rng.uniform(0.1, amp(0.2, 0.7)))
        lambert = np.clip(math.cos(light) * nx + math.sin(light) * ny, -1.0, 1.0)
        gain = math.exp(normal(amp(0.04, 0.3)))
        gx, gy = normal(amp(0.02, 0.25)), normal(amp(0.02, 0.25))
        img *= gain * (1.0 + head * strength * lambert * np.minimum(head_r, 1.0)) * (1 + gx * self.x + gy * self.y)
        img *= np.exp(rng.normal(0.0, amp(0.01, 0.08), 3)).astype(np.float32)[:, None, None]

        # --- occluders, blur, noise ----------------------------------------------------------------------------
        self._occluders(img, _FaceFrame(v, uf, head, aa, p["eye_y"], p["eye_dx"], nv), rng, d, occluder)
        for _ in range(int(rng.integers(0, 1 + round(3 * d)))):  # binomial [1, 2, 1] / 4 blur, both axes
            img[:, 1:-1] = 0.25 * (img[:, :-2] + img[:, 2:]) + 0.5 * img[:, 1:-1]
            img[:, :, 1:-1] = 0.25 * (img[:, :, :-2] + img[:, :, 2:]) + 0.5 * img[:, :, 1:-1]
        # Sensor-like noise: uniform with the std of the intended Gaussian (3x cheaper to draw, looks the same).
        sigma = amp(0.5, 10.0) * float(rng.uniform(0.5, 1.5))
        noise = rng.random(img.shape, dtype=np.float32)
        noise -= 0.5
        img *= 255.0
        img += noise * np.float32(sigma * math.sqrt(12.0))
        np.clip(img + 0.5, 0.0, 255.0, out=img)
        out = np.empty((*self.image_size, 3), np.uint8)
        np.copyto(out, img.transpose(1, 2, 0), casting="unsafe")  # truncation of x + 0.5 rounds
        return out


def render_jpeg(renderer: FaceRenderer, latent: np.ndarray, seed: int, identity: int, sample: int, d: float,
                occluder: str | None = None) -> bytes:
    """Render sample ``sample`` of ``identity`` and encode it (quality 90); depends only on its arguments.

    ``occluder`` (one of ``OCCLUDERS``) adds that occluder over the face, drawn from its own ``(seed, identity,
    sample)`` generator: the same sample as without it, with the occluder in front.
    """
    rng = np.random.default_rng([seed, _TAG_SAMPLE, identity, sample])
    forced = None if occluder is None else (occluder, np.random.default_rng([seed, _TAG_OCCLUDER, identity, sample]))
    return simplejpeg.encode_jpeg(renderer.render(latent, rng, d, forced), quality=JPEG_QUALITY, colorspace="RGB")


def _pairs(parents: np.ndarray, num_pairs: int, seed: int, difficulty: float) -> list[tuple[int, int]]:
    """Half same-identity and half different-identity pairs of held-out indices, in shuffled order.

    A different pair uses a look-alike and its parent with probability ``difficulty`` when the first identity
    drawn has one, so hard negatives grow with difficulty.
    """
    rng = np.random.default_rng([seed, _TAG_PAIRS])
    num = len(parents)
    pairs = [(int(a), int(a)) for a in rng.integers(0, num, num_pairs // 2)]
    for _ in range(num_pairs - len(pairs)):
        a = int(rng.integers(0, num))
        if parents[a] >= 0 and rng.random() < difficulty:
            pairs.append((a, int(parents[a])))
        else:
            b = int(rng.integers(0, num - 1))
            pairs.append((a, b + (b >= a)))
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _write_pairs(out: Path, name: str, renderer: FaceRenderer, latents: np.ndarray, pairs: list[tuple[int, int]],
                 first_id: int, seed: int, difficulty: float, bar: tqdm,
                 occluded: list[tuple[int, str]] | None = None) -> None:
    """Render ``pairs`` of held-out identities into ``name`` (``.bin``) and its ``.json``.

    Pair ``i``'s images are samples ``2i`` and ``2i + 1`` (unique per image, so no two images repeat nuisance);
    ``occluded[i] = (side, occluder)`` puts that occluder on face ``side`` (0 or 1) of pair ``i``.
    """
    jpegs: list[bytes] = []
    issame: list[bool] = []
    pair_ids: list[list[int]] = []
    for i, (a, b) in enumerate(pairs):
        for j, h in enumerate((a, b)):
            kind = occluded[i][1] if occluded is not None and occluded[i][0] == j else None
            jpegs.append(render_jpeg(renderer, latents[h], seed, first_id + h, 2 * i + j, difficulty, kind))
        issame.append(a == b)
        pair_ids.append([first_id + a, first_id + b])
        bar.update(2)
    with open(out / name, "wb") as f:
        pickle.dump((jpegs, issame), f, protocol=4)
    info: dict[str, list] = {"held_out_identities": list(range(first_id, first_id + len(latents))), "pairs": pair_ids}
    if occluded is not None:
        info["occluded"] = [[side, kind] for side, kind in occluded]
    (out / name).with_suffix(".json").write_text(json.dumps(info) + "\n")


def synthesize(
    out_dir: str | os.PathLike[str],
    identities: int,
    images_per_identity: int,
    seed: int,
    difficulty: float,
    held_out_identities: int = 100,
    num_pairs: int = 1000,
    samples_per_shard: int = 1000,
    progress: bool = True,
    occluded_pairs: int = 0,
) -> Manifest:
    """Write a synthetic training shard set and a held-out verification set.

    Training samples (class ids ``0..identities-1``) are shuffled globally with the seed before writing. The
    held-out identities (ids ``identities..identities+held_out_identities-1`` in ``key.json``) never appear in
    the shards; their pairs go to ``verification.bin`` (InsightFace format: a pickle of ``(jpegs, issame)`` with
    the pairs interleaved ``[a0, b0, a1, b1, ...]``) and, for inspection, ``verification.json``.

    Args:
        out_dir: Output directory.
        identities: Number of training identities (classes).
        images_per_identity: Training images per identity.
        seed: Seed; the same seed gives byte-identical images and the same manifest digest.
        difficulty: Nuisance strength and look-alike share, in ``[0, 1]``.
        held_out_identities: Identities for the verification set (0 to skip it).
        num_pairs: Verification pairs, half same-identity (0 to skip the set).
        samples_per_shard: Samples per shard.
        progress: Show a progress bar.
        occluded_pairs: Pairs of a second held-out set, ``verification_occluded.bin`` (+ ``.json``: pairs, and
            per pair the occluded side and the occluder), 0 to skip it. Its pairs are drawn as ``verification.bin``'s
            (the same pairs and images when ``occluded_pairs == num_pairs``) and one face of each, chosen at random,
            has a sunglasses, face-mask or patch occluder (``OCCLUDERS``) drawn over it. Nothing else changes.

    Returns:
        The manifest of the training shards.
    """
    if identities < 1 or images_per_identity < 1:
        raise ValueError(f"need identities >= 1 and images_per_identity >= 1, got {identities}, {images_per_identity}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if max(num_pairs, occluded_pairs) > 0 and held_out_identities < 2:
        raise ValueError(f"num_pairs={num_pairs}, occluded_pairs={occluded_pairs} need held_out_identities >= 2, "
                         f"got {held_out_identities}")
    out = Path(out_dir)
    renderer = FaceRenderer()
    latents, _ = sample_identities(identities, seed, difficulty)
    order = np.random.default_rng([seed, _TAG_SHUFFLE]).permutation(identities * images_per_identity)
    total = len(order) + 2 * max(num_pairs, 0) + 2 * max(occluded_pairs, 0)
    bar = tqdm(total=total, desc="synth", unit="img", disable=not progress, smoothing=0.1)
    writer = ShardSetWriter(out, prefix="synth", samples_per_shard=samples_per_shard)
    for flat in order.tolist():
        identity, sample = divmod(flat, images_per_identity)
        jpeg = render_jpeg(renderer, latents[identity], seed, identity, sample, difficulty)
        writer.write(f"{identity:07d}_{sample:05d}", jpeg, identity, {"identity": identity, "source": "synth"})
        bar.update()
    source = (
        f"synth seed={seed} identities={identities} images_per_identity={images_per_identity} "
        f"difficulty={difficulty} held_out_identities={held_out_identities} num_pairs={num_pairs}"
    )
    manifest = writer.close(num_classes=identities, source=source)
    held_latents, parents = sample_identities(held_out_identities, seed, difficulty, held_out=True)
    if num_pairs > 0:
        pairs = _pairs(parents, num_pairs, seed, difficulty)
        _write_pairs(out, VERIFICATION_NAME, renderer, held_latents, pairs, identities, seed, difficulty, bar)
    if occluded_pairs > 0:
        rng = np.random.default_rng([seed, _TAG_OCCLUDED_PAIRS])
        occluded = [(int(rng.integers(2)), OCCLUDERS[int(rng.integers(len(OCCLUDERS)))]) for _ in range(occluded_pairs)]
        pairs = _pairs(parents, occluded_pairs, seed, difficulty)
        _write_pairs(out, OCCLUDED_VERIFICATION_NAME, renderer, held_latents, pairs, identities, seed, difficulty,
                     bar, occluded)  # fmt: skip
    bar.close()
    return manifest
