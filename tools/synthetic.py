"""Synthetic street scenes in the Cityscapes layout: the dataset of `make demo` and of the tests.

A street seen from a car: sky, skyline, a road with lane marks to a vanishing point, sidewalks, houses, walls,
fences, hedges; cars, trucks, buses, trams, people, riders on bicycles and motorbikes, trees, poles, signs and
traffic lights, smaller when farther and painted far to near. Each class has its own palettes and texture, but
they overlap (grey road, wall and car), so place and shape matter too. A few dozen images hold all 19 training
classes. Labels are Cityscapes label ids from fastseg.data's class table, so any Cityscapes reader reads them:

    <out>/leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png      RGB
    <out>/gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_labelIds.png       label ids, mode L
    <out>/gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_labelTrainIds.png  with --train-ids
    <out>/synthetic.json                                                      parameters; "complete" when done

Image ``index`` of a split has its own random stream seeded by (seed, split, index): the same parameters give
the same bytes, a rerun finishes an interrupted run, and a complete one is left as it is (demo reruns).

    python tools/synthetic.py data/synthetic --train 96 --val 16 --width 1024 --height 512 [--train-ids]
"""

import argparse
import json
import numbers
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tools/synthetic.py` finds fastseg

from fastseg.cityscapes import CLASS_NAMES, ID_TO_TRAIN_ID, TRAIN_ID_TO_ID  # noqa: E402
from fastseg.errors import UserError, run_cli  # noqa: E402

VERSION = 2  # raised when the same parameters start giving other pixels; older datasets are then refused
MARKER = "synthetic.json"
SPLITS = ("train", "val")
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "munster")}  # real names, disjoint per split
FRAME = 19  # Cityscapes names the annotated frame of each 30-frame snippet 000019
MIN_SIZE, MAX_SIZE = 16, 8192
Z_NEAR, Z_FAR = 0.6, 1000.0  # metres; nothing is projected nearer, so the projection never divides by ~0

_ID = dict(zip(CLASS_NAMES, TRAIN_ID_TO_ID.tolist()))
ROAD, SIDEWALK, BUILDING, WALL, FENCE = (_ID[n] for n in ("road", "sidewalk", "building", "wall", "fence"))
POLE, LIGHT, SIGN, VEGETATION = (_ID[n] for n in ("pole", "traffic light", "traffic sign", "vegetation"))
TERRAIN, SKY, PERSON, RIDER, CAR = (_ID[n] for n in ("terrain", "sky", "person", "rider", "car"))
TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = (_ID[n] for n in ("truck", "bus", "train", "motorcycle", "bicycle"))

_PALETTES = {
    "road": [(92, 92, 98), (76, 76, 80), (114, 110, 108)], "glass": [(40, 48, 58), (70, 86, 104), (30, 32, 36)],
    "sidewalk": [(152, 146, 138), (128, 128, 134), (172, 162, 150), (160, 120, 108)],
    "building": [(166, 158, 146), (205, 190, 166), (150, 84, 64), (214, 212, 206), (90, 90, 96)],
    "wall": [(152, 150, 144), (178, 166, 150), (138, 94, 74)], "sign": [(200, 30, 35), (30, 80, 170)],
    "fence": [(122, 96, 70), (90, 104, 90), (62, 64, 64)], "trunk": [(90, 70, 50), (70, 60, 52)],
    "pole": [(122, 122, 126), (80, 92, 82), (58, 58, 64)], "terrain": [(104, 134, 64), (142, 132, 92)],
    "vegetation": [(62, 102, 42), (42, 78, 36), (88, 118, 50), (54, 88, 62)],
    "car": [(28, 28, 32), (200, 200, 206), (150, 152, 156), (34, 44, 94), (152, 32, 32), (44, 74, 54)],
    "truck": [(210, 210, 210), (182, 44, 34), (44, 74, 142), (230, 200, 64)],
    "bus": [(232, 202, 44), (202, 44, 44), (232, 232, 232), (54, 122, 192)],
    "train": [(202, 44, 44), (232, 232, 226), (240, 202, 44)],
    "frame": [(24, 24, 24), (152, 24, 24), (34, 54, 132), (182, 182, 186)],
    "clothes": [(30, 30, 36), (62, 62, 72), (42, 52, 92), (150, 150, 150), (122, 32, 32), (182, 152, 102)],
    "skin": [(226, 186, 160), (200, 152, 122), (150, 100, 72), (102, 72, 52)],
}
_TYRE, _WHITE = (24, 24, 26), (235, 235, 230)

# Texture amplitude per label id, (blobs, single pixels): leaves and grass busy, asphalt grainy, sky and
# vehicles smooth. A cue beside colour and place, as in photos.
_TEX_LUT = np.full((2, 256), 0.03, dtype=np.float32)
for _label, _amps in {ROAD: (0.06, 0.09), SIDEWALK: (0.05, 0.06), BUILDING: (0.08, 0.04), WALL: (0.1, 0.07),
                      VEGETATION: (0.35, 0.25), TERRAIN: (0.2, 0.15), SKY: (0.04, 0.01)}.items():
    _TEX_LUT[:, _label] = _amps


def _colour(rng: np.random.Generator, palette: str, spread: float = 0.12) -> np.ndarray:
    base = np.asarray(_PALETTES[palette][rng.integers(len(_PALETTES[palette]))], dtype=np.float64)
    return base * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, 6, 3)


def _rgb(colour) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(colour, 0, 255))


def _limb(p0, p1, width: float) -> list[tuple[float, float]]:
    """A quad ``width`` wide along the segment p0 -> p1 (metres, in the plane of a billboard)."""
    (x0, y0), (x1, y1) = p0, p1
    length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1e-9)
    nx, ny = (y0 - y1) / length * width / 2, (x1 - x0) / length * width / 2
    return [(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)]


class _Scene:
    """One street. World X right, Y up, Z forward in metres; the camera at height ``ch`` looks along Z."""

    def __init__(self, width: int, height: int, rng: np.random.Generator):
        self.w, self.h, self.rng = width, height, rng
        r = rng
        self.f = width * r.uniform(0.85, 1.15)  # focal length in pixels
        self.cx, self.hy = width * r.uniform(0.44, 0.56), height * r.uniform(0.36, 0.48)  # vanishing point
        self.ch = r.uniform(1.3, 1.7)
        self.z_bottom = self.f * self.ch / (height - self.hy)  # where the ground leaves the image
        self.z_max = r.uniform(45, 90)  # farthest thing placed on the street
        # Right-hand traffic with the camera in one of the right-hand lanes.
        self.lane_w, self.lanes = r.uniform(2.8, 3.4), int(r.choice([2, 2, 3, 4]))
        self.lane = int(r.integers(self.lanes // 2, self.lanes))
        self.xl = -(self.lane + 0.5) * self.lane_w
        self.xr = self.xl + self.lanes * self.lane_w
        self.walk, self.facade = {}, {}
        for s, edge in ((-1, self.xl), (1, self.xr)):
            inner = edge + s * (r.uniform(1, 2.5) if r.random() < 0.3 else 0.0)  # a grass verge
            self.walk[s] = (inner, inner + s * r.uniform(2, 4.5))
            yard = r.uniform(1, 6) if r.random() < 0.4 else 0.0
            self.facade[s] = self.walk[s][1] + s * yard
        dark = r.uniform(0.6, 0.85)  # the side away from the sun
        self.shade = {-1: dark, 1: 1.0} if r.random() < 0.5 else {-1: 1.0, 1: dark}
        blue = np.array([r.uniform(55, 110), r.uniform(115, 160), r.uniform(185, 240)])
        top = blue if r.random() < 0.6 else np.full(3, r.uniform(140, 200))  # or overcast
        t = np.clip(np.arange(height) / max(self.hy, 1.0), 0, 1)[:, None]
        sky = (top * (1 - t) + np.clip(top + r.uniform(20, 70), 0, 255) * t).astype(np.uint8)
        self.label = Image.new("L", (width, height), SKY)
        self.color = Image.fromarray(np.ascontiguousarray(np.broadcast_to(sky[:, None], (height, width, 3))))
        self.draw_label, self.draw_color = ImageDraw.Draw(self.label), ImageDraw.Draw(self.color)

    # -- projection and painting; label and colour are painted together, so they cannot disagree -------

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        z = max(z, Z_NEAR)
        return self.cx + self.f * x / z, self.hy + self.f * (self.ch - y) / z

    def rect(self, axis: str, at: float, a: Sequence[float], b: Sequence[float]) -> list[tuple[float, float]]:
        """Pixel corners of a rectangle in the plane x, y or z = ``at``; a, b span the other axes in order."""
        corners = ((a[0], b[0]), (a[1], b[0]), (a[1], b[1]), (a[0], b[1]))
        xyz = {"x": lambda u, v: (at, u, v), "y": lambda u, v: (u, at, v), "z": lambda u, v: (u, v, at)}[axis]
        return [self.project(*xyz(u, v)) for u, v in corners]

    def bb(self, x: float, z: float, pts) -> list[tuple[float, float]]:
        """Billboard: points in metres around the ground point (x, 0, z), in a plane facing the camera."""
        return [self.project(x + px, py, z) for px, py in pts]

    def poly(self, pts, label: int | None, rgb) -> None:
        """Fill a polygon; label None paints colour only (marks on something already labelled)."""
        if label is not None:
            self.draw_label.polygon(pts, fill=label)
        self.draw_color.polygon(pts, fill=_rgb(rgb))

    def oval(self, x: float, z: float, centre, rx: float, ry: float, label: int, rgb, rim: int = 0) -> None:
        """An ellipse on a billboard (see bb): radii rx, ry around ``centre``; a ring ``rim`` pixels wide."""
        box = self.bb(x, z, [(centre[0] - rx, centre[1] + ry), (centre[0] + rx, centre[1] - ry)])
        for draw, value in ((self.draw_label, label), (self.draw_color, _rgb(rgb))):
            draw.ellipse(box, fill=None if rim else value, outline=value if rim else None, width=rim)

    def line(self, pts, metres: float, z: float, label: int, rgb) -> None:
        width = max(1, round(self.f * metres / max(z, Z_NEAR)))
        self.draw_label.line(pts, fill=label, width=width)
        self.draw_color.line(pts, fill=_rgb(rgb), width=width)

    def sample_z(self, lo: float | None = None) -> float:
        """A distance along the street where things stand on visible ground, near more often than far."""
        lo = max(self.z_bottom * 0.9, 3.0) if lo is None else lo
        return lo + (max(self.z_max, lo + 1) - lo) * self.rng.random() ** 1.5

    # -- the street -----------------------------------------------------------------------------------------

    def ground(self) -> None:
        """A skyline far away, grass below the horizon, then sidewalks, the road and its lane marks."""
        r, z = self.rng, self.rng.uniform(300, 600)
        for x in np.arange(-self.cx / self.f * z - 20, (self.w - self.cx) / self.f * z, r.uniform(8, 30)):
            self.poly(self.rect("z", z, (x, x + 30), (0, r.uniform(6, 40))), BUILDING, _colour(r, "building"))
        self.poly([(0, self.hy), (self.w, self.hy), (self.w, self.h), (0, self.h)], TERRAIN,
                  _colour(r, "terrain"))
        walk, road = _colour(r, "sidewalk", 0.08), _colour(r, "road", 0.08)
        for s in (-1, 1):
            self.poly(self.rect("y", 0.0, sorted(self.walk[s]), (Z_NEAR, Z_FAR)), SIDEWALK, walk)
        self.poly(self.rect("y", 0.0, (self.xl, self.xr), (Z_NEAR, Z_FAR)), ROAD, road)
        dash, period = r.uniform(2, 5), r.uniform(8, 14)
        for k in range(1, self.lanes):
            xm = self.xl + k * self.lane_w
            for z0 in np.arange(r.uniform(0, period), 150, period):
                self.poly(self.rect("y", 0.0, (xm - 0.07, xm + 0.07), (z0, z0 + dash)), None, road / 3 + 160)

    def sides(self) -> None:
        """Along each side stretches of houses, walls, fences, hedges and gaps, 6 to 30 m long."""
        r = self.rng
        for s, x in self.facade.items():
            far = r.uniform(120, 250)
            ends = np.cumsum([r.uniform(-8, 2), *r.uniform(6, 30, int(far / 6) + 2)])
            for z0, z1 in reversed([(z0, min(z1, far)) for z0, z1 in zip(ends[:-1], ends[1:]) if z0 < far]):
                kind = r.choice(["building", "wall", "fence", "hedge", "gap"], p=[0.5, 0.15, 0.15, 0.1, 0.1])
                if kind == "building":
                    rgb, height = _colour(r, "building"), r.uniform(6, 25)
                    if z0 > Z_NEAR:  # the end wall that faces the camera
                        self.poly(self.rect("z", z0, sorted((x, x + s * 12)), (0, height)), BUILDING,
                                  rgb * 0.8)
                    self.poly(self.rect("x", x, (0, height), (z0, z1)), BUILDING, rgb * self.shade[s])
                elif kind == "wall":
                    rgb, height = _colour(r, "wall") * self.shade[s], r.uniform(0.8, 2.5)
                    self.poly(self.rect("x", x, (0, height), (z0, z1)), WALL, rgb)
                elif kind == "fence":  # pickets or posts, and two rails; what is behind shows between them
                    rgb, height = _colour(r, "fence") * self.shade[s], r.uniform(1.0, 2.0)
                    pitch = r.uniform(0.15, 0.3) if r.random() < 0.6 else r.uniform(1.5, 2.5)
                    for z in np.arange(max(z0, Z_NEAR) + 0.05, z1, pitch):
                        self.poly(self.rect("x", x, (0, height), (z, z + min(pitch / 2, 0.12))), FENCE, rgb)
                    for y in (height * 0.3, height * 0.85):
                        self.poly(self.rect("x", x, (y, y + 0.1), (z0, z1)), FENCE, rgb * 0.9)
                elif kind == "hedge":
                    self.poly(self.rect("x", x, (0, r.uniform(0.8, 2.2)), (z0, z1)), VEGETATION,
                              _colour(r, "vegetation") * self.shade[s])

    # -- things on and along the street ---------------------------------------------------------------

    def things(self) -> None:
        """Pick everything with its distance, then paint far to near so near things hide far ones."""
        r, items = self.rng, []

        def add(z: float, draw, *args) -> None:
            items.append((-z, len(items), draw, (*args, z)))

        for s in (-1, 1):
            inner, outer = self.walk[s]
            if r.random() < 0.5:  # a row of street trees by the curb
                for z in np.arange(r.uniform(2, 8), self.z_max, r.uniform(7, 14)):
                    add(z, self._tree, inner + s * 0.8)
            if r.random() < 0.7:
                for z in np.arange(r.uniform(3, 15), self.z_max, r.uniform(20, 35)):
                    add(z, self._street_light, inner + s * 0.4, s)
            for _ in range(r.poisson(1.2)):
                add(self.sample_z(), self._sign_post, inner + s * 0.5)
            for _ in range(r.poisson(3.0)):
                add(self.sample_z(), self._person, r.uniform(*sorted((inner, outer))))
            for _ in range(r.poisson(0.5)):  # a parked bicycle
                add(self.sample_z(), self._two_wheeler, inner + s * r.uniform(0.4, 1.2), False, False)
        if r.random() < 0.6:  # a junction with traffic lights on both sides
            z = r.uniform(max(self.z_bottom, 8), 40)
            for s in (-1, 1):
                add(z, self._traffic_light, self.walk[s][0] + s * 0.4)
        rare = {"truck": 0.4, "bus": 0.35, "train": 0.3, "motorcycle": 0.45, "cyclist": 0.4}
        kinds = ["car"] * (2 + r.poisson(2)) + [kind for kind, p in rare.items() if r.random() < p]
        for kind in kinds:
            lane = int(r.integers(self.lanes))
            xc = self.xl + (lane + 0.5) * self.lane_w + r.normal(0, 0.2)
            z = self.sample_z(max(self.z_bottom, 4.0) + (6 if lane == self.lane else 0))  # a gap ahead of us
            if kind in ("motorcycle", "cyclist"):
                add(z, self._two_wheeler, xc, kind == "motorcycle", True)
            else:
                add(z, self._vehicle, xc, kind)
        for _, _, draw, args in sorted(items, key=lambda item: item[:2]):
            draw(*args)

    def _box(self, x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, label: int, rgb) -> None:
        """The faces of a box that the camera sees: the top when below the camera, one side, the near end."""
        if y1 < self.ch:
            self.poly(self.rect("y", y1, (x0, x1), (z0, z1)), label, rgb * 1.1)
        if x0 > 0 or x1 < 0:
            self.poly(self.rect("x", x0 if x0 > 0 else x1, (y0, y1), (z0, z1)), label, rgb * 0.75)
        self.poly(self.rect("z", z0, (x0, x1), (y0, y1)), label, rgb)

    def _vehicle(self, xc: float, kind: str, z: float) -> None:
        """A car (body and glass cabin), or a truck, bus or tram (a tall box with windows), on wheels."""
        r = self.rng
        label = {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}[kind]
        width, length, height = {"car": (r.uniform(1.7, 1.9), r.uniform(3.9, 4.7), r.uniform(0.85, 1.0)),
                                 "truck": (2.4, r.uniform(7, 10), r.uniform(2.8, 3.6)),
                                 "bus": (2.55, 12.0, r.uniform(3.0, 3.3)),
                                 "train": (2.6, r.uniform(20, 30), r.uniform(3.3, 3.6))}[kind]
        x0, x1, glass = xc - width / 2, xc + width / 2, _colour(r, "glass")
        side = x0 if x0 > 0 else x1 if x1 < 0 else None  # the long side the camera sees
        self._box(x0, x1, 0.3, height, z, z + length, label, _colour(r, kind, 0.08))
        if kind == "car":
            self._box(x0 + 0.12, x1 - 0.12, height, height + r.uniform(0.45, 0.65), z + 0.25 * length,
                      z + 0.8 * length, label, glass)
        else:  # a windscreen (a truck's small and high up), and a band of side windows on buses and trams
            low = height - (0.9 if kind == "truck" else 2.0)
            self.poly(self.rect("z", z, (x0 + 0.15, x1 - 0.15), (low, height - 0.3)), label, glass)
            if side is not None and kind != "truck":
                self.poly(self.rect("x", side, (1.2, height - 0.5), (z + 0.5, z + length - 0.5)), label,
                          glass)
        wheel = 0.32 if kind == "car" else 0.5
        for zc in (z + 0.18 * length, z + 0.82 * length) if side is not None else ():
            self.poly(self.rect("x", side, (0, 1.8 * wheel), (zc - wheel, zc + wheel)), label, _TYRE)
        for xa in (x0, x1 - 0.3):
            self.poly(self.rect("z", z - 0.01, (xa, xa + 0.3), (0, 0.35)), label, _TYRE)

    def _figure(self, x: float, z: float, label: int, hip, shoulder, head, stride: float) -> None:
        """A person from the side: legs, torso, an arm and the head (metres from the ground point)."""
        r = self.rng
        trousers, top, skin = _colour(r, "clothes"), _colour(r, "clothes"), _colour(r, "skin", 0.05)
        size = shoulder[1] - hip[1]
        for dx in (-stride, stride) if label == PERSON else (stride,):  # a rider's near leg, to the pedal
            foot = (hip[0] + dx, 0.02 if label == PERSON else 0.3)
            self.poly(self.bb(x, z, _limb(hip, foot, 0.32 * size)), label, trousers)
        self.poly(self.bb(x, z, _limb(hip, shoulder, 0.6 * size)), label, top)
        hand = (shoulder[0] + stride, shoulder[1] - 0.9 * size)
        self.poly(self.bb(x, z, _limb(shoulder, hand, 0.2 * size)), label, top * 0.85)
        self.oval(x, z, head, 0.2 * size, 0.25 * size, label, skin)

    def _person(self, x: float, z: float) -> None:
        h = self.rng.uniform(1.55, 1.9) if self.rng.random() > 0.1 else self.rng.uniform(1.0, 1.3)  # child
        self._figure(x, z, PERSON, (0, 0.5 * h), (0, 0.8 * h), (0, 0.88 * h), self.rng.uniform(0, 0.15) * h)

    def _two_wheeler(self, x: float, motor: bool, ridden: bool, z: float) -> None:
        """A bicycle or motorbike from the side, with its rider or parked."""
        r = self.rng
        d = float(r.choice([-1, 1]))  # the way it faces
        label, frame = (MOTORCYCLE if motor else BICYCLE), _colour(r, "frame")
        rim = 0 if motor else max(1, round(self.f * 0.05 / z))  # a bicycle's tyres are rings
        for wx in (-0.55, 0.55):
            self.oval(x, z, (wx, 0.33), 0.33, 0.33, label, _TYRE, rim)
        if motor:
            self.poly(self.bb(x, z, [(-0.6 * d, 0.5), (0.5 * d, 0.5), (0.35 * d, 0.95), (-0.45 * d, 0.85)]),
                      label, frame)
        else:
            seat, head, crank = (-0.15 * d, 0.9), (0.38 * d, 0.85), (0.0, 0.3)
            for a, b in (((-0.55 * d, 0.34), seat), (seat, crank), (crank, head), (seat, head),
                         (head, (0.55 * d, 0.34))):
                self.line(self.bb(x, z, [a, b]), 0.035, z, label, frame)
        if ridden:
            self._figure(x, z, RIDER, (-0.15 * d, 0.98), (0.1 * d, 1.5), (0.16 * d, 1.64), 0.28 * d)

    def _tree(self, x: float, z: float) -> None:
        r = self.rng
        trunk, crown, green = r.uniform(1.8, 3.2), r.uniform(1.5, 3.2), _colour(r, "vegetation")
        self.poly(self.bb(x, z, _limb((0, 0), (0, trunk + 1), 0.25)), VEGETATION, _colour(r, "trunk"))
        for _ in range(int(r.integers(3, 7))):
            rad, centre = crown * r.uniform(0.45, 0.8), crown * r.normal((0, 0.8), (0.4, 0.3)) + (0, trunk)
            self.oval(x, z, centre, rad, rad * 0.9, VEGETATION, green * r.uniform(0.75, 1.2))

    def _pole(self, x: float, z: float, height: float, width: float) -> None:
        self.poly(self.bb(x, z, _limb((0, 0), (0, height), width)), POLE, _colour(self.rng, "pole"))

    def _street_light(self, x: float, s: int, z: float) -> None:
        r = self.rng
        height, arm, rgb = r.uniform(5.5, 9), -s * r.uniform(0.8, 2.5), _colour(r, "pole")
        self._pole(x, z, height, r.uniform(0.14, 0.25))
        self.line(self.bb(x, z, [(0, height - 0.2), (arm * 0.7, height + 0.2), (arm, height + 0.1)]), 0.12, z,
                  POLE, rgb)

    def _sign_post(self, x: float, z: float) -> None:
        """A post with a round or triangular sign: a coloured shape, often on white."""
        r = self.rng
        height, half = r.uniform(2.3, 3.2), r.uniform(0.25, 0.42)
        self._pole(x, z, height, 0.08)
        cy, rgb, z = height - half, _colour(r, "sign", 0.05), z - 0.05
        if r.random() < 0.6:
            self.oval(x, z, (0, cy), half, half, SIGN, rgb)
            self.oval(x, z, (0, cy), half * 0.7, half * 0.7, SIGN, _WHITE if r.random() < 0.6 else rgb)
        else:
            pts = [(-half, cy - half * 0.8), (half, cy - half * 0.8), (0, cy + half)]
            self.poly(self.bb(x, z, pts), SIGN, rgb)
            self.poly(self.bb(x, z, [(px * 0.6, cy + (py - cy) * 0.6) for px, py in pts]), SIGN, _WHITE)

    def _traffic_light(self, x: float, z: float) -> None:
        """A pole with a head of three lamps, one of them lit."""
        r = self.rng
        y0, lit = r.uniform(2.2, 3.0), int(r.integers(3))
        self._pole(x, z, y0 + 1.2, r.uniform(0.1, 0.16))
        body = (35, 35, 35) if r.random() < 0.7 else (200, 170, 40)
        self.poly(self.bb(x, z - 0.1, _limb((0, y0), (0, y0 + 0.95), 0.36)), LIGHT, body)
        for k, lamp in enumerate(((230, 40, 30), (240, 180, 30), (60, 220, 90))):
            self.oval(x, z - 0.1, (0, y0 + 0.95 * (5 - 2 * k) / 6), 0.11, 0.11, LIGHT,
                      np.array(lamp) * (1.0 if k == lit else 0.3))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Texture and sensor noise as one multiplicative field per pixel, and this photo's exposure."""
        r, h, w = self.rng, self.h, self.w
        label = np.asarray(self.label)
        cell = max(h / 60, 1.5)
        grid = r.standard_normal((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
        mod = np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.Resampling.BILINEAR)) * _TEX_LUT[0][label]
        # Uniform noise in [-1, 1] from raw bytes: several times cheaper than normals at 2048x1024.
        fine = np.frombuffer(r.bytes(h * w), dtype=np.uint8).reshape(h, w).astype(np.float32) / 128 - 1
        mod += fine * (_TEX_LUT[1].take(label) + np.float32(r.uniform(0.02, 0.05)))
        mod += np.float32(r.uniform(0.8, 1.2))
        img = np.asarray(self.color, dtype=np.float32) * mod[..., None]
        return np.clip(img, 0, 255).astype(np.uint8), label.copy()


def render(width: int, height: int, seed: int = 0, split: str = "train", index: int = 0):
    """One scene: (RGB uint8 H×W×3, Cityscapes label ids uint8 H×W), a pure function of the arguments."""
    scene = _Scene(width, height, np.random.default_rng([seed, SPLITS.index(split), index]))
    for part in (scene.ground, scene.sides, scene.things):  # back to front
        part()
    return scene.finish()


# ------------------------------------------------------------------------------------------------------------
# Files on disk.


def sample_stem(split: str, index: int) -> tuple[str, str]:
    """(city, "<city>_<seq>_<frame>") of image ``index``; cities take turns, so adding images renames none."""
    city = CITIES[split][index % len(CITIES[split])]
    return city, f"{city}_{index // len(CITIES[split]):06d}_{FRAME:06d}"


def _save_png(array: np.ndarray, path: Path, compress_level: int) -> None:
    # A name no "*_leftImg8bit.png" glob matches, then a rename: a killed run leaves no half-written image.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)
    os.replace(tmp, path)


def _write_sample(root: Path, split: str, index: int, params: dict) -> None:
    city, stem = sample_stem(split, index)
    kinds = ("labelIds", "labelTrainIds") if params["train_ids"] else ("labelIds",)
    paths = [root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"]
    paths += [root / "gtFine" / split / city / f"{stem}_gtFine_{kind}.png" for kind in kinds]
    if all(p.exists() for p in paths):  # written before an interruption
        return
    rgb, label = render(params["width"], params["height"], params["seed"], split, index)
    # Noisy photos barely compress: level 1 is several times faster than the default for the same size.
    for path, array, level in zip(paths, (rgb, label, ID_TO_TRAIN_ID[label]), (1, 6, 6)):
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(array, path, level)


def _whole(flag: str, value, lo: int, hi: int | None = None) -> int:
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < lo or (hi is not None and value > hi):
        bounds = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise UserError(f"{flag}: must be a whole number {bounds}, got {value!r}")
    return int(value)


def _read_marker(root: Path) -> dict | None:
    """The marker of the synthetic dataset in ``root``; None if ``root`` is new or empty, else a UserError."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a directory; choose a new or empty directory")
    if not root.is_dir() or all(e.startswith(f".{MARKER}.tmp") for e in os.listdir(root)):
        return None  # a marker half-written by a killed run does not make the directory foreign
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or "params" not in marker:
        raise UserError(f"{root}: not empty and not a synthetic dataset (no valid {MARKER}); choose a new or "
                        "empty directory, the generator does not write over other files")
    return marker


def _write_marker(root: Path, params: dict, complete: bool) -> None:
    tmp = root / f".{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"version": VERSION, "params": params, "complete": complete}, indent=2) + "\n")
    os.replace(tmp, root / MARKER)


def generate(out_dir: str | os.PathLike, train: int = 20, val: int = 10, width: int = 1024, height: int = 512,
             seed: int = 0, train_ids: bool = False) -> Path:
    """Write a synthetic dataset to ``out_dir`` (see the module docstring) and return its path.

    A UserError refuses a directory holding anything else, or a dataset of other parameters or version.
    """
    params = {"train": _whole("--train", train, 0), "val": _whole("--val", val, 0),
              "width": _whole("--width", width, MIN_SIZE, MAX_SIZE),
              "height": _whole("--height", height, MIN_SIZE, MAX_SIZE), "seed": _whole("--seed", seed, 0),
              "train_ids": bool(train_ids)}
    if params["train"] + params["val"] == 0:
        raise UserError("--train/--val: both are 0; ask for at least one image")
    root = Path(out_dir)
    marker = _read_marker(root)
    if marker is not None and (marker["params"], marker.get("version")) != (params, VERSION):
        raise UserError(f"{root}: holds a synthetic dataset made with other parameters or by another version "
                        f"({marker['params']}, version {marker.get('version')}); delete it or choose another "
                        "directory")
    if marker is not None and marker.get("complete"):
        return root  # nothing to write, so a read-only copy works too
    root.mkdir(parents=True, exist_ok=True)
    _write_marker(root, params, complete=False)
    for tmp in root.rglob(".*.tmp-*"):  # left by a killed run
        tmp.unlink()
    for split in SPLITS:
        for i in range(params[split]):
            _write_sample(root, split, i, params)
    _write_marker(root, params, complete=True)
    return root


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message)  # one line like every other mistake (run_cli prints it), not the usage block


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python tools/synthetic.py", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output directory: new, empty, or a dataset to finish")
    parser.add_argument("--train", type=int, default=20, help="training images (default 20)")
    parser.add_argument("--val", type=int, default=10, help="validation images (default 10)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    parser.add_argument("--height", type=int, default=512, help="image height in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--train-ids", action="store_true", help="also write *_gtFine_labelTrainIds.png")
    args = parser.parse_args(argv)
    root = generate(args.out, args.train, args.val, args.width, args.height, args.seed, args.train_ids)
    print(f"synthetic Cityscapes ({args.train} train, {args.val} val, {args.width}x{args.height}) at {root}")
    return 0


if __name__ == "__main__":
    run_cli(main)
