"""Procedural faces with known iBUG-68 landmarks, for demos and tests where no real faces are available.

Deterministic given a seed.  Each face varies in head shape, skin tone, hair, eyes, brows, nose, mouth,
background, pose (roll, yaw, scale, position) and expression (mouth open, smile, brows raised).  They are
cartoons: good enough to exercise every pipeline and to check geometry, not to judge model quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _template() -> np.ndarray:
    """(68, 2) mean-ish iBUG-68 shape; x right, y down; unit = half the jaw width."""
    pts = np.zeros((68, 2))
    th = np.pi * (1 - np.arange(17) / 16)
    pts[0:17] = np.stack([np.cos(th), -0.15 + 1.25 * np.sin(th)], 1)
    bx = np.linspace(-0.85, -0.15, 5)
    pts[17:22] = np.stack([bx, -0.55 - 0.12 * np.sin(np.linspace(0.3, np.pi - 0.3, 5))], 1)
    pts[22:27] = np.stack([-bx[::-1], pts[17:22, 1][::-1]], 1)
    pts[27:31] = np.stack([np.zeros(4), np.linspace(-0.33, 0.22, 4)], 1)
    pts[31:36] = [[-0.2, 0.33], [-0.1, 0.37], [0, 0.39], [0.1, 0.37], [0.2, 0.33]]
    w, h = 0.36, 0.13
    for start, cx in ((36, -0.42), (42, 0.42)):
        cy = -0.25
        left, right = cx - w / 2, cx + w / 2
        pts[start:start + 6] = [
            [left, cy], [cx - w / 6, cy - h / 2], [cx + w / 6, cy - h / 2],
            [right, cy], [cx + w / 6, cy + h / 2], [cx - w / 6, cy + h / 2],
        ]
    pts[48:60] = [[-0.38, 0.65], [-0.25, 0.58], [-0.1, 0.55], [0, 0.57], [0.1, 0.55], [0.25, 0.58],
                  [0.38, 0.65], [0.25, 0.75], [0.1, 0.79], [0, 0.8], [-0.1, 0.79], [-0.25, 0.75]]
    pts[60:68] = [[-0.3, 0.65], [-0.1, 0.625], [0, 0.625], [0.1, 0.625], [0.3, 0.65],
                  [0.1, 0.675], [0, 0.68], [-0.1, 0.675]]
    return pts


TEMPLATE = _template()
# how far each point stands out of the face plane (for yaw): nose forward, jaw back
_DEPTH = np.zeros(68)
_DEPTH[27:36] = [0.15, 0.25, 0.35, 0.45, 0.25, 0.3, 0.32, 0.3, 0.25]
_DEPTH[0:17] = -0.35 * np.abs(np.cos(np.pi * (1 - np.arange(17) / 16)))

SKIN = [(255, 224, 196), (241, 194, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36), (96, 60, 35)]
HAIR = [(20, 15, 10), (60, 40, 25), (110, 75, 40), (180, 140, 80), (200, 190, 170), (120, 30, 20)]


def _shape(rng: np.random.Generator) -> np.ndarray:
    p = TEMPLATE.copy()
    # head shape: width/height of the jaw, chin
    p[0:17, 0] *= rng.uniform(0.9, 1.1)
    p[0:17, 1] = -0.15 + (p[0:17, 1] + 0.15) * rng.uniform(0.9, 1.15)
    # expression
    open_ = rng.uniform(0, 0.12) if rng.random() < 0.5 else 0.0
    p[[55, 56, 57, 58, 59, 65, 66, 67], 1] += open_
    smile = rng.uniform(-0.03, 0.08)
    p[[48, 60], :] += [-smile, -smile]
    p[[54, 64], :] += [smile, -smile]
    p[17:27, 1] -= rng.uniform(0, 0.08)
    # feature sizes
    for sl in (slice(36, 42), slice(42, 48)):
        c = p[sl].mean(0)
        p[sl] = c + (p[sl] - c) * rng.uniform(0.85, 1.15)
    c = p[48:68].mean(0)
    p[48:68] = c + (p[48:68] - c) * [rng.uniform(0.85, 1.2), 1.0]
    return p


def _pose(p: np.ndarray, rng: np.random.Generator, center: np.ndarray, scale: float) -> np.ndarray:
    yaw = rng.uniform(-0.45, 0.45)
    x = p[:, 0] * np.cos(yaw) + _DEPTH * np.sin(yaw)
    q = np.stack([x, p[:, 1]], 1)
    roll = rng.uniform(-0.25, 0.25)
    rot = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
    return q @ rot.T * scale + center


def _poly(points: np.ndarray) -> list[tuple[float, float]]:
    return [tuple(map(float, xy)) for xy in points]


def synthetic_face(seed: int) -> tuple[Image.Image, np.ndarray]:
    """One face: (RGB image of a loose crop, (68, 2) float landmarks in its pixels)."""
    rng = np.random.default_rng(seed)
    W, H = int(rng.integers(300, 420)), int(rng.integers(300, 420))
    scale = rng.uniform(75, 105)  # half the jaw width, pixels
    center = np.array([W / 2, H / 2]) + rng.uniform(-0.12, 0.12, 2) * [W, H]
    shape = _shape(rng)
    lm = _pose(shape, rng, center, scale)
    unit = lambda v: v * scale  # noqa: E731

    # background: a vertical gradient of two random colours
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, H)[:, None, None]
    bg = (c0 * (1 - t) + c1 * t) * np.ones((1, W, 1))
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # background clutter
        x, y, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(10, 60)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))

    skin = np.array(SKIN[int(rng.integers(len(SKIN)))]) + rng.integers(-12, 13, 3)
    skin_t = tuple(int(v) for v in np.clip(skin, 0, 255))
    hair = tuple(int(v) for v in HAIR[int(rng.integers(len(HAIR)))])
    jaw = lm[0:17]
    top_c = (lm[0] + lm[16]) / 2
    up = (lm[27] - lm[8]) / np.linalg.norm(lm[27] - lm[8])
    side = (lm[16] - lm[0]) / 2
    arc = np.array([top_c + side * np.cos(a) + up * np.linalg.norm(side) * 1.25 * np.sin(a)
                    for a in np.linspace(0, np.pi, 15)])
    # hair mass behind the head, neck, head
    hair_arc = top_c + (arc - top_c) * rng.uniform(1.1, 1.3)
    d.polygon(_poly(np.concatenate([hair_arc, jaw[::-1][:4] + (jaw[::-1][:4] - top_c) * 0.1,
                                    jaw[:4] + (jaw[:4] - top_c) * 0.1])), fill=hair)
    neck_w = unit(0.45)
    d.polygon(_poly([lm[5] + [0, 0], lm[11], lm[11] + up * -unit(1.2) + [neck_w * 0.3, 0],
                     lm[5] + up * -unit(1.2) - [neck_w * 0.3, 0]]), fill=tuple(int(v * 0.85) for v in skin_t))
    d.polygon(_poly(np.concatenate([jaw, arc])), fill=skin_t)
    # fringe
    if rng.random() < 0.6:
        f = arc[3:12]
        d.polygon(_poly(np.concatenate([f, f[::-1] - up * unit(rng.uniform(0.1, 0.35))])), fill=hair)
    # cheeks
    for i in (2, 14):
        cx, cy = (lm[i] * 0.6 + lm[30] * 0.4)
        r = unit(0.18)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(min(255, v * 1.0 + (12 if k == 0 else -6)))
                                                             for k, v in enumerate(skin_t)))
    # brows
    brow_w = max(2, int(unit(rng.uniform(0.05, 0.1))))
    brow_c = tuple(int(v * 0.8) for v in hair)
    d.line(_poly(lm[17:22]), fill=brow_c, width=brow_w, joint="curve")
    d.line(_poly(lm[22:27]), fill=brow_c, width=brow_w, joint="curve")
    # eyes: white, iris, pupil, upper lid line
    iris_c = tuple(int(v) for v in rng.integers(20, 160, 3))
    for s in (slice(36, 42), slice(42, 48)):
        e = lm[s]
        d.polygon(_poly(e), fill=(245, 245, 240))
        c = e.mean(0) + [rng.uniform(-0.2, 0.2) * (e[3, 0] - e[0, 0]) / 2, 0]
        r = max(1.5, np.linalg.norm(e[1] - e[5]) * 0.5)
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=iris_c)
        r2 = r * 0.45
        d.ellipse([c[0] - r2, c[1] - r2, c[0] + r2, c[1] + r2], fill=(10, 10, 10))
        d.line(_poly(e[[0, 1, 2, 3]]), fill=(40, 30, 30), width=max(1, int(unit(0.03))))
    # nose
    shade = tuple(int(v * 0.8) for v in skin_t)
    d.line(_poly(lm[27:31]), fill=shade, width=max(1, int(unit(0.04))))
    d.line(_poly(lm[31:36]), fill=shade, width=max(1, int(unit(0.04))))
    for i in (32, 34):
        r = unit(0.035)
        d.ellipse([lm[i, 0] - r, lm[i, 1] - r * 0.6, lm[i, 0] + r, lm[i, 1] + r * 0.6], fill=(60, 30, 30))
    # mouth
    lip = tuple(int(v) for v in np.clip(np.array(skin_t) * [0.85, 0.5, 0.5] + [40, 0, 0], 0, 255))
    d.polygon(_poly(lm[48:60]), fill=lip)
    d.polygon(_poly(lm[60:68]), fill=(70, 20, 25) if lm[66, 1] - lm[62, 1] > unit(0.03) else lip)
    d.line(_poly(lm[[60, 61, 62, 63, 64]]), fill=(90, 30, 30), width=1)

    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.2))))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, rng.uniform(1, 4), arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img, lm.astype(np.float64)


def write_pts(path: Path, landmarks: np.ndarray) -> None:
    lines = ["version: 1", f"n_points: {len(landmarks)}", "{", *(f"{x:.3f} {y:.3f}" for x, y in landmarks), "}"]
    Path(path).write_text("\n".join(lines) + "\n")


def synthetic_crowd(squares: list[int], seed: int = 0, width: int | None = None,
                    gap: int = 12) -> tuple[np.ndarray, list[np.ndarray]]:
    """A photo of procedural faces whose alignment squares are ``squares`` px, in rows (``width`` px wide; default:
    one row) on a smooth background: (H, W, 3) uint8 and each face's 68 points in the photo.  For restoring tiny
    faces without real photos (tests, the README's picture)."""
    from prouigan.align import align, keypoints_from_68

    width = width or sum(squares) + gap * (len(squares) + 1)
    places, x, y, row_h = [], gap, gap, 0
    for s in squares:
        if x + s + gap > width and x > gap:  # the next row
            x, y, row_h = gap, y + row_h + gap, 0
        places.append((x, y))
        x, row_h = x + s + gap, max(row_h, s)
    height = y + row_h + gap
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    phase = np.random.default_rng(seed).uniform(0, 6.3, 3)
    photo = np.stack([120 + 50 * np.sin(xx / 41 + phase[0]), 105 + 40 * np.cos(yy / 29 + phase[1]),
                      95 + 35 * np.sin((xx + yy) / 57 + phase[2])], -1)
    points = []
    for i, (s, (x, y)) in enumerate(zip(squares, places, strict=True)):
        img, lm = synthetic_face(seed * 1000 + i)
        a = align(img, *keypoints_from_68(lm), landmarks=lm)
        face = np.asarray(Image.fromarray(a.image).resize((s, s), Image.LANCZOS), np.float32)
        c = (np.arange(s) + 0.5) / s
        r = np.hypot(*np.meshgrid((c - 0.5) / 0.5, (c - 0.5) / 0.5))  # the whole crop's disc, soft at its rim
        alpha = np.clip((1 - r) / 0.2, 0, 1)[..., None]
        photo[y:y + s, x:x + s] = photo[y:y + s, x:x + s] * (1 - alpha) + face * alpha
        points.append((a.landmarks + 0.5) * s / 128 - 0.5 + [x, y])
    return np.clip(photo, 0, 255).round().astype(np.uint8), points
