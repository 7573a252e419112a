"""Occlusion synthesis on 128x128 faces: what hides part of the face before it is downsampled.

Kinds:
  random_walk         the paper's blob: a brush random-walks until it covers the target, filled with colour noise
  rectangle           a solid rectangle of a random colour and aspect
  textured_rectangle  a rectangle filled with stripes, checks or blocky noise
  sunglasses          two dark lenses over the eyes, bridge and temples (needs landmarks)
  mask                a face mask over nose, mouth and chin (needs landmarks)
  hand                a palm with fingers and thumb laid over the eyes, mouth or a cheek (needs landmarks)
  strokes             irregular thick strokes
Every kind hits a target coverage drawn from ``coverage`` (fraction of the image hidden): the scalable
shapes by a bisection on their size, the walk and strokes by growing until they reach it.  Given the same
seed (or Generator state) the result is identical.  Everything is numpy + Pillow's rasteriser.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from prouigan.ibug import LEFT_EYE, MOUTH, RIGHT_EYE
from prouigan.vocabulary import NEEDS_LANDMARKS, OCCLUSION_KINDS, check_kinds

KINDS, NEEDS_LANDMARKS = OCCLUSION_KINDS, set(NEEDS_LANDMARKS)
SKIN = np.array([(255, 224, 196), (241, 194, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36)]) / 255.0
MASK_COLOURS = ((0.95, 0.95, 0.95), (0.55, 0.75, 0.9), (0.1, 0.1, 0.12))  # white, surgical blue, black


@dataclass
class Occlusion:
    kind: str
    mask: np.ndarray  # (H, W) float32 in {0, 1}: 1 where the face is hidden
    fill: np.ndarray  # (H, W, 3) float32 in [0, 1]: what hides it
    target: float  # the coverage asked for

    @property
    def coverage(self) -> float:
        return float(self.mask.mean())

    def apply(self, img: np.ndarray) -> np.ndarray:
        """(H, W, 3) float image in [0, 1] -> the occluded image."""
        m = self.mask[..., None]
        return img * (1 - m) + self.fill * m


def seed_from_key(key: str, salt: str = "occlusion") -> int:
    """A stable 63-bit seed for a sample key (val/test occlusions are identical across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "little") >> 1


def _raster(draw_fn, size: int) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(im))
    return np.asarray(im) > 127


def _bisect(draw_at, target: float, lo: float, hi: float, size: int, iters: int = 9) -> np.ndarray:
    """The mask of draw_at(scale) whose coverage is closest to target, scale bisected in [lo, hi]."""
    best, best_err = None, np.inf
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        m = _raster(lambda d: draw_at(d, mid), size)  # noqa: B023 (called at once)
        cov = m.mean()
        if abs(cov - target) < best_err:
            best, best_err = m, abs(cov - target)
        if cov < target:
            lo = mid
        else:
            hi = mid
    return best


def _ellipse_poly(c, rx, ry, angle, n=28):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [tuple(p) for p in pts @ rot.T + c]


def _capsule(d: ImageDraw.ImageDraw, a, b, width: float) -> None:
    d.line([tuple(a), tuple(b)], fill=255, width=max(1, int(round(width))))
    r = width / 2
    for p in (a, b):
        d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=255)


# ---- fills -----------------------------------------------------------------------------------------------

def _noise_fill(rng, size):
    return rng.random((size, size, 3), dtype=np.float32)


def _solid_fill(rng, size, colour=None):
    c = rng.random(3) if colour is None else np.asarray(colour)
    return np.broadcast_to(c.astype(np.float32), (size, size, 3)).copy()


def _texture_fill(rng, size):
    c0, c1 = rng.random(3), rng.random(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # stripes
        a, f = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
        t = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * f) > 0).astype(np.float32)
    elif kind == 1:  # checks
        s = int(rng.integers(4, 16))
        t = (((xx // s) + (yy // s)) % 2).astype(np.float32)
    else:  # blocky noise
        s = int(rng.integers(4, 12))
        small = rng.random((size // s + 1, size // s + 1)).astype(np.float32)
        t = np.kron(small, np.ones((s, s), np.float32))[:size, :size]
    return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)


def _shaded_fill(rng, size, base):
    yy = np.linspace(-1, 1, size, dtype=np.float32)[:, None, None]
    grad = 1 + rng.uniform(-0.25, 0.25) * yy
    noise = rng.normal(0, 0.02, (size, size, 1)).astype(np.float32)
    return np.clip(np.asarray(base, np.float32) * grad + noise, 0, 1).astype(np.float32)


# ---- shapes ----------------------------------------------------------------------------------------------

def _rectangle(rng, target, size):
    area = target * size * size
    aspect = rng.uniform(0.5, 2.0)
    w = int(round(min(size, np.sqrt(area * aspect))))
    h = int(round(min(size, area / max(w, 1))))
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    m = np.zeros((size, size), bool)
    m[y:y + h, x:x + w] = True
    return m


def _random_walk(rng, target, size):
    m = np.zeros((size, size), bool)
    if target <= 0:
        return m
    r = rng.uniform(3, 6)
    oy, ox = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
    keep = oy ** 2 + ox ** 2 <= r * r
    oy, ox = oy[keep], ox[keep]
    pos = rng.uniform(0.3, 0.7, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    goal = target * size * size
    for _ in range(400):  # chunks of 16 brush steps, until the blob covers the target
        heading = heading + np.cumsum(rng.normal(0, 0.6, 16))
        steps = np.stack([np.cos(heading), np.sin(heading)], 1) * r * 0.6
        path = pos + np.cumsum(steps, 0)
        # reflect at the border so the walk stays on the face
        path = np.abs(path)
        path = np.where(path > size - 1, 2 * (size - 1) - path, path)
        pos, heading = path[-1], heading[-1]
        ys = np.clip(path[:, 1].round().astype(int)[:, None] + oy[None], 0, size - 1)
        xs = np.clip(path[:, 0].round().astype(int)[:, None] + ox[None], 0, size - 1)
        m[ys, xs] = True
        if m.sum() >= goal:
            break
    return m


def _strokes(rng, target, size):
    m = np.zeros((size, size), bool)
    goal = target * size * size
    for _ in range(64):
        if m.sum() >= goal:
            break
        n = int(rng.integers(3, 7))
        p = rng.uniform(0, size, 2)
        pts = [p]
        for _ in range(n - 1):
            p = np.clip(p + rng.normal(0, size * 0.18, 2), 0, size - 1)
            pts.append(p)
        width = rng.uniform(4, 14)
        for _ in range(4):  # shrink the last stroke if it would overshoot the target by much
            stroke = _raster(lambda d: d.line([tuple(q) for q in pts], fill=255, width=int(width), joint="curve"),  # noqa: B023
                             size)
            if (m | stroke).sum() <= goal * 1.08 + 16 or width <= 2:
                break
            width /= 2
        m |= stroke
    return m


def _eye_frame(lm):
    cl, cr = lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0)
    axis = cr - cl
    d = np.linalg.norm(axis) + 1e-6
    return cl, cr, axis / d, d


def _sunglasses(rng, target, size, lm):
    cl, cr, u, d = _eye_frame(lm)
    ang = np.arctan2(u[1], u[0])
    shape = rng.uniform(0.7, 1.0)

    def draw(dr, s):
        rx, ry = 0.34 * d * s, 0.27 * d * s * shape
        dr.polygon(_ellipse_poly(cl, rx, ry, ang), fill=255)
        dr.polygon(_ellipse_poly(cr, rx, ry, ang), fill=255)
        dr.line([tuple(cl + u * rx * 0.8), tuple(cr - u * rx * 0.8)], fill=255, width=max(1, int(0.05 * d * s)))
        for c, sgn in ((cl, -1), (cr, 1)):
            dr.line([tuple(c + sgn * u * rx), tuple(c + sgn * u * (rx + 0.8 * d))], fill=255,
                    width=max(1, int(0.05 * d * s)))

    return _bisect(draw, target, 0.2, 6.0, size)


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone chain; (N, 2) -> hull vertices in order."""
    pts = sorted(map(tuple, np.asarray(points, np.float64)))

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _face_mask(rng, target, size, lm):
    centre = lm[MOUTH].mean(0)
    width = lm[14] - lm[2]
    nose = lm[29]
    # lower jaw, the nose bridge band, and the mouth with a margin: the mask always covers the mouth
    base = np.concatenate([lm[2:15], [nose + width * 0.25, nose - width * 0.25], centre + (lm[48:60] - centre) * 1.3])
    hull = _convex_hull(base)

    def draw(dr, s):
        dr.polygon([tuple(p) for p in centre + (hull - centre) * s], fill=255)

    return _bisect(draw, target, 0.2, 4.0, size)


def _hand(rng, target, size, lm):
    anchors = [lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0), lm[MOUTH].mean(0), lm[3], lm[13], lm[30]]
    c = anchors[int(rng.integers(len(anchors)))] + rng.normal(0, 4, 2)
    a = rng.uniform(0, 2 * np.pi)
    u, v = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    spread = rng.uniform(0.8, 1.2)

    def draw(dr, s):
        palm_r = 14 * s
        dr.polygon(_ellipse_poly(c, palm_r, palm_r * 0.85, a), fill=255)
        for i, off in enumerate((-0.75, -0.25, 0.25, 0.75)):  # four fingers
            base = c + u * palm_r * 0.7 + v * off * palm_r * spread
            length = palm_r * (1.1 if i in (1, 2) else 0.9)
            _capsule(dr, base, base + u * length, palm_r * 0.42)
        base = c - v * palm_r * 0.9  # thumb
        _capsule(dr, base, base + (u * 0.5 - v * 0.9) * palm_r * 0.9, palm_r * 0.45)

    return _bisect(draw, target, 0.05, 8.0, size)


def _draw_mask(rng, target, size, lm):
    base = MASK_COLOURS[int(rng.integers(len(MASK_COLOURS)))]
    return _face_mask(rng, target, size, lm), _shaded_fill(rng, size, base)


def _draw_hand(rng, target, size, lm):
    m = _hand(rng, target, size, lm)
    return m, _shaded_fill(rng, size, SKIN[int(rng.integers(len(SKIN)))])


def _draw_sunglasses(rng, target, size, lm):
    m = _sunglasses(rng, target, size, lm)
    return m, _shaded_fill(rng, size, rng.uniform(0.0, 0.15, 3))


# kind -> (rng, target coverage, size, landmarks or None) -> (mask, fill): each kind of the vocabulary drawn once,
# in the order its random numbers are taken (seeded val/test occlusions stay the same on every run)
DRAW = {
    "rectangle": lambda rng, t, size, lm: (_rectangle(rng, t, size), _solid_fill(rng, size)),
    "textured_rectangle": lambda rng, t, size, lm: (_rectangle(rng, t, size), _texture_fill(rng, size)),
    "random_walk": lambda rng, t, size, lm: (_random_walk(rng, t, size), _noise_fill(rng, size)),
    "strokes": lambda rng, t, size, lm: (_strokes(rng, t, size), _solid_fill(rng, size)),
    "sunglasses": _draw_sunglasses,
    "mask": _draw_mask,
    "hand": _draw_hand,
}
check_kinds(DRAW, __name__)


def synthesize(rng: np.random.Generator | int, landmarks: np.ndarray | None = None,
               kinds: tuple[str, ...] | list[str] = KINDS, coverage: tuple[float, float] = (0.1, 0.35),
               size: int = 128) -> Occlusion:
    """One random occlusion for a size x size face.  ``landmarks`` (68, 2) enable the face-aware kinds;
    without them those kinds are not drawn."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown occlusion kind(s) {unknown}; known: {', '.join(KINDS)}")
    usable = [k for k in kinds if landmarks is not None or k not in NEEDS_LANDMARKS]
    if not usable:
        raise ValueError(f"occlusion kinds {list(kinds)} all need landmarks, and none were given")
    kind = usable[int(rng.integers(len(usable)))]
    target = float(rng.uniform(*coverage))
    lm = None if landmarks is None else np.asarray(landmarks, np.float64)
    m, fill = DRAW[kind](rng, target, size, lm)
    return Occlusion(kind, m.astype(np.float32), fill, target)
