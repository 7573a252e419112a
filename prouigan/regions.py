"""Facial regions drawn from the 68 landmarks: a landmark-derived stand-in for face parsing.

No face-parsing model installs offline here, so "parsing" quality is measured as PSNR inside regions that the
ground-truth 68 points outline: eyes, brows, nose, mouth and the remaining skin of the face (inside the jaw
line and the brows, minus the other regions).  The shapes are polygons and thick lines through the points,
coarser than a parser's segmentation; reports call them landmark regions, not parsing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from prouigan.vocabulary import REGIONS


def _poly(draw: ImageDraw.ImageDraw, pts: np.ndarray, width: int = 0) -> None:
    xy = [tuple(map(float, p)) for p in pts]
    draw.polygon(xy, fill=1, outline=1)
    if width:
        draw.line(xy + [xy[0]], fill=1, width=width)


def region_masks(landmarks: np.ndarray, size: int = 128) -> dict[str, np.ndarray]:
    """(68, 2) points in face pixels -> {region: (size, size) bool mask}.  Regions do not overlap."""
    lm = np.asarray(landmarks, np.float64)
    eye_w = np.linalg.norm(lm[45] - lm[36])  # outer eye corners
    t = max(1, int(round(eye_w * 0.06)))  # line width / dilation scale with the face size

    def canvas():
        im = Image.new("1", (size, size), 0)
        return im, ImageDraw.Draw(im)

    masks = {}
    im, d = canvas()
    _poly(d, lm[36:42], width=t)
    _poly(d, lm[42:48], width=t)
    masks["eyes"] = im
    im, d = canvas()
    for a, b in ((17, 22), (22, 27)):
        d.line([tuple(map(float, p)) for p in lm[a:b]], fill=1, width=2 * t + 1)
    masks["brows"] = im
    im, d = canvas()
    wing = (lm[35] - lm[31]) * 0.15
    _poly(d, np.vstack([lm[27], lm[31] - wing, lm[31:36], lm[35] + wing]), width=t)
    masks["nose"] = im
    im, d = canvas()
    _poly(d, lm[48:60], width=t)
    masks["mouth"] = im
    im, d = canvas()
    _poly(d, np.vstack([lm[0:17], lm[26:21:-1], lm[21:16:-1]]))
    masks["skin"] = im
    out = {k: np.array(v, bool) for k, v in masks.items()}
    taken = np.zeros((size, size), bool)
    for k in ("eyes", "mouth", "nose", "brows"):  # the earlier region wins where two overlap
        out[k] &= ~taken
        taken |= out[k]
    out["skin"] &= ~taken
    return {k: out[k] for k in REGIONS}
