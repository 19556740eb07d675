"""Synthetic street scenes in the exact Cityscapes layout: the embedded dataset for the demo and the tests.

Each image is a perspective street (road to a vanishing point, sidewalks, facades with windows, sky, trees, poles
with signs and lights, vehicles, pedestrians and cyclists that shrink with distance and occlude each other), with
texture, noise, shadows, haze and random lighting. Class colours overlap on purpose, so that a model has to use
shape and context. Labels are Cityscapes label ids taken from torchvision's class table, so every reader of the
real dataset reads this one unchanged:

    <out>/leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png     RGB
    <out>/gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_labelIds.png      label ids, mode L
    <out>/gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_labelTrainIds.png with --train-ids
    <out>/synthetic.json                                                     parameters; "complete" once done

Image ``index`` of a split is drawn from its own random stream seeded by (seed, split, index): the same parameters
give byte-identical files whatever the number of workers. Test labels are all 0 (unlabeled), as in Cityscapes.

    python -m fastseg.synthetic data/synthetic --train 40 --val 10 --width 1024 --height 512
    python -m fastseg.synthetic /tmp/tiny --train 4 --val 2 --width 128 --height 64 --train-ids --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torchvision.datasets import Cityscapes
from tqdm import tqdm

from fastseg.cityscapes import ID_TO_TRAIN_ID
from fastseg.errors import UserError, run_cli

# Bumped whenever a change to the drawing makes the same parameters give different pixels. Recorded in the marker
# for information only: a dataset from an older version is still a valid dataset and is kept.
GENERATOR_VERSION = 1
GENERATOR = "fastseg.synthetic"  # written into the marker; also what `python -m` runs
MARKER = "synthetic.json"
LOCK = ".synthetic.lock"
SPLITS = ("train", "val", "test")
# Real Cityscapes city names, disjoint between splits as in the real dataset.
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "munster"), "test": ("berlin", "bielefeld")}
# Cityscapes names the annotated frame of each 30-frame snippet 000019.
FRAME = 19
MIN_SIZE, MAX_SIZE = 16, 8192

_ID = {c.name: c.id for c in Cityscapes.classes}
UNLABELED, EGO_VEHICLE, STATIC, PARKING = _ID["unlabeled"], _ID["ego vehicle"], _ID["static"], _ID["parking"]
ROAD, SIDEWALK, BUILDING, WALL, FENCE = _ID["road"], _ID["sidewalk"], _ID["building"], _ID["wall"], _ID["fence"]
POLE, LIGHT, SIGN = _ID["pole"], _ID["traffic light"], _ID["traffic sign"]
VEGETATION, TERRAIN, SKY = _ID["vegetation"], _ID["terrain"], _ID["sky"]
PERSON, RIDER, CAR, TRUCK, BUS = _ID["person"], _ID["rider"], _ID["car"], _ID["truck"], _ID["bus"]
TRAIN, MOTORCYCLE, BICYCLE = _ID["train"], _ID["motorcycle"], _ID["bicycle"]


# ----------------------------------------------------------------------------------------------------------------
# Colours. Base RGB and a spread; several classes share tones (grey road / grey building / overcast sky, greens of
# trees and grass, cars of any colour) so that colour alone cannot tell the classes apart.

_PALETTES = {
    "road": [(95, 95, 100), (80, 80, 84), (118, 114, 112), (68, 68, 72), (128, 122, 126)],
    "sidewalk": [(150, 146, 140), (126, 126, 132), (172, 162, 150), (160, 118, 108), (110, 110, 106)],
    "building": [(165, 158, 146), (205, 192, 168), (150, 82, 62), (215, 214, 208), (88, 88, 94), (195, 172, 110),
                 (140, 150, 168), (122, 110, 100), (225, 205, 185)],
    "wall": [(152, 150, 145), (178, 166, 150), (140, 92, 72), (110, 110, 112), (192, 186, 176)],
    "fence": [(122, 96, 70), (88, 102, 88), (150, 150, 152), (60, 62, 62), (200, 200, 196)],
    "pole": [(122, 122, 124), (80, 92, 82), (58, 58, 64), (160, 160, 158)],
    "vegetation": [(62, 102, 42), (42, 76, 36), (86, 116, 50), (112, 122, 52), (52, 86, 62), (130, 110, 50)],
    "terrain": [(102, 132, 62), (122, 142, 72), (142, 132, 92), (92, 112, 56), (132, 116, 86)],
    "car": [(26, 26, 30), (202, 202, 206), (152, 154, 158), (100, 100, 106), (32, 42, 92), (152, 30, 30),
            (42, 72, 52), (182, 172, 142), (72, 112, 162)],
    "truck": [(212, 212, 212), (182, 42, 32), (42, 72, 142), (232, 202, 62), (112, 112, 112)],
    "bus": [(232, 202, 42), (202, 42, 42), (232, 232, 232), (52, 122, 192), (240, 142, 42)],
    "train": [(202, 42, 42), (232, 232, 226), (240, 202, 42), (62, 122, 182)],
    "clothes": [(30, 30, 36), (62, 62, 72), (42, 52, 92), (150, 150, 150), (200, 200, 200), (122, 32, 32),
                (42, 82, 52), (142, 112, 82), (182, 152, 102), (62, 42, 32), (202, 82, 42), (230, 230, 220)],
    "skin": [(226, 186, 160), (200, 152, 122), (152, 102, 72), (102, 72, 52)],
    "hair": [(30, 26, 22), (82, 56, 36), (182, 152, 92), (132, 132, 132)],
    "frame": [(22, 22, 22), (152, 22, 22), (32, 52, 132), (182, 182, 186), (42, 92, 52)],
    "static": [(42, 92, 42), (222, 122, 32), (92, 92, 96), (42, 62, 142), (142, 102, 62)],
    "glass": [(40, 48, 58), (70, 86, 104), (120, 140, 160), (30, 32, 36), (150, 160, 168)],
    "marking": [(222, 222, 216), (196, 196, 186), (232, 232, 232)],
}

# Texture amplitude (large blobs, small blobs, per pixel) per label id: leafy vegetation and grass are busy, sky
# and vehicles smooth, asphalt grainy.
_TEXTURE = {
    ROAD: (0.07, 0.05, 0.06), SIDEWALK: (0.05, 0.07, 0.05), BUILDING: (0.05, 0.05, 0.04), WALL: (0.06, 0.08, 0.05),
    FENCE: (0.03, 0.05, 0.05), POLE: (0.02, 0.03, 0.03), LIGHT: (0.02, 0.03, 0.03), SIGN: (0.02, 0.02, 0.03),
    VEGETATION: (0.18, 0.30, 0.22), TERRAIN: (0.12, 0.18, 0.14), SKY: (0.03, 0.02, 0.01), PERSON: (0.03, 0.06, 0.04),
    RIDER: (0.03, 0.06, 0.04), CAR: (0.03, 0.03, 0.03), TRUCK: (0.03, 0.04, 0.03), BUS: (0.03, 0.03, 0.03),
    TRAIN: (0.03, 0.03, 0.03), MOTORCYCLE: (0.03, 0.04, 0.04), BICYCLE: (0.03, 0.04, 0.04),
    EGO_VEHICLE: (0.04, 0.02, 0.02), STATIC: (0.04, 0.06, 0.05), PARKING: (0.07, 0.06, 0.06),
}
_TEX_LUT = np.zeros((3, 256), dtype=np.float32)
for _label, _amps in _TEXTURE.items():
    _TEX_LUT[:, _label] = _amps

_Z_NEAR = 0.6  # metres; nothing is drawn closer, so the projection never divides by ~0
_Z_FAR = 3000.0


def _colour(rng: np.random.Generator, palette: str, spread: float = 0.12) -> np.ndarray:
    base = np.asarray(_PALETTES[palette][rng.integers(len(_PALETTES[palette]))], dtype=np.float64)
    return np.clip(base * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, 6, 3), 0, 255)


# ----------------------------------------------------------------------------------------------------------------
# Geometry: world X right, Y up, Z forward (metres), camera at (0, height, 0) looking along Z, flat ground Y = 0.


@dataclass(frozen=True)
class _Camera:
    f: float  # focal length in pixels
    cx: float  # column of the vanishing point
    horizon: float  # row of the horizon
    height: float  # camera height above the ground

    def project(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64)
        z = np.maximum(pts[..., 2], _Z_NEAR)
        x = self.cx + self.f * pts[..., 0] / z
        y = self.horizon + self.f * (self.height - pts[..., 1]) / z
        return np.stack([x, y], axis=-1)

    def px(self, metres: float, z: float) -> float:
        return self.f * metres / max(z, _Z_NEAR)


def _rects(cam: _Camera, axis: int, const: float, a0, a1, b0, b1) -> np.ndarray:
    """Project axis-aligned rectangles lying in the plane ``coord[axis] == const``: (N, 4, 2) pixel corners.

    (a, b) are the other two coordinates: (Z, Y) in a plane X = const (a facade along the road), (X, Z) on the
    ground or any plane Y = const, (X, Y) in a plane Z = const (facing the camera).
    """
    a0, a1, b0, b1 = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (a0, a1, b0, b1)))
    a = np.stack([a0, a1, a1, a0], axis=-1)
    b = np.stack([b0, b0, b1, b1], axis=-1)
    c = np.full_like(a, const)
    order = {0: (c, b, a), 1: (a, c, b), 2: (a, b, c)}[axis]
    return cam.project(np.stack(order, axis=-1))


def _limb(p0, p1, w0: float, w1: float | None = None) -> np.ndarray:
    """A quad of widths w0 → w1 along the segment p0 → p1 (2-D, metres)."""
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / (math.hypot(d[0], d[1]) + 1e-9)
    w1 = w0 if w1 is None else w1
    return np.array([p0 + n * w0 / 2, p1 + n * w1 / 2, p1 - n * w1 / 2, p0 - n * w0 / 2])


class _Canvas:
    """Label ids, colours and a shadow mask painted together, back to front, so they can never disagree."""

    def __init__(self, sky: np.ndarray, haze: np.ndarray, haze_dist: float, grade: np.ndarray):
        h, w = sky.shape[:2]
        self.label = Image.new("L", (w, h), SKY)
        self.color = Image.fromarray(sky, "RGB")
        self.shadow = Image.new("L", (w, h), 0)
        self._draw = (ImageDraw.Draw(self.label), ImageDraw.Draw(self.color), ImageDraw.Draw(self.shadow))
        self.haze, self.haze_dist = [float(c) for c in haze], haze_dist
        self.grade = grade.tolist()

    def _fill(self, rgb, z: float) -> tuple[int, int, int]:
        # Aerial perspective: far things fade towards the horizon colour (and so look like sky).
        t = 1.0 - math.exp(-z / self.haze_dist) if z > 0 else 0.0
        r, g, b = (min(255, max(0, int(float(c) * (1 - t) + hz * t + 0.5))) for c, hz in zip(rgb, self.haze))
        return self.grade[0][r], self.grade[1][g], self.grade[2][b]

    def _paint(self, method: str, label, rgb, z: float, shadow, args, **kw) -> None:
        dl, dc, ds = self._draw
        if label is not None:
            getattr(dl, method)(*args, **{k: (label if v is None else v) for k, v in kw.items()})
        if rgb is not None:
            fill = self._fill(rgb, z)
            getattr(dc, method)(*args, **{k: (fill if v is None else v) for k, v in kw.items()})
        if shadow is not None:
            getattr(ds, method)(*args, **{k: (int(shadow) if v is None else v) for k, v in kw.items()})

    def polygon(self, xy, label, rgb, z: float = 0.0, shadow=0) -> None:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if len(xy) >= 3:
            self._paint("polygon", label, rgb, z, shadow, (xy.ravel().tolist(),), fill=None)

    def ellipse(self, box, label, rgb, z: float = 0.0, shadow=0, width: int = 0) -> None:
        x0, y0, x1, y1 = (float(v) for v in box)
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        if width > 0:
            self._paint("ellipse", label, rgb, z, shadow, (box,), outline=None, width=width)
        else:
            self._paint("ellipse", label, rgb, z, shadow, (box,), fill=None)

    def line(self, xy, width: int, label, rgb, z: float = 0.0, shadow=0) -> None:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        self._paint("line", label, rgb, z, shadow, (xy.ravel().tolist(),), fill=None, width=max(1, int(width)))


# ----------------------------------------------------------------------------------------------------------------
# The scene.


class _Scene:
    def __init__(self, width: int, height: int, rng: np.random.Generator):
        self.w, self.h, self.rng = width, height, rng
        r = rng
        self.cam = _Camera(
            f=width * r.uniform(0.85, 1.2),
            cx=width * (0.5 + r.uniform(-0.08, 0.08)),
            horizon=height * r.uniform(0.36, 0.5),
            height=r.uniform(1.2, 1.7),
        )
        self.sunny = r.random() < 0.6
        # Where the ground meets the bottom row: anything nearer has its feet cut off.
        self.z_bottom = self.cam.f * self.cam.height / max(height - self.cam.horizon, 1.0)
        self.z_max = r.uniform(70, 130)  # farthest placed object
        self.side_shade = {-1: r.uniform(0.55, 0.8), 1: 1.0} if self.sunny else {-1: 0.9, 1: 0.9}
        if self.sunny and r.random() < 0.5:
            self.side_shade = {-1: 1.0, 1: self.side_shade[-1]}
        # A strip of shadow cast by one row of houses across the street.
        self.shadow_side = int(r.choice([-1, 1]))
        self.shadow_amount = r.uniform(70, 130) if self.sunny else 0.0
        self._layout()
        # Exposure, white balance and contrast, applied to every painted colour (cheaper than to every pixel).
        gain = r.uniform(0.7, 1.25) * r.uniform(0.92, 1.08, 3)
        levels = np.arange(256) / 255
        self.grade = np.clip(255 * np.minimum(levels[None, :] * gain[:, None], 1) ** r.uniform(0.8, 1.25) + 0.5, 0,
                             255).astype(np.uint8)
        sky, haze = self._sky()
        self.cv = _Canvas(sky, haze, r.uniform(180, 700), self.grade)
        self.slots: dict[object, list[tuple[float, float]]] = {}

    # -- layout ---------------------------------------------------------------------------------------------------

    def _layout(self) -> None:
        r = self.rng
        self.lane_w = r.uniform(2.9, 3.5)
        self.lanes = int(r.choice([2, 2, 3, 4]))
        own = np.arange(self.lanes // 2, self.lanes)  # right-hand traffic: lanes right of the middle go our way
        cam_lane = int(r.choice(own))
        self.x_road_l = -(cam_lane + 0.5) * self.lane_w + r.uniform(-0.5, 0.5)
        self.x_road_r = self.x_road_l + self.lanes * self.lane_w
        self.parking = {s: r.random() < 0.45 for s in (-1, 1)}  # a parking strip along the curb
        self.park_w = 2.3
        self.edge = {-1: self.x_road_l - (self.park_w if self.parking[-1] else 0.0),
                     1: self.x_road_r + (self.park_w if self.parking[1] else 0.0)}
        self.lawn = {s: r.uniform(1.0, 2.5) if r.random() < 0.25 else 0.0 for s in (-1, 1)}
        self.walk = {s: r.uniform(1.8, 4.5) for s in (-1, 1)}
        self.setback = {s: r.uniform(0.0, 6.0) if r.random() < 0.5 else 0.0 for s in (-1, 1)}
        self.facade = {s: self.edge[s] + s * (self.lawn[s] + self.walk[s] + self.setback[s]) for s in (-1, 1)}
        self.z_side_end = r.uniform(60, 260)
        self.z_end = r.uniform(70, 180) if r.random() < 0.25 else None  # a T-junction closing the street
        if self.z_end is not None:
            self.z_side_end = self.z_end
        self.crossing = (r.uniform(12, 60), r.uniform(9, 16)) if r.random() < 0.4 else None
        self.zebra = r.uniform(max(self.z_bottom, 5), 40) if r.random() < 0.3 else None
        self.shadow_reach = r.uniform(0.0, self.x_road_r - self.x_road_l + 6.0)

    def walk_x(self, side: int) -> tuple[float, float]:
        """Inner and outer X of the sidewalk on one side."""
        inner = self.edge[side] + side * self.lawn[side]
        return inner, inner + side * self.walk[side]

    def in_shadow(self, x: float) -> float:
        s = self.shadow_side
        reach = self.facade[s] - s * self.shadow_reach
        inside = (x - reach) * s >= 0 and (self.facade[s] - x) * s >= 0
        return self.shadow_amount if inside else 0.0

    def _sky(self) -> tuple[np.ndarray, np.ndarray]:
        r, h, w = self.rng, self.h, self.w
        if self.sunny:
            top = np.array([r.uniform(55, 110), r.uniform(115, 160), r.uniform(185, 240)])
            bottom = np.array([r.uniform(165, 210), r.uniform(190, 225), r.uniform(220, 250)])
        else:
            g = r.uniform(140, 200)
            top = np.array([g, g + r.uniform(0, 8), g + r.uniform(2, 16)])
            bottom = np.clip(top + r.uniform(15, 45), 0, 255)
        cover = r.uniform(0.2, 1.2)
        cloud_rgb = np.full(3, r.uniform(225, 250) if self.sunny else r.uniform(110, 170), dtype=np.float32)
        img = np.empty((h, w, 3), dtype=np.uint8)
        # Only rows above the horizon can show sky (the ground covers the rest), and the sky is smooth: draw it at
        # a quarter of the resolution and let PIL scale it up.
        n = int(min(h, math.ceil(self.cam.horizon) + 2))
        img[n:] = [g[int(c)] for g, c in zip(self.grade, bottom)]
        if n > 0:
            hs, ws = max(2, math.ceil(n / 4)), max(2, math.ceil(w / 4))
            t = (np.clip(np.linspace(0, (n - 1) / max(self.cam.horizon, 1.0), hs), 0, 1) ** 0.8)[:, None]
            grad = (top * (1 - t) + bottom * t).astype(np.float32)  # (hs, 3)
            clouds = _value_noise(r, hs, ws, cell=max(h / 20, 2)) + 0.35 * _value_noise(r, hs, ws, max(h / 80, 1.5))
            alpha = np.clip((clouds - np.float32(1.1 - cover)) * 1.5, 0, 0.85)[..., None]
            small = np.clip(grad[:, None, :] * (1 - alpha) + cloud_rgb * alpha, 0, 255).astype(np.uint8)
            for c in range(3):
                small[..., c] = self.grade[c][small[..., c]]
            img[:n] = np.asarray(Image.fromarray(small, "RGB").resize((w, n), Image.Resampling.BILINEAR))
        return img, bottom

    # -- helpers ----------------------------------------------------------------------------------------------------

    def place(self, track, z0: float, length: float, gap: float = 0.5) -> bool:
        """Reserve [z0, z0+length] on a track (a lane, a strip of sidewalk) unless it overlaps a reservation."""
        taken = self.slots.setdefault(track, [])
        if any(z0 < b + gap and a < z0 + length + gap for a, b in taken):
            return False
        taken.append((z0, z0 + length))
        return True

    def sample_z(self, lo: float | None = None, hi: float | None = None, power: float = 1.4) -> float:
        lo = max(self.z_bottom * 0.75, 3.0) if lo is None else lo
        hi = self.z_max if hi is None else hi
        return lo + (max(hi, lo + 1) - lo) * self.rng.random() ** power

    def bb(self, x: float, z: float, pts) -> np.ndarray:
        """Billboard: 2-D points (metres, relative to the ground point (x, 0, z)) in a plane facing the camera."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        world = np.stack([x + pts[:, 0], pts[:, 1], np.full(len(pts), z)], axis=-1)
        return self.cam.project(world)

    def bb_ellipse(self, x: float, z: float, cx: float, cy: float, rx: float, ry: float) -> list[float]:
        (u0, v0), (u1, v1) = self.bb(x, z, [(cx - rx, cy + ry), (cx + rx, cy - ry)])
        return [u0, v0, u1, v1]

    # -- background -------------------------------------------------------------------------------------------------

    def skyline(self) -> None:
        """Far houses and trees along the horizon, hazed almost to the sky colour."""
        r, cam = self.rng, self.cam
        z = r.uniform(350, 700)
        x = (0 - cam.cx) / cam.f * z - 20
        x_end = (self.w - cam.cx) / cam.f * z + 20
        while x < x_end:
            bw = r.uniform(10, 45)
            if r.random() < 0.3:
                cy, rad = r.uniform(4, 10), bw / 2
                self.cv.ellipse(self.bb_ellipse(x + bw / 2, z, 0, cy, rad, rad * 0.8), VEGETATION,
                                _colour(r, "vegetation"), z)
            else:
                self.cv.polygon(_rects(cam, 2, z, x, x + bw, 0, r.uniform(6, 45)), BUILDING, _colour(r, "building"), z)
            x += bw * r.uniform(0.6, 1.1)

    def ground(self) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        zn, zf = _Z_NEAR, _Z_FAR
        cv.polygon([(0, cam.horizon), (self.w, cam.horizon), (self.w, self.h), (0, self.h)], TERRAIN,
                   _colour(r, "terrain"), 300.0)
        road_rgb = _colour(r, "road", 0.08)
        walk_rgb = _colour(r, "sidewalk", 0.08)
        curb_h = 0.12
        for s in (-1, 1):
            sh = self.shadow_amount if s == self.shadow_side else 0.0
            inner, outer = self.walk_x(s)
            # Between the sidewalk and the houses: grass, more pavement, or a car park (ignored in training).
            kind = r.choice(["terrain", "sidewalk", "parking"], p=[0.5, 0.35, 0.15])
            zone_label = {"terrain": TERRAIN, "sidewalk": SIDEWALK, "parking": PARKING}[kind]
            zone_rgb = _colour(r, "terrain") if kind == "terrain" else (
                walk_rgb * r.uniform(0.9, 1.1) if kind == "sidewalk" else road_rgb * r.uniform(0.9, 1.15))
            far = outer + s * 80
            cv.polygon(_rects(cam, 1, curb_h, *sorted((outer, far)), zn, zf), zone_label, zone_rgb, 0.0, sh)
            cv.polygon(_rects(cam, 1, curb_h, *sorted((inner, outer)), zn, zf), SIDEWALK, walk_rgb, 0.0, sh)
            if self.lawn[s] > 0:
                cv.polygon(_rects(cam, 1, curb_h, *sorted((self.edge[s], inner)), zn, zf), TERRAIN,
                           _colour(r, "terrain"), 0.0, sh)
            # The curb face that looks at the road.
            cv.polygon(_rects(cam, 0, self.edge[s], zn, zf, 0.0, curb_h), SIDEWALK, walk_rgb * 1.15, 0.0, sh)
        cv.polygon(_rects(cam, 1, 0.0, self.edge[-1], self.edge[1], zn, zf), ROAD, road_rgb, 0.0, 0)
        if self.shadow_amount:
            s = self.shadow_side
            reach = self.facade[s] - s * self.shadow_reach
            cv.polygon(_rects(cam, 1, 0.0, *sorted((self.edge[s], reach)), zn, zf), None, None, 0.0,
                       self.shadow_amount)
        for s in (-1, 1):
            if self.parking[s] and r.random() < 0.2:  # marked parking bays are "parking" in Cityscapes
                xa, xb = sorted((self.edge[s], self.edge[s] - s * self.park_w))
                cv.polygon(_rects(cam, 1, 0.0, xa, xb, zn, zf), PARKING, road_rgb * r.uniform(0.85, 1.1), 0.0, None)
        if self.crossing is not None:
            z0, zw = self.crossing
            cv.polygon(_rects(cam, 1, 0.0, -300, 300, z0, z0 + zw), ROAD, road_rgb * r.uniform(0.95, 1.05), z0, None)
        self._markings()

    def _markings(self) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        paint = _colour(r, "marking", 0.05)
        wear = r.uniform(0.7, 1.0)
        rgb = paint * wear + _colour(r, "road") * (1 - wear)
        dash, period = r.uniform(2, 6), r.uniform(8, 15)
        zs = np.arange(r.uniform(0, period), 250, period)
        for k in range(1, self.lanes):
            xb = self.x_road_l + k * self.lane_w
            if k == self.lanes // 2 and self.lanes > 2:  # solid line between the two directions
                rects = _rects(cam, 1, 0.0, xb - 0.08, xb + 0.08, _Z_NEAR, 400)
            else:
                rects = _rects(cam, 1, 0.0, xb - 0.07, xb + 0.07, zs, zs + dash)
            for q in rects:
                cv.polygon(q, None, rgb, 0.0, None)
        for s in (-1, 1):
            if r.random() < 0.6:
                xb = self.x_road_l + 0.25 if s < 0 else self.x_road_r - 0.25
                cv.polygon(_rects(cam, 1, 0.0, xb - 0.07, xb + 0.07, _Z_NEAR, 400)[0], None, rgb, 0.0, None)
        if self.zebra is not None:
            xs = np.arange(self.x_road_l + 0.3, self.x_road_r - 0.3, 1.0)
            for q in _rects(cam, 1, 0.0, xs, xs + 0.5, self.zebra, self.zebra + r.uniform(3, 5)):
                cv.polygon(q, None, rgb, 0.0, None)

    # -- street sides ---------------------------------------------------------------------------------------------

    def sides(self) -> None:
        r = self.rng
        skip = None if self.crossing is None else (self.crossing[0], self.crossing[0] + self.crossing[1])
        if self.z_end is not None:
            self._building_front(self.z_end)
        for s in (-1, 1):
            # A second row of taller houses behind, seen through gaps, over walls and fences.
            x_back = self.facade[s] + s * r.uniform(8, 25)
            segs = self._segments(r.uniform(-10, 5), self.z_side_end * 1.2, skip, back=True)
            for z0, z1, _ in reversed(segs):
                if r.random() < 0.85:
                    self._building(s, x_back, z0, z1, r.uniform(10, 35), windows=r.random() < 0.7)
            for z0, z1, kind in reversed(self._segments(r.uniform(-10, 5), self.z_side_end, skip)):
                x = self.facade[s] + s * (r.uniform(0, 2.5) if r.random() < 0.3 else 0.0)
                if kind == "building":
                    self._building(s, x, z0, z1, r.uniform(6, 26))
                elif kind == "wall":
                    self._wall(s, z0, z1)
                elif kind == "fence":
                    self._fence(s, z0, z1)
                elif kind == "green":
                    self._hedge(s, z0, z1)

    def _segments(self, z: float, z_end: float, skip, back: bool = False) -> list[tuple[float, float, str]]:
        r = self.rng
        kinds, p = ["building", "wall", "fence", "green", "gap"], [0.55, 0.1, 0.1, 0.15, 0.1]
        segs = []
        while z < z_end:
            length = r.uniform(6, 30)
            z1 = min(z + length, z_end)
            if skip is not None and z1 > skip[0] and z < skip[1]:  # leave the side street open
                if z < skip[0]:
                    segs.append((z, skip[0], "building" if back else str(r.choice(kinds, p=p))))
                z = skip[1]
                continue
            segs.append((z, z1, "building" if back else str(r.choice(kinds, p=p))))
            z = z1
        return segs

    def _building(self, s: int, x: float, z0: float, z1: float, height: float, windows: bool = True) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        z0c = max(z0, _Z_NEAR)
        if z1 <= z0c + 0.1:
            return
        rgb = _colour(r, "building")
        shade = self.side_shade[s]
        zm = 0.5 * (z0c + z1)
        depth = r.uniform(8, 15)
        if z0 > _Z_NEAR:  # the gable end that faces the camera
            cv.polygon(_rects(cam, 2, z0, *sorted((x, x + s * depth)), 0, height), BUILDING, rgb * 0.8, z0, 0)
        cv.polygon(_rects(cam, 0, x, z0c, z1, 0, height), BUILDING, rgb * shade, zm, 0)
        band = rgb * r.uniform(0.6, 1.2) * shade
        cv.polygon(_rects(cam, 0, x, z0c, z1, height - r.uniform(0.3, 0.8), height), None, band, zm, None)
        cv.polygon(_rects(cam, 0, x, z0c, z1, 0, r.uniform(0.3, 0.8)), None, band, zm, None)
        if windows:
            self._windows(cam, s, x, z0, z1, height, shade)

    def _windows(self, cam: _Camera, s: int, x: float, z0: float, z1: float, height: float, shade: float) -> None:
        r, cv = self.rng, self.cv
        floor = r.uniform(2.8, 3.6)
        spacing = r.uniform(2.0, 3.6)
        ww = spacing * r.uniform(0.35, 0.65)
        wh = floor * r.uniform(0.4, 0.6)
        zs = np.arange(z0 + r.uniform(0.3, 1.5), z1 - ww, spacing)
        shop = r.random() < 0.4
        ys = np.arange(floor if shop else 0.9, height - wh - 0.4, floor)
        if len(zs) == 0:
            return
        glass = _colour(r, "glass", 0.1)
        framed = r.random() < 0.5
        frame = _colour(r, "building", 0.05) * r.uniform(1.0, 1.3)
        if shop and height > 3:
            quads = _rects(cam, 0, x, zs, zs + spacing * 0.85, 0.4, min(2.6, height - 0.5))
            for q, zz in zip(quads, zs):
                if zz > _Z_NEAR:
                    cv.polygon(q, None, glass * r.uniform(0.7, 1.4) * shade, zz, None)
        if len(ys) == 0:
            return
        zz, yy = np.meshgrid(zs, ys)
        zz, yy = zz.ravel(), yy.ravel()
        keep = zz > _Z_NEAR
        zz, yy = zz[keep], yy[keep]
        if framed:
            m = 0.12
            for q, zq in zip(_rects(cam, 0, x, zz - m, zz + ww + m, yy - m, yy + wh + m), zz):
                cv.polygon(q, None, frame * shade, zq, None)
        tint = r.uniform(0.6, 1.5, len(zz))
        lit = r.random(len(zz)) < 0.08
        for q, zq, t, on in zip(_rects(cam, 0, x, zz, zz + ww, yy, yy + wh), zz, tint, lit):
            cv.polygon(q, None, (235, 210, 140) if on else glass * t * shade, zq, None)

    def _building_front(self, z: float) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        x = -150.0
        while x < 150:
            bw = r.uniform(8, 30)
            hgt = r.uniform(8, 28)
            rgb = _colour(r, "building")
            cv.polygon(_rects(cam, 2, z, x, x + bw, 0, hgt), BUILDING, rgb, z, 0)
            glass = _colour(r, "glass")
            sp = r.uniform(2.2, 3.5)
            xs = np.arange(x + 0.8, x + bw - 1.2, sp)
            ys = np.arange(1.0, hgt - 1.5, r.uniform(2.8, 3.5))
            xx, yy = np.meshgrid(xs, ys)
            for q in _rects(cam, 2, z, xx.ravel(), xx.ravel() + sp * 0.5, yy.ravel(), yy.ravel() + 1.4):
                cv.polygon(q, None, glass * r.uniform(0.7, 1.4), z, None)
            x += bw

    def _wall(self, s: int, z0: float, z1: float) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        z0 = max(z0, _Z_NEAR)
        if z1 <= z0 + 0.1:
            return
        x = self.walk_x(s)[1] + s * r.uniform(0, 1.0)
        hw = r.uniform(0.6, 2.6)
        rgb = _colour(r, "wall") * self.side_shade[s]
        zm = 0.5 * (z0 + z1)
        cv.polygon(_rects(cam, 0, x, z0, z1, 0, hw), WALL, rgb, zm, 0)
        if self.cam.height > hw:
            cv.polygon(_rects(cam, 1, hw, *sorted((x, x + s * 0.3)), z0, z1), WALL, rgb * 1.15, zm, 0)
        cv.polygon(_rects(cam, 0, x, z0, z1, hw - 0.12, hw), None, rgb * 1.2, zm, None)

    def _fence(self, s: int, z0: float, z1: float) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        z0 = max(z0, _Z_NEAR)
        if z1 <= z0 + 0.1:
            return
        x = self.walk_x(s)[1] + s * r.uniform(0, 0.5)
        hf = r.uniform(0.9, 2.0)
        rgb = _colour(r, "fence") * self.side_shade[s]
        zm = 0.5 * (z0 + z1)
        pitch = r.uniform(0.12, 0.3) if r.random() < 0.6 else r.uniform(1.5, 2.5)  # pickets or posts only
        zs = np.arange(z0 + 0.05, z1, pitch)
        w = min(pitch * 0.5, 0.12)
        for q, zq in zip(_rects(cam, 0, x, zs, zs + w, 0, hf), zs):
            cv.polygon(q, FENCE, rgb, zq, 0)
        for y in (hf * 0.3, hf * 0.85):
            cv.polygon(_rects(cam, 0, x, z0, z1, y, y + 0.08), FENCE, rgb * 0.9, zm, 0)

    def _hedge(self, s: int, z0: float, z1: float) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        z0 = max(z0, _Z_NEAR)
        if z1 <= z0 + 0.1:
            return
        x = self.walk_x(s)[1] + s * r.uniform(0, 2.0)
        hh = r.uniform(0.8, 2.4)
        rgb = _colour(r, "vegetation")
        zm = 0.5 * (z0 + z1)
        # Trees behind the hedge first, then the hedge in front of their trunks.
        for zt in np.arange(z0 + r.uniform(0, 5), z1, r.uniform(5, 10)):
            self._tree(x + s * r.uniform(1, 4), zt)
        cv.polygon(_rects(cam, 0, x, z0, z1, 0, hh), VEGETATION, rgb * self.side_shade[s], zm, 0)
        if cam.height > hh:
            cv.polygon(_rects(cam, 1, hh, *sorted((x, x + s * 1.0)), z0, z1), VEGETATION, rgb * 1.15, zm, 0)

    # -- things on and along the street -----------------------------------------------------------------------------

    def objects(self) -> None:
        """Collect every object with its nearest depth, then draw far to near so that near ones occlude."""
        r = self.rng
        items: list[tuple[float, int, object]] = []

        def add(z: float, fn, *args) -> None:
            items.append((z, len(items), lambda: fn(*args)))

        for s in (-1, 1):
            inner, outer = self.walk_x(s)
            if r.random() < 0.5:  # a row of street trees
                zt = r.uniform(2, 10)
                while zt < self.z_max:
                    add(zt, self._tree, inner + s * 0.8, zt)
                    zt += r.uniform(7, 16)
            if r.random() < 0.7:  # street lights
                zl = r.uniform(3, 20)
                while zl < self.z_max:
                    add(zl, self._streetlight, inner + s * 0.4, zl, s)
                    zl += r.uniform(20, 40)
            for _ in range(r.poisson(1.5)):
                z = self.sample_z(power=1.0)
                if self.place(("walk", s, 0), z, 0.5):
                    add(z, self._sign_post, inner + s * 0.5, z)
            for _ in range(r.poisson(1.5)):
                z = self.sample_z()
                x = r.uniform(min(inner, outer), max(inner, outer))
                if self.place(("walk", s, 1), z, 0.8):
                    add(z, self._static, x, z)
            for _ in range(r.poisson(0.6)):
                z = self.sample_z()
                x = inner + s * r.uniform(0.5, 1.5)
                if self.place(("walk", s, 2), z, 0.8):
                    add(z, self._bicycle_parked, x, z)
            n_people = r.poisson(3.5)
            group_z = self.sample_z()
            for _ in range(n_people):
                z = group_z + r.normal(0, 2.0) if r.random() < 0.5 else self.sample_z()
                z = max(z, 2.0)
                x = r.uniform(min(inner, outer), max(inner, outer))
                add(z, self._person, x, z, PERSON)
        if self.crossing is not None or self.zebra is not None or r.random() < 0.4:
            # Traffic lights at the junction or the zebra crossing (or at a junction out of sight).
            zj = self.crossing[0] if self.crossing is not None else (self.zebra or self.sample_z(10, 60))
            for s in (-1, 1):
                add(zj - 1, self._light_post, self.edge[s] + s * (self.lawn[s] + 0.4), zj - 1, s)
            if r.random() < 0.5:
                add(zj - 1.2, self._light_mast, zj - 1.2)
            for _ in range(r.poisson(2.5)):  # people on the crossing
                z = zj + (r.uniform(0.5, 3) if self.crossing is None else r.uniform(0.5, self.crossing[1]))
                add(z, self._person, r.uniform(self.x_road_l, self.x_road_r), z, PERSON)
        self._traffic(add)
        if r.random() < 0.06:
            zt = self.sample_z(15, 80)
            lane = int(r.integers(self.lanes))
            if self.place(("lane", lane), zt, 30, 1.0):
                add(zt, self._tram, self.x_road_l + (lane + 0.5) * self.lane_w, zt)
        for _, _, draw in sorted(items, key=lambda t: (-t[0], t[1])):
            draw()

    def _traffic(self, add) -> None:
        r = self.rng
        for s in (-1, 1):
            if not self.parking[s]:
                continue
            xc = self.edge[s] - s * self.park_w / 2
            z = r.uniform(self.z_bottom * 0.6, 12)
            while z < self.z_max:
                if r.random() < 0.75:
                    length = r.uniform(3.9, 4.9)
                    if self.place(("park", s), z, length):
                        add(z, self._car, xc + r.normal(0, 0.1), z, length, False)
                    z += length + r.uniform(0.6, 2.5)
                else:
                    z += r.uniform(3, 12)
        kinds = ["car", "car", "car", "car", "car", "truck", "bus", "motorcycle", "cyclist"]
        for _ in range(r.poisson(4.5)):
            kind = str(r.choice(kinds))
            lane = int(r.integers(self.lanes))
            oncoming = lane < self.lanes // 2
            xc = self.x_road_l + (lane + 0.5) * self.lane_w + r.normal(0, 0.25)
            z = self.sample_z(lo=max(self.z_bottom * 0.8, 5.0))
            length = {"car": r.uniform(3.9, 4.9), "truck": r.uniform(7, 10), "bus": 12.0}.get(kind, 2.0)
            if kind == "cyclist":  # cyclists keep to the right edge of their lane
                xc = self.x_road_l + (lane + 0.5) * self.lane_w + (-1 if oncoming else 1) * self.lane_w * 0.3
            if not self.place(("lane", lane), z, length, 1.0):
                continue
            if kind == "car":
                add(z, self._car, xc, z, length, oncoming)
            elif kind == "truck":
                add(z, self._truck, xc, z, length, oncoming)
            elif kind == "bus":
                add(z, self._bus, xc, z, length, oncoming)
            else:
                add(z, self._two_wheeler_rear, xc, z, kind == "motorcycle")
        for _ in range(r.poisson(0.5)):  # cyclists crossing or riding along the sidewalk, seen from the side
            s = int(r.choice([-1, 1]))
            inner, outer = self.walk_x(s)
            z = self.sample_z()
            add(z, self._cyclist_side, 0.5 * (inner + outer), z)

    # -- objects ----------------------------------------------------------------------------------------------------

    def _box(self, x0, x1, y0, y1, z0, z1, label, rgb, shadow=0.0, front=1.0, side=0.8, top=1.1) -> None:
        """The faces of an axis-aligned box that the camera can see, nearest face last."""
        cam, cv = self.cam, self.cv
        zm = 0.5 * (z0 + z1)
        if cam.height > y1:
            cv.polygon(_rects(cam, 1, y1, x0, x1, z0, z1), label, rgb * top, zm, shadow)
        if x0 > 0:
            cv.polygon(_rects(cam, 0, x0, z0, z1, y0, y1), label, rgb * side, zm, shadow)
        elif x1 < 0:
            cv.polygon(_rects(cam, 0, x1, z0, z1, y0, y1), label, rgb * side, zm, shadow)
        cv.polygon(_rects(cam, 2, z0, x0, x1, y0, y1), label, rgb * front, z0, shadow)

    def _side_x(self, x0: float, x1: float) -> float | None:
        """X of the visible long side of a box, if any."""
        return x0 if x0 > 0 else (x1 if x1 < 0 else None)

    def _wheels(self, x0, x1, z0, length, r_wheel, label, zs_rel=(0.17, 0.83)) -> None:
        cam, cv = self.cam, self.cv
        tyre = np.array([24.0, 24, 26])
        xs = self._side_x(x0, x1)
        if xs is not None:
            for rel in zs_rel:
                zc = z0 + rel * length
                cv.polygon(_rects(cam, 0, xs, zc - r_wheel, zc + r_wheel, 0, 2 * r_wheel * 0.9), label, tyre, zc, 0)
        for xa, xb in ((x0, x0 + 0.28), (x1 - 0.28, x1)):
            cv.polygon(_rects(cam, 2, z0 + 0.05, xa, xb, 0, 0.35), label, tyre, z0, 0)

    def _footprint(self, x0, x1, z0, z1) -> None:
        self.cv.polygon(_rects(self.cam, 1, 0.0, x0 - 0.15, x1 + 0.15, z0 - 0.1, z1 + 0.4), None, None, 0.0,
                        150 if self.sunny else 110)

    def _car(self, xc: float, z0: float, length: float, oncoming: bool) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        w = r.uniform(1.7, 1.95)
        x0, x1 = xc - w / 2, xc + w / 2
        body = _colour(r, "car", 0.08)
        y_belt = r.uniform(0.85, 1.05)
        y_roof = r.uniform(1.4, 1.75)
        glass = _colour(r, "glass", 0.1) * 0.8
        sh = self.in_shadow(xc)
        self._footprint(x0, x1, z0, z0 + length)
        # Cabin from the windscreen to the rear window; its near end depends on which way the car faces.
        c0, c1 = (0.3, 0.9) if oncoming else (r.uniform(0.05, 0.25), 0.72)
        ins = 0.12
        if cam.height > y_belt:
            cv.polygon(_rects(cam, 1, y_belt, x0, x1, z0, z0 + length), CAR, body * 1.1, z0, sh)
        self._box(x0 + ins, x1 - ins, y_belt, y_roof, z0 + c0 * length, z0 + c1 * length, CAR, body, sh)
        xs = self._side_x(x0 + ins, x1 - ins)
        zc0, zc1 = z0 + c0 * length, z0 + c1 * length
        if xs is not None:
            cv.polygon(_rects(cam, 0, xs, zc0 + 0.15, zc1 - 0.1, y_belt + 0.05, y_roof - 0.08), CAR, glass, zc0, sh)
        cv.polygon(_rects(cam, 2, zc0, x0 + ins + 0.1, x1 - ins - 0.1, y_belt + 0.06, y_roof - 0.08), CAR,
                   glass * 1.2, zc0, sh)
        self._box(x0, x1, 0.2, y_belt, z0, z0 + length, CAR, body, sh, top=1.1)
        self._wheels(x0, x1, z0, length, 0.32, CAR)
        lamp = np.array([235.0, 235, 210]) if oncoming else np.array([190.0, 20, 20])
        for xa, xb in ((x0 + 0.08, x0 + 0.4), (x1 - 0.4, x1 - 0.08)):
            cv.polygon(_rects(cam, 2, z0, xa, xb, y_belt - 0.22, y_belt - 0.08), CAR, lamp, z0, sh)
        cv.polygon(_rects(cam, 2, z0, xc - 0.26, xc + 0.26, 0.35, 0.46), CAR, (225, 225, 225), z0, sh)

    def _truck(self, xc: float, z0: float, length: float, oncoming: bool) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        w = r.uniform(2.3, 2.55)
        x0, x1 = xc - w / 2, xc + w / 2
        box_rgb, cab_rgb = _colour(r, "truck"), _colour(r, "truck")
        h_box, h_cab, cab_len = r.uniform(2.8, 3.8), r.uniform(2.6, 3.0), 2.2
        sh = self.in_shadow(xc)
        self._footprint(x0, x1, z0, z0 + length)
        if oncoming:  # cab first, cargo behind it
            self._box(x0 + 0.05, x1 - 0.05, 0.5, h_box, z0 + cab_len + 0.3, z0 + length, TRUCK, box_rgb, sh)
            self._box(x0, x1, 0.4, h_cab, z0, z0 + cab_len, TRUCK, cab_rgb, sh)
            cv.polygon(_rects(cam, 2, z0, x0 + 0.15, x1 - 0.15, h_cab * 0.55, h_cab - 0.2), TRUCK,
                       _colour(r, "glass"), z0, sh)
        else:
            self._box(x0 + 0.05, x1 - 0.05, 0.4, h_cab, z0 + length - cab_len, z0 + length, TRUCK, cab_rgb, sh)
            self._box(x0, x1, 0.55, h_box, z0, z0 + length - cab_len - 0.3, TRUCK, box_rgb, sh)
            cv.polygon(_rects(cam, 2, z0, xc - 0.02, xc + 0.02, 0.6, h_box - 0.1), TRUCK, box_rgb * 0.6, z0, sh)
        self._wheels(x0, x1, z0, length, 0.5, TRUCK, (0.15, 0.7, 0.85))

    def _bus(self, xc: float, z0: float, length: float, oncoming: bool) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        w = 2.55
        x0, x1 = xc - w / 2, xc + w / 2
        rgb = _colour(r, "bus", 0.08)
        hgt = r.uniform(3.0, 3.4)
        glass = _colour(r, "glass") * 0.9
        sh = self.in_shadow(xc)
        self._footprint(x0, x1, z0, z0 + length)
        self._box(x0, x1, 0.3, hgt, z0, z0 + length, BUS, rgb, sh)
        xs = self._side_x(x0, x1)
        if xs is not None:
            cv.polygon(_rects(cam, 0, xs, z0 + 0.4, z0 + length - 0.4, 1.2, hgt - 0.5), BUS, glass, z0, sh)
            pillars = np.arange(z0 + 1.5, z0 + length - 0.5, 1.4)
            for q, zq in zip(_rects(cam, 0, xs, pillars, pillars + 0.1, 1.2, hgt - 0.5), pillars):
                cv.polygon(q, BUS, rgb * 0.8, zq, sh)
        low = 0.9 if oncoming else 1.6
        cv.polygon(_rects(cam, 2, z0, x0 + 0.12, x1 - 0.12, low, hgt - 0.45), BUS, glass * 1.1, z0, sh)
        cv.polygon(_rects(cam, 2, z0, x0 + 0.3, x1 - 0.3, hgt - 0.4, hgt - 0.12), BUS, (30, 30, 30), z0, sh)
        self._wheels(x0, x1, z0, length, 0.5, BUS, (0.18, 0.72))

    def _tram(self, xc: float, z0: float) -> None:
        r, cam, cv = self.rng, self.cam, self.cv
        w, length, hgt = 2.4, r.uniform(25, 35), r.uniform(3.2, 3.5)
        x0, x1 = xc - w / 2, xc + w / 2
        rgb = _colour(r, "train", 0.08)
        sh = self.in_shadow(xc)
        self._footprint(x0, x1, z0, z0 + length)
        self._box(x0, x1, 0.35, hgt, z0, z0 + length, TRAIN, rgb, sh)
        glass = _colour(r, "glass")
        xs = self._side_x(x0, x1)
        if xs is not None:
            panes = np.arange(z0 + 0.8, z0 + length - 1.5, 2.0)
            for q, zq in zip(_rects(cam, 0, xs, panes, panes + 1.5, 1.2, hgt - 0.7), panes):
                cv.polygon(q, TRAIN, glass, zq, sh)
        cv.polygon(_rects(cam, 2, z0, x0 + 0.15, x1 - 0.15, 1.1, hgt - 0.4), TRAIN, glass, z0, sh)
        # Pantograph up to the overhead wire.
        cv.line(self.cam.project([(xc - 0.5, hgt, z0 + 5), (xc, hgt + 1.2, z0 + 5.5), (xc + 0.5, hgt, z0 + 6)]),
                max(1, round(cam.px(0.06, z0 + 5))), TRAIN, (40, 40, 40), z0 + 5, sh)

    def _person(self, x: float, z: float, label: int, hp: float | None = None) -> None:
        r, cv = self.rng, self.cv
        hp = r.uniform(1.5, 1.95) if hp is None else hp
        if r.random() < 0.08:
            hp = r.uniform(1.0, 1.35)  # a child
        top, bottom = _colour(r, "clothes"), _colour(r, "clothes")
        skin, hair = _colour(r, "skin", 0.05), _colour(r, "hair")
        sh = self.in_shadow(x)
        hip, shoulder = 0.52 * hp, 0.81 * hp
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        coat = r.random() < 0.3
        side_view = r.random() < 0.55
        if side_view:
            d = float(r.choice([-1, 1]))
            stride = r.uniform(0, 0.2) * hp
            swing = stride * 0.8
            parts.append((_limb((0, hip), (-d * stride, 0.02 * hp), 0.085 * hp, 0.06 * hp), bottom * 0.8))
            parts.append((_limb((0, hip), (d * stride, 0.02 * hp), 0.085 * hp, 0.06 * hp), bottom))
            t0 = 0.28 * hp if coat else hip - 0.03 * hp
            parts.append((np.array([(-0.08 * hp, t0), (0.08 * hp, t0), (0.07 * hp, shoulder), (-0.08 * hp, shoulder)]),
                          top))
            parts.append((_limb((0, shoulder - 0.02 * hp), (-d * swing, 0.46 * hp), 0.055 * hp, 0.045 * hp),
                          top * 0.85))
        else:
            for sgn in (-1, 1):
                parts.append((_limb((sgn * 0.05 * hp, hip), (sgn * 0.06 * hp, 0.02 * hp), 0.08 * hp, 0.065 * hp),
                              bottom))
            t0 = 0.28 * hp if coat else hip - 0.03 * hp
            parts.append((np.array([(-0.1 * hp, t0), (0.1 * hp, t0), (0.125 * hp, shoulder), (-0.125 * hp, shoulder)]),
                          top))
            for sgn in (-1, 1):
                parts.append((_limb((sgn * 0.135 * hp, shoulder - 0.01 * hp), (sgn * 0.16 * hp, 0.46 * hp),
                                    0.05 * hp, 0.042 * hp), top * 0.9))
        if r.random() < 0.2:  # a bag
            bx = r.choice([-1, 1]) * 0.14 * hp
            parts.append((np.array([(bx - 0.05 * hp, 0.42 * hp), (bx + 0.05 * hp, 0.42 * hp),
                                    (bx + 0.05 * hp, 0.55 * hp), (bx - 0.05 * hp, 0.55 * hp)]), _colour(r, "clothes")))
        for poly, rgb in parts:
            cv.polygon(self.bb(x, z, poly), label, rgb, z, sh)
        cv.polygon(self.bb(x, z, _limb((0, shoulder - 0.02 * hp), (0, 0.86 * hp), 0.04 * hp)), label, skin, z, sh)
        cv.ellipse(self.bb_ellipse(x, z, 0, 0.905 * hp, 0.05 * hp, 0.062 * hp), label, skin, z, sh)
        back = r.random() < 0.4
        cv.ellipse(self.bb_ellipse(x, z, 0, (0.915 if back else 0.94) * hp, 0.052 * hp, (0.055 if back else 0.035) * hp),
                   label, hair, z, sh)

    def _bicycle_side(self, x: float, z: float, d: float, frame_rgb) -> None:
        cam, cv = self.cam, self.cv
        sh = self.in_shadow(x)
        tyre = max(1, round(cam.px(0.05, z)))
        tube = max(1, round(cam.px(0.035, z)))
        for wx in (-0.52, 0.52):
            cv.ellipse(self.bb_ellipse(x, z, wx, 0.34, 0.34, 0.34), BICYCLE, (25, 25, 25), z, sh, width=tyre)
        pts = {"rear": (-0.52 * d, 0.34), "bb": (0.0, 0.3), "seat": (-0.15 * d, 0.9), "head": (0.38 * d, 0.85),
               "front": (0.52 * d, 0.34), "bar": (0.36 * d, 1.02), "saddle": (-0.2 * d, 0.93)}
        for a, b in (("rear", "bb"), ("rear", "seat"), ("seat", "bb"), ("seat", "head"), ("bb", "head"),
                     ("head", "front"), ("head", "bar")):
            cv.line(self.bb(x, z, [pts[a], pts[b]]), tube, BICYCLE, frame_rgb, z, sh)
        cv.line(self.bb(x, z, [pts["saddle"], (-0.05 * d, 0.93)]), tube * 2, BICYCLE, (30, 30, 30), z, sh)

    def _bicycle_parked(self, x: float, z: float) -> None:
        self._bicycle_side(x, z, float(self.rng.choice([-1, 1])), _colour(self.rng, "frame"))

    def _cyclist_side(self, x: float, z: float) -> None:
        r, cv = self.rng, self.cv
        d = float(r.choice([-1, 1]))
        self._bicycle_side(x, z, d, _colour(r, "frame"))
        top, bottom, skin = _colour(r, "clothes"), _colour(r, "clothes"), _colour(r, "skin", 0.05)
        sh = self.in_shadow(x)
        hip, knee, foot = (-0.15 * d, 0.98), (0.15 * d, 0.72), (0.02 * d, 0.3)
        shoulder, hand = (0.12 * d, 1.5), (0.36 * d, 1.02)
        for p, q, w, rgb in ((hip, knee, 0.14, bottom), (knee, foot, 0.11, bottom), (hip, shoulder, 0.3, top),
                             (shoulder, hand, 0.08, top)):
            cv.polygon(self.bb(x, z, _limb(p, q, w)), RIDER, rgb, z, sh)
        cv.ellipse(self.bb_ellipse(x, z, 0.2 * d, 1.67, 0.1, 0.12), RIDER, skin, z, sh)
        cv.ellipse(self.bb_ellipse(x, z, 0.18 * d, 1.72, 0.11, 0.08), RIDER, _colour(r, "hair"), z, sh)

    def _two_wheeler_rear(self, x: float, z: float, motor: bool) -> None:
        """A bicycle or motorbike seen from behind (or the front) with its rider."""
        r, cv = self.rng, self.cv
        label = MOTORCYCLE if motor else BICYCLE
        sh = self.in_shadow(x)
        frame = _colour(r, "frame")
        if motor:
            self._footprint(x - 0.4, x + 0.4, z, z + 2.0)
            cv.polygon(self.bb(x, z, [(-0.08, 0), (0.08, 0), (0.08, 0.62), (-0.08, 0.62)]), label, (25, 25, 25), z, sh)
            cv.polygon(self.bb(x, z, [(-0.35, 0.45), (0.35, 0.45), (0.3, 0.95), (-0.3, 0.95)]), label, frame, z, sh)
            cv.polygon(self.bb(x, z, [(-0.12, 0.62), (0.12, 0.62), (0.12, 0.72), (-0.12, 0.72)]), label,
                       (200, 20, 20), z, sh)
        else:
            cv.polygon(self.bb(x, z, [(-0.025, 0), (0.025, 0), (0.025, 0.68), (-0.025, 0.68)]), label, (25, 25, 25),
                       z, sh)
            cv.polygon(self.bb(x, z, _limb((-0.3, 1.02), (0.3, 1.02), 0.04)), label, frame, z, sh)
        top, bottom, skin = _colour(r, "clothes"), _colour(r, "clothes"), _colour(r, "skin", 0.05)
        seat = 0.95 if motor else 0.98
        for sgn in (-1, 1):
            cv.polygon(self.bb(x, z, _limb((sgn * 0.1, seat), (sgn * (0.2 if motor else 0.12), 0.3), 0.13, 0.1)),
                       RIDER, bottom, z, sh)
        cv.polygon(self.bb(x, z, [(-0.17, seat - 0.05), (0.17, seat - 0.05), (0.2, seat + 0.55), (-0.2, seat + 0.55)]),
                   RIDER, top, z, sh)
        for sgn in (-1, 1):
            cv.polygon(self.bb(x, z, _limb((sgn * 0.19, seat + 0.5), (sgn * 0.3, 1.02), 0.08)), RIDER, top * 0.9, z, sh)
        head_rgb = _colour(r, "frame") if motor or r.random() < 0.5 else _colour(r, "hair")  # helmet or hair
        rad = 0.14 if motor else 0.11
        cv.ellipse(self.bb_ellipse(x, z, 0, seat + 0.7, rad, rad * 1.1), RIDER, skin if not motor else head_rgb, z, sh)
        cv.ellipse(self.bb_ellipse(x, z, 0, seat + 0.74, rad * 1.02, rad * 0.8), RIDER, head_rgb, z, sh)

    def _tree(self, x: float, z: float) -> None:
        r, cv = self.rng, self.cv
        if z < _Z_NEAR + 0.5:
            return
        trunk_h, trunk_w = r.uniform(1.8, 3.5), r.uniform(0.2, 0.45)
        sh = self.in_shadow(x)
        cv.polygon(self.bb(x, z, [(-trunk_w / 2, 0), (trunk_w / 2, 0), (trunk_w * 0.35, trunk_h + 1),
                                  (-trunk_w * 0.35, trunk_h + 1)]), VEGETATION, _colour(r, "fence") * 0.7, z, sh)
        green = _colour(r, "vegetation")
        crown = r.uniform(1.5, 3.5)
        cy = trunk_h + crown * 0.8
        for _ in range(int(r.integers(4, 9))):
            ox, oy = r.normal(0, crown * 0.45), r.normal(0, crown * 0.35)
            rad = crown * r.uniform(0.45, 0.8)
            cv.ellipse(self.bb_ellipse(x, z, ox, cy + oy, rad, rad * r.uniform(0.8, 1.1)), VEGETATION,
                       green * r.uniform(0.75, 1.2), z, sh)

    def _pole(self, x: float, z: float, height: float, width: float, rgb) -> None:
        self.cv.polygon(self.bb(x, z, [(-width / 2, 0), (width / 2, 0), (width / 2, height), (-width / 2, height)]),
                        POLE, rgb, z, self.in_shadow(x))

    def _streetlight(self, x: float, z: float, s: int) -> None:
        r, cv = self.rng, self.cv
        hgt, rgb = r.uniform(5.5, 9), _colour(r, "pole")
        self._pole(x, z, hgt, r.uniform(0.14, 0.25), rgb)
        arm = r.uniform(0.8, 2.5) * -s
        width = max(1, round(self.cam.px(0.08, z)))
        cv.line(self.bb(x, z, [(0, hgt - 0.2), (arm * 0.6, hgt + 0.25), (arm, hgt + 0.2)]), width, POLE, rgb, z, 0)
        cv.polygon(self.bb(x, z, [(arm - 0.35, hgt + 0.05), (arm + 0.35, hgt + 0.05), (arm + 0.3, hgt + 0.25),
                                  (arm - 0.3, hgt + 0.25)]), POLE, rgb * 0.8, z, 0)

    def _sign_post(self, x: float, z: float) -> None:
        r = self.rng
        hgt = r.uniform(2.3, 3.2)
        self._pole(x, z, hgt, r.uniform(0.06, 0.1), _colour(r, "pole"))
        y = hgt
        for _ in range(1 + int(r.random() < 0.35)):
            size = r.uniform(0.5, 0.85)
            self._sign(x, z - 0.05, y - size / 2, size)
            y -= size + 0.1

    def _sign(self, x: float, z: float, cy: float, size: float) -> None:
        r, cv = self.rng, self.cv
        sh = self.in_shadow(x)
        red, white, blue = np.array([200.0, 30, 35]), np.array([235.0, 235, 230]), np.array([30.0, 80, 170])
        yellow = np.array([240.0, 200, 30])
        shape = r.choice(["circle", "triangle", "rect", "diamond", "blue"])
        half = size / 2
        if shape in ("circle", "blue"):
            outer, inner = (red, white) if shape == "circle" else (blue, blue * 1.1)
            cv.ellipse(self.bb_ellipse(x, z, 0, cy, half, half), SIGN, outer, z, sh)
            cv.ellipse(self.bb_ellipse(x, z, 0, cy, half * 0.75, half * 0.75), SIGN, inner, z, sh)
            if shape == "blue":
                cv.polygon(self.bb(x, z, _limb((-half * 0.4, cy), (half * 0.45, cy), half * 0.2)), SIGN, white, z, sh)
        elif shape == "triangle":
            pts = [(-half, cy - half * 0.8), (half, cy - half * 0.8), (0, cy + half * 0.9)]
            cv.polygon(self.bb(x, z, pts), SIGN, red, z, sh)
            cv.polygon(self.bb(x, z, [(px * 0.65, cy + (py - cy) * 0.65 - 0.02) for px, py in pts]), SIGN, white, z, sh)
        elif shape == "diamond":
            pts = [(0, cy + half), (half, cy), (0, cy - half), (-half, cy)]
            cv.polygon(self.bb(x, z, pts), SIGN, white, z, sh)
            cv.polygon(self.bb(x, z, [(px * 0.65, cy + (py - cy) * 0.65) for px, py in pts]), SIGN, yellow, z, sh)
        else:
            fill = [blue, white, yellow, np.array([30.0, 110, 60])][int(r.integers(4))]
            wide = r.uniform(0.8, 1.8)
            box = [(-half * wide, cy - half * 0.7), (half * wide, cy - half * 0.7), (half * wide, cy + half * 0.7),
                   (-half * wide, cy + half * 0.7)]
            cv.polygon(self.bb(x, z, box), SIGN, white if fill is not white else red, z, sh)
            cv.polygon(self.bb(x, z, [(px * 0.88, cy + (py - cy) * 0.8) for px, py in box]), SIGN, fill, z, sh)

    def _signal(self, x: float, z: float, y0: float) -> None:
        """A traffic light head with its bottom at height y0."""
        r, cv = self.rng, self.cv
        sh = self.in_shadow(x)
        body = np.array([35.0, 35, 35]) if r.random() < 0.7 else np.array([200.0, 170, 40])
        w, hgt = 0.32, 0.95
        if r.random() < 0.4:  # back plate
            cv.polygon(self.bb(x, z, [(-w, y0 - 0.05), (w, y0 - 0.05), (w, y0 + hgt + 0.05), (-w, y0 + hgt + 0.05)]),
                       LIGHT, body * 0.8, z, sh)
        cv.polygon(self.bb(x, z, [(-w / 2, y0), (w / 2, y0), (w / 2, y0 + hgt), (-w / 2, y0 + hgt)]), LIGHT, body, z, sh)
        on = int(r.integers(3))
        lamps = [(230, 40, 30), (240, 180, 30), (60, 220, 90)]
        for k in range(3):
            cy = y0 + hgt * (5 - 2 * k) / 6
            rgb = np.array(lamps[k], dtype=np.float64) * (1.0 if k == on else 0.25)
            cv.ellipse(self.bb_ellipse(x, z, 0, cy, 0.1, 0.1), LIGHT, rgb, z, sh)

    def _light_post(self, x: float, z: float, s: int) -> None:
        r = self.rng
        hgt = r.uniform(2.8, 3.8)
        self._pole(x, z, hgt + 0.3, r.uniform(0.1, 0.16), _colour(r, "pole"))
        self._signal(x, z - 0.1, hgt - 0.6)
        if r.random() < 0.5:
            self._sign(x, z - 0.1, hgt - 1.2, r.uniform(0.45, 0.65))

    def _light_mast(self, z: float) -> None:
        """A mast arm over the road carrying lights above the lanes."""
        r, cv = self.rng, self.cv
        s = int(r.choice([-1, 1]))
        x0 = self.edge[s] + s * (self.lawn[s] + 0.4)
        hgt = r.uniform(5.5, 6.5)
        rgb = _colour(r, "pole")
        self._pole(x0, z, hgt + 0.2, 0.25, rgb)
        x_end = self.x_road_l + 1 if s > 0 else self.x_road_r - 1
        width = max(1, round(self.cam.px(0.15, z)))
        cv.line(self.bb(0.0, z, [(x0, hgt), (x_end, hgt)]), width, POLE, rgb, z, 0)
        for k in range(1, self.lanes):
            xl = self.x_road_l + k * self.lane_w - self.lane_w / 2
            if min(x0, x_end) < xl < max(x0, x_end):
                self._signal(xl, z - 0.05, hgt - 1.05)

    def _static(self, x: float, z: float) -> None:
        """Bins, boxes, planters: things Cityscapes calls 'static' and training ignores."""
        r = self.rng
        w, hgt, d = r.uniform(0.4, 1.2), r.uniform(0.4, 1.2), r.uniform(0.4, 0.9)
        self._box(x - w / 2, x + w / 2, 0, hgt, z, z + d, STATIC, _colour(r, "static"), self.in_shadow(x))

    def ego(self) -> None:
        """The bonnet of the recording car along the bottom edge, as in many Cityscapes images."""
        r, cv = self.rng, self.cv
        if r.random() < 0.5:
            return
        depth = self.h * r.uniform(0.05, 0.13)
        xs = np.linspace(0, self.w, 33)
        ys = self.h - depth * (1 - 0.6 * ((xs - self.cam.cx) / (self.w / 2)) ** 2)
        pts = np.concatenate([np.stack([xs, ys], 1), [(self.w, self.h + 1), (0, self.h + 1)]])
        cv.polygon(pts, EGO_VEHICLE, _colour(r, "car", 0.05) * 0.6, 0.0, 0)

    # -- photometry -----------------------------------------------------------------------------------------------

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        r, h, w = self.rng, self.h, self.w
        label = np.asarray(self.cv.label)
        # Texture as one multiplicative field per pixel. In-place arithmetic: big temporaries cost more than the
        # maths at 2048x1024.
        lo_amp, mid_amp, fine_amp = _TEX_LUT
        mod = lo_amp.take(label)
        mod *= _value_noise(r, h, w, cell=max(h / 5, 2))
        tmp = mid_amp.take(label)
        tmp *= _value_noise(r, h, w, cell=max(h / 80, 1.5))
        mod += tmp
        # Per-pixel noise from raw random bytes (uniform in [-1, 1], several times cheaper than normals): fine
        # texture and sensor noise in one.
        fine = np.frombuffer(r.bytes(h * w), dtype=np.uint8).reshape(h, w).astype(np.float32)
        fine -= 127.5
        fine *= np.float32(1 / 128)
        fine_amp.take(label, out=tmp)
        tmp += np.float32(r.uniform(0.02, 0.06))
        tmp *= fine
        mod += tmp
        mod += 1
        self._paving(label, mod)
        shadow_lut = (1 - np.arange(256, dtype=np.float32) / 255).astype(np.float32)
        mod *= shadow_lut.take(np.asarray(self.cv.shadow), out=tmp)
        vx = ((np.arange(w, dtype=np.float32) - w / 2) / (w / 2)) ** 2
        vy = ((np.arange(h, dtype=np.float32) - h / 2) / (h / 2)) ** 2
        np.add(vy[:, None], vx[None, :], out=tmp)
        tmp *= np.float32(-r.uniform(0, 0.15))  # vignetting
        tmp += 1
        mod *= tmp
        np.maximum(mod, 0, out=mod)
        img = np.multiply(np.asarray(self.cv.color), mod[..., None], dtype=np.float32)
        np.minimum(img, 255, out=img)
        out = img.astype(np.uint8)
        # Lens blur, a [1 2 1] filter each way: painted edges are sharper than any photo. Thin far objects at low
        # resolution would vanish under it, so small images stay sharp.
        if w >= 512 and r.random() < 0.7:
            out = _blur121(out)
        return out, label.copy()

    def _paving(self, label: np.ndarray, mod: np.ndarray) -> None:
        """Darken grout lines of a square grid laid on the sidewalk, where they are a few pixels apart."""
        cam = self.cam
        top = int(math.ceil(cam.horizon + 1))
        ys, xs = np.nonzero(label[top:] == SIDEWALK)
        tile = self.rng.uniform(0.3, 0.6)
        if len(ys) == 0:
            return
        ys += top
        zg = cam.f * (cam.height - 0.12) / (ys - cam.horizon)
        xg = (xs - cam.cx) * zg / cam.f
        grout = (np.abs(xg / tile % 1 - 0.5) > 0.45) | (np.abs(zg / tile % 1 - 0.5) > 0.45)
        keep = grout & (cam.f * tile / zg > 5)
        mod[ys[keep], xs[keep]] *= np.float32(0.8)


def _blur121(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of a uint8 H×W×C image (borders repeat the edge pixel)."""
    a = img.astype(np.uint16)
    t = np.empty_like(a)
    np.add(a[:, :-2], a[:, 2:], out=t[:, 1:-1])
    t[:, 1:-1] += a[:, 1:-1]
    t[:, 1:-1] += a[:, 1:-1]
    t[:, 0], t[:, -1] = a[:, 0] * 4, a[:, -1] * 4
    np.add(t[:-2], t[2:], out=a[1:-1])
    a[1:-1] += t[1:-1]
    a[1:-1] += t[1:-1]
    a[0], a[-1] = t[0] * 4, t[-1] * 4
    a += 8
    a >>= 4
    return a.astype(np.uint8)


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise of roughly unit amplitude with blobs about ``cell`` pixels wide (bilinear upsampling)."""
    gh, gw = int(math.ceil(h / cell)) + 1, int(math.ceil(w / cell)) + 1
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.Resampling.BILINEAR))


def render(width: int, height: int, seed: int = 0, split: str = "train", index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: (RGB uint8 H×W×3, Cityscapes label ids uint8 H×W). Pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = _Scene(width, height, rng)
    scene.skyline()
    scene.ground()
    scene.sides()
    scene.objects()
    scene.ego()
    return scene.finish()


# ----------------------------------------------------------------------------------------------------------------
# Files on disk.


def sample_stem(split: str, index: int) -> tuple[str, str]:
    """(city, "<city>_<seq>_<frame>") of image ``index``; cities take turns, so adding images never renames one."""
    cities = CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{FRAME:06d}"


def sample_paths(root: Path, split: str, index: int) -> dict[str, Path]:
    city, stem = sample_stem(split, index)
    gt = root / "gtFine" / split / city
    return {
        "image": root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
        "labelIds": gt / f"{stem}_gtFine_labelIds.png",
        "labelTrainIds": gt / f"{stem}_gtFine_labelTrainIds.png",
    }


def _save_png(array: np.ndarray, path: Path, compress_level: int) -> None:
    # Temp name that no "*_leftImg8bit.png" glob can pick up, then an atomic rename.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)
    os.replace(tmp, path)


def _write_sample(job: tuple[str, str, int, int, int, int, bool]) -> None:
    root, split, index, width, height, seed, train_ids = job
    paths = sample_paths(Path(root), split, index)
    wanted = ["image", "labelIds"] + (["labelTrainIds"] if train_ids else [])
    if all(paths[k].exists() for k in wanted):
        return
    rgb, label = render(width, height, seed, split, index)
    if split == "test":
        label = np.zeros_like(label)  # Cityscapes ships no test annotations: all 'unlabeled'
    for key in wanted:
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    # Noisy photos barely compress: level 1 is several times faster than the default for the same size.
    _save_png(rgb, paths["image"], 1)
    _save_png(label, paths["labelIds"], 6)
    if train_ids:
        _save_png(ID_TO_TRAIN_ID[label], paths["labelTrainIds"], 6)


def _whole(flag: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise UserError(f"{flag}: must be a whole number {bounds}, got {value!r}")
    return int(value)


def _check_params(train, val, test, width, height, seed, train_ids) -> dict:
    params = {
        "train": _whole("--train", train, 0), "val": _whole("--val", val, 0), "test": _whole("--test", test, 0),
        "width": _whole("--width", width, MIN_SIZE, MAX_SIZE), "height": _whole("--height", height, MIN_SIZE, MAX_SIZE),
        "seed": _whole("--seed", seed, 0), "train_ids": bool(train_ids),
    }
    if params["train"] + params["val"] + params["test"] == 0:
        raise UserError("--train/--val/--test: all are 0; ask for at least one image")
    return params


def _read_marker(root: Path) -> dict | None:
    """The marker of a previous synthetic dataset in ``root``; UserError if ``root`` holds anything else."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a directory; choose a new or empty directory")
    # Our lock file, or a marker half-written when a run was killed, do not make the directory foreign.
    entries = {e for e in os.listdir(root) if not e.startswith(".synthetic")} if root.is_dir() else set()
    if not entries:
        return None
    foreign = (f"{root}: not empty and not a synthetic dataset (no valid {MARKER}); "
               "choose a new or empty directory, the generator does not write over other files")
    if MARKER not in entries:
        raise UserError(foreign)
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(foreign) from exc
    if not isinstance(marker, dict) or marker.get("generator") != GENERATOR:
        raise UserError(foreign)
    return marker


def _write_marker(root: Path, params: dict, complete: bool) -> None:
    marker = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "params": params,
        "complete": complete,
        "cities": {s: list(CITIES[s]) for s in SPLITS if params[s] > 0},
        "layout": "Cityscapes: leftImg8bit/<split>/<city>/<name>_leftImg8bit.png, "
                  "gtFine/<split>/<city>/<name>_gtFine_labelIds.png (label ids from torchvision's table)",
        "regenerate": "python -m fastseg.synthetic OUT " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in params.items() if k != "train_ids")
                      + (" --train-ids" if params["train_ids"] else ""),
    }
    tmp = root / f".{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, root / MARKER)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    # One generator per directory at a time; the others wait and then find the dataset complete.
    with open(root / LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def generate(out_dir: str | os.PathLike, train: int = 20, val: int = 10, test: int = 0, width: int = 1024,
             height: int = 512, seed: int = 0, train_ids: bool = False, workers: int = 1,
             progress: bool = False) -> Path:
    """Write a synthetic dataset to ``out_dir`` (see the module docstring) and return its path.

    Idempotent: a complete dataset with the same parameters is left as it is, an interrupted one is finished.
    Refuses (UserError) a directory holding anything else, or a synthetic dataset made with other parameters.
    Safe when several processes call it at once.
    """
    params = _check_params(train, val, test, width, height, seed, train_ids)
    workers = _whole("--workers", workers, 1)
    root = Path(out_dir)
    marker = _read_marker(root)  # refuse a foreign directory before putting a lock file in it
    if marker is not None and marker.get("params") == params and marker.get("complete"):
        return root  # done already; no lock needed, so a read-only copy works too
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        marker = _read_marker(root)
        if marker is not None and marker.get("params") != params:
            raise UserError(f"{root}: holds a synthetic dataset made with other parameters ({marker.get('params')}); "
                            "delete it or choose another directory")
        if marker is not None and marker.get("complete"):
            return root
        _write_marker(root, params, complete=False)
        for tmp in [*root.glob("*/*/*/.*.tmp-*"), *root.glob(f".{MARKER}.tmp-*")]:  # left by a killed run
            tmp.unlink(missing_ok=True)
        jobs = [(str(root), split, i, params["width"], params["height"], params["seed"], params["train_ids"])
                for split in SPLITS for i in range(params[split])]
        bar = tqdm(total=len(jobs), desc=f"synthetic {width}x{height}", unit="img", disable=not progress)
        with bar:
            if workers == 1:
                for job in jobs:
                    _write_sample(job)
                    bar.update()
            else:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for _ in pool.map(_write_sample, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
                        bar.update()
        _write_marker(root, params, complete=True)
    return root


def ensure_dataset(out_dir: str | os.PathLike, **params) -> Path:
    """The dataset at ``out_dir`` made with ``params`` (as :func:`generate`), generating it only if missing."""
    params.setdefault("progress", False)
    return generate(out_dir, **params)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastseg.synthetic",
        description="Write synthetic street scenes in the Cityscapes layout (leftImg8bit/, gtFine/ with label ids).")
    parser.add_argument("out", type=Path, help="output directory (new, empty, or a previous synthetic dataset)")
    parser.add_argument("--train", type=int, default=20, help="training images (default 20)")
    parser.add_argument("--val", type=int, default=10, help="validation images (default 10)")
    parser.add_argument("--test", type=int, default=0, help="test images, labels all 0 as in Cityscapes (default 0)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    parser.add_argument("--height", type=int, default=512, help="image height in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--train-ids", action="store_true",
                        help="also write *_gtFine_labelTrainIds.png, as cityscapesscripts' createTrainIdLabelImgs does")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images in parallel (default 1)")
    args = parser.parse_args(argv)
    root = generate(args.out, train=args.train, val=args.val, test=args.test, width=args.width, height=args.height,
                    seed=args.seed, train_ids=args.train_ids, workers=args.workers, progress=True)
    print(f"synthetic Cityscapes ({args.train} train, {args.val} val, {args.test} test, "
          f"{args.width}x{args.height}) at {root}")
    return 0


if __name__ == "__main__":
    run_cli(main)
