"""The synthetic face renderer: one face from an identity latent and a per-sample generator (see ``synth``).

``FaceRenderer.render`` runs named drawing steps in a fixed order (pose and expression, background, head, skin marks
and hair, eyes and brows, nose, mouth, lighting, occluders/blur/noise); every step gets the sample's generator and
grids explicitly, and the generator is drawn from in the same order as ever, so the bytes of a seed never change.
"""

from __future__ import annotations

import math

import numpy as np

from facescale.data.shards import IMAGE_SIZE
from facescale.data.synth_face import (
    _HAIR,
    _HI,
    _IRIS,
    _LO,
    _NAMES,
    _SKIN,
    OCCLUDERS,
    _ellipse,
    _Expression,
    _FaceFrame,
    _Frame,
    _Head,
    _lerp_palette,
    _paint,
    _Pose,
    _soft,
)


def _amp(d: float, lo: float, hi: float) -> float:
    """A nuisance amplitude at difficulty ``d``."""
    return lo + (hi - lo) * d


def _normal(rng: np.random.Generator, std: float) -> float:
    """Python floats keep the float32 grids float32 (numpy 2 promotion rules)."""
    return float(rng.normal(0.0, std))


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
        f, expr = self._pose(rng, d)
        img = self._background(rng)
        h = self._head(img, p, f)
        mouth_v = max(p["mouth_v"], p["nose_v"] + 0.2)
        beard = int(p["beard"] * 6)  # 0-2 none, 3 stubble, 4 moustache, 5 full beard
        self._skin_marks(img, latent, p, f, h, mouth_v, beard)
        self._hair_cap(img, p, f, h)
        self._blush_moles(img, p, f, h)
        self._eyes(img, p, f, h, expr)
        self._nose(img, p, f, h)
        self._mouth(img, p, f, h, expr, mouth_v, beard)
        self._lighting(img, rng, d, h)
        self._occluders(img, _FaceFrame(f.v, f.uf, h.head, f.aa, p["eye_y"], p["eye_dx"], p["nose_v"]), rng, d,
                        occluder)  # fmt: skip
        return self._finish(img, rng, d)

    def _pose(self, rng: np.random.Generator, d: float) -> tuple[_Frame, _Expression]:
        """Per-sample nuisance: pose (and the canonical-frame grids it gives) and expression."""

        def amp(lo: float, hi: float) -> float:
            return _amp(d, lo, hi)

        def normal(std: float) -> float:
            return _normal(rng, std)

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
        return _Frame(pose, u, v, uf, aa), _Expression(smile, mouth_open, brow_raise, eye_open, gaze)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A new planar float32 image: a flat colour with a brightness gradient."""
        img = np.empty((3, *self.image_size), np.float32)
        img[:] = rng.uniform(0.1, 0.9, 3).astype(np.float32)[:, None, None]
        img *= 1.0 + _normal(rng, 0.2) * self.x + _normal(rng, 0.2) * self.y
        return img

    def _head(self, img: np.ndarray, p: dict[str, float], f: _Frame) -> _Head:
        """Hair behind the head, neck, ears, head."""
        pose, u, v, aa = f.pose, f.u, f.v, f.aa
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
        return _Head(skin, hair, style, strands, head, half_w, nx, ny, head_r)

    def _skin_marks(self, img: np.ndarray, latent: np.ndarray, p: dict[str, float], f: _Frame, h: _Head,
                    mouth_v: float, beard: int) -> None:
        """Freckles (a fixed per-identity dot pattern) and a stubble or full beard, over the full frame."""
        uf, v, aa = f.uf, f.v, f.aa
        if p["freckles"] > 0.75:  # a fixed per-identity dot pattern over nose and cheeks
            tex = np.random.default_rng(int(latent[_NAMES.index("freckles")] * 2**31)).random((56, 56))
            iu = np.clip(((uf + 1.0) * 28).astype(np.int32), 0, 55)
            iv = np.clip(((v + 1.0) * 28).astype(np.int32), 0, 55)
            spots = np.exp(-((v - 0.15) ** 2) / 0.02 - uf**2 / 0.25) * (tex[iv, iu] > 1.72 - p["freckles"])
            _paint(img, 0.3 * spots.astype(np.float32), h.skin * 0.6)
        if beard in (3, 5):
            jaw_area = h.head * _soft(mouth_v - 0.12 - v, aa * 3) * _soft(np.abs(uf) - h.half_w * 0.95, aa)
            _paint(img, jaw_area * (0.35 if beard == 3 else 0.9), h.hair * 0.8)

    def _hair_cap(self, img: np.ndarray, p: dict[str, float], f: _Frame, h: _Head) -> None:
        """The hair on top of the head, down to a (curved, tilted, fringed) hairline; none when bald."""
        if h.strands is None:
            return
        u, v, uf, aa = f.u, f.v, f.uf, f.aa
        hairline = p["hairline"] + p["hair_curve"] * uf**2 + p["hair_tilt"] * uf
        if h.style in (2, 4):  # a fringe hangs lower in the middle
            hairline = hairline + 0.22 * np.exp(-(uf**2) / 0.15)
        vol = p["hair_volume"]
        cap = _soft(_ellipse(u, v, 0.0, p["head_cy"] - vol, p["head_w"] + vol, p["head_h"] + vol), aa)
        cap = cap * _soft(v - hairline, aa * 2)
        cap = cap * _soft(v - 0.15, aa)
        _paint(img, cap, h.hair)
        img *= 1.0 + cap * h.strands

    def _blush_moles(self, img: np.ndarray, p: dict[str, float], f: _Frame, h: _Head) -> None:
        """Blush on both cheeks and up to three moles, each inside a small window."""
        pose, v, uf, aa = f.pose, f.v, f.uf, f.aa
        red = (0.85, 0.35, 0.35)
        for side in (-1.0, 1.0):
            ys, xs = self._window(pose, side * 0.38, 0.28, 0.35)
            blob = np.exp(-((uf[ys, xs] - side * 0.38) ** 2 + (v[ys, xs] - 0.28) ** 2) / 0.02)
            _paint(img[:, ys, xs], p["blush"] * blob, red)
        for k in range(1, 1 + min(3, int(p["mole_n"] ** 3 * 4))):
            mu, mv, size = p[f"mole{k}_u"], p[f"mole{k}_v"], p["mole_size"]
            ys, xs = self._window(pose, mu, mv, size + 0.03)
            mole = _soft(_ellipse(uf[ys, xs], v[ys, xs], mu, mv, size, size), aa) * h.head[ys, xs]
            _paint(img[:, ys, xs], mole, (0.25, 0.16, 0.12))

    def _eyes(self, img: np.ndarray, p: dict[str, float], f: _Frame, h: _Head, expr: _Expression) -> None:
        """Both eyes (socket shade, white, iris, pupil, lid line) and brows."""
        pose, v, uf, aa = f.pose, f.v, f.uf, f.aa
        iris = _IRIS[int(p["iris"] * len(_IRIS))]
        ew, eh = p["eye_w"], p["eye_w"] * p["eye_h"]
        brow_colour = h.hair * 0.75 if h.hair.mean() < 0.6 else h.hair * 0.55
        for side in (-1.0, 1.0):
            ex, ey = side * p["eye_dx"], p["eye_y"]
            ys, xs = self._window(pose, ex, ey, 1.6 * ew + 0.06)
            sub = img[:, ys, xs]
            t_cos, t_sin = math.cos(side * p["eye_tilt"]), math.sin(side * p["eye_tilt"])
            lu, lv = uf[ys, xs] - ex, v[ys, xs] - ey
            lu, lv = t_cos * lu + t_sin * lv, -t_sin * lu + t_cos * lv
            _paint(sub, 0.18 * _soft(_ellipse(lu, lv, 0.0, -0.01, ew * 1.5, eh * 2.2), aa * 6), h.skin * 0.55)
            eye_d = _ellipse(lu, lv, 0.0, 0.0, ew, max(eh * expr.eye_open, 0.004))
            eye = _soft(eye_d, aa)
            _paint(sub, eye, (0.93, 0.91, 0.88))
            ir = p["iris_r"] * ew * 0.75
            iris_d = _ellipse(lu, lv, expr.gaze[0] * ew, expr.gaze[1] * eh, ir, ir)
            _paint(sub, eye * _soft(iris_d, aa), iris)
            _paint(sub, eye * _soft(iris_d + ir * 0.55, aa), (0.03, 0.03, 0.03))
            _paint(sub, _soft(np.abs(eye_d) - 0.006, aa) * _soft(lv, aa * 3), (0.12, 0.08, 0.07))  # upper lid line
            bx, half_len = ex + side * 0.02, ew * p["brow_len"]
            brow_y = ey - p["brow_dy"] - expr.brow_raise
            ys, xs = self._window(pose, bx, brow_y, half_len + 0.1)
            bu, bv = uf[ys, xs], v[ys, xs]
            tb = np.clip((bu - bx) / half_len, -1.5, 1.5)
            centre = brow_y - p["brow_arch"] * (1 - tb**2) - side * p["brow_slant"] * tb
            brow_d = np.abs(bv - centre) - p["brow_th"] * (1.0 - 0.35 * side * tb) / 2
            brow = _soft(brow_d, aa) * _soft(np.abs(bu - bx) - half_len, aa * 2)
            _paint(img[:, ys, xs], brow * 0.9, brow_colour)

    def _nose(self, img: np.ndarray, p: dict[str, float], f: _Frame, h: _Head) -> None:
        """Nose ridge, tip shade and nostrils (the nose protrudes, so it moves more with yaw)."""
        pose, u, v, aa = f.pose, f.u, f.v, f.aa
        nw, nv, ey = p["nose_w"], p["nose_v"], p["eye_y"]
        ys, xs = self._window(pose, 0.15 * pose.yaw, (ey + nv) / 2, (nv - ey) / 2 + 0.12)
        sub, un, nv_ = img[:, ys, xs], u[ys, xs] - 0.4 * pose.yaw, v[ys, xs]
        ridge = np.exp(-((np.abs(un) - nw * 0.55) ** 2) / 0.0012) * _soft(nv_ - nv, aa) * _soft(ey - nv_, aa * 8)
        _paint(sub, p["nose_shade"] * ridge, h.skin * 0.6)
        _paint(sub, 0.25 * np.exp(-(un**2 / nw**2 + (nv_ - nv - 0.02) ** 2 / 0.003)), h.skin * 0.55)
        for side in (-1.0, 1.0):
            _paint(sub, _soft(_ellipse(un, nv_, side * nw * 0.5, nv + 0.005, nw * 0.32, nw * 0.17), aa), h.skin * 0.35)

    def _mouth(self, img: np.ndarray, p: dict[str, float], f: _Frame, h: _Head, expr: _Expression, mouth_v: float,
               beard: int) -> None:
        """Moustache (``beard >= 4``), lips and the mouth opening, with the sample's smile."""
        pose, v, uf, aa = f.pose, f.v, f.uf, f.aa
        smile = expr.smile
        mw = p["mouth_w"]
        ys, xs = self._window(pose, 0.0, mouth_v, mw * 1.1 + 0.12)
        sub, mu, mv = img[:, ys, xs], uf[ys, xs], v[ys, xs]
        tm = np.clip(mu / mw, -1.0, 1.0)
        if beard >= 4:  # moustache: a band over the upper lip that follows its curve and thins at the ends
            tb = np.clip(mu / (mw * 1.15), -1.0, 1.0)
            centre = mouth_v - p["lip_up"] - 0.035 - (p["mouth_curve"] + smile) * tb**2
            stache = _soft(np.abs(mu) - mw * 1.15, aa) * _soft(np.abs(mv - centre) - 0.028 * (1.0 - 0.6 * tb**2), aa)
            _paint(sub, stache * 0.9, h.hair * 0.8)
        profile = np.sqrt(1.0 - tm**2)
        dv = mv - (mouth_v - (p["mouth_curve"] + smile) * tm**2)
        inside = _soft(np.abs(mu) - mw, aa)
        gap = expr.mouth_open * profile
        lips = inside * _soft(np.maximum(-dv - gap - p["lip_up"] * profile, dv - gap - p["lip_lo"] * profile), aa)
        lip_colour = h.skin * (1.0 - 0.35 * p["lip_red"]) + np.array([0.55, 0.2, 0.22]) * 0.35 * p["lip_red"]
        _paint(sub, lips, lip_colour * 0.9)
        _paint(sub, inside * _soft(np.abs(dv) - np.maximum(gap, 0.004), aa), (0.2, 0.06, 0.06))

    def _lighting(self, img: np.ndarray, rng: np.random.Generator, d: float, h: _Head) -> None:
        """Directional shading on the head, brightness, gradient, colour cast."""

        def amp(lo: float, hi: float) -> float:
            return _amp(d, lo, hi)

        light = float(rng.uniform(0, 2 * np.pi))
        strength = float(rng.uniform(0.1, amp(0.2, 0.7)))
        lambert = np.clip(math.cos(light) * h.nx + math.sin(light) * h.ny, -1.0, 1.0)
        gain = math.exp(_normal(rng, amp(0.04, 0.3)))
        gx, gy = _normal(rng, amp(0.02, 0.25)), _normal(rng, amp(0.02, 0.25))
        img *= gain * (1.0 + h.head * strength * lambert * np.minimum(h.head_r, 1.0)) * (1 + gx * self.x + gy * self.y)
        img *= np.exp(rng.normal(0.0, amp(0.01, 0.08), 3)).astype(np.float32)[:, None, None]

    def _finish(self, img: np.ndarray, rng: np.random.Generator, d: float) -> np.ndarray:
        """Blur, sensor-like noise and rounding to ``uint8 [H, W, 3]``."""
        for _ in range(int(rng.integers(0, 1 + round(3 * d)))):  # binomial [1, 2, 1] / 4 blur, both axes
            img[:, 1:-1] = 0.25 * (img[:, :-2] + img[:, 2:]) + 0.5 * img[:, 1:-1]
            img[:, :, 1:-1] = 0.25 * (img[:, :, :-2] + img[:, :, 2:]) + 0.5 * img[:, :, 1:-1]
        # Sensor-like noise: uniform with the std of the intended Gaussian (3x cheaper to draw, looks the same).
        sigma = _amp(d, 0.5, 10.0) * float(rng.uniform(0.5, 1.5))
        noise = rng.random(img.shape, dtype=np.float32)
        noise -= 0.5
        img *= 255.0
        img += noise * np.float32(sigma * math.sqrt(12.0))
        np.clip(img + 0.5, 0.0, 255.0, out=img)
        out = np.empty((*self.image_size, 3), np.uint8)
        np.copyto(out, img.transpose(1, 2, 0), casting="unsafe")  # truncation of x + 0.5 rounds
        return out
