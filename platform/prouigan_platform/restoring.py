"""Restoring the faces of a photo: find them (``detection``), align each to 128x128 by its points, make the 16x16
thumbnail the way training inputs are made (or take the one given), hallucinate, and paste every face back with
its feathered mask into the photo upscaled ``upscale`` times, at the output's resolution.

A face's alignment square comes from its five points fitted to ``TEMPLATE_5`` (YuNet), or from its 68 points by
the dataset's own recipe (dlib).  What the model makes of a 16x16 thumbnail is 128x128: a 20-px face in a photo
upscaled 6 times is pasted at 120 px, so the 8x the model adds is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from prouigan.align import align_quad, ffhq_quad, keypoints_from_68, paste_back, quad_from_points
from prouigan.degradation import SCALE, back_project, downsample
from prouigan_platform.detection import Detection

MODEL_OUTPUT = 128  # the side of the model's faces: auto upscale brings the typical face's square near it
MAX_UPSCALE = SCALE  # the model's own 8x: beyond it the faces would be upsampled again
BACKGROUNDS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
MIN_INSIDE = 0.5  # a face whose alignment square lies less than this much inside the photo is skipped


@dataclass
class Face:
    """One face found in a photo, and what became of it."""

    detection: Detection
    quad: np.ndarray  # its alignment square in the photo (align_quad's corners)
    status: str = "restored"  # or "skipped"
    reason: str = ""
    thumbnail: np.ndarray | None = None  # (16, 16, 3) uint8
    output: np.ndarray | None = None  # (128, 128, 3) uint8

    @property
    def square(self) -> float:
        """The side of the alignment square in photo pixels: what the 16x16 thumbnail is cut from."""
        return float(np.hypot(*(self.quad[3] - self.quad[0])))

    def to_json(self, upscale: int) -> dict:
        return {**self.detection.to_json(), "square_px": round(self.square, 1),
                "square_px_in_output": round(self.square * upscale, 1), "status": self.status,
                **({"reason": self.reason} if self.reason else {})}


def face_quad(d: Detection) -> np.ndarray:
    """The alignment square of a detection: its 68 points by the dataset's recipe where it has them (dlib), else its
    five points fitted to the template (YuNet)."""
    if d.landmarks68 is not None:
        return ffhq_quad(*keypoints_from_68(d.landmarks68))
    return quad_from_points(d.points5)


def inside_fraction(quad: np.ndarray, width: int, height: int, n: int = 16) -> float:
    """The share of the square ``quad`` that lies inside a ``width`` x ``height`` photo (sampled on an n x n grid)."""
    u = (np.arange(n) + 0.5) / n
    uu, vv = np.meshgrid(u, u)
    pts = quad[0] + uu[..., None] * (quad[3] - quad[0]) + vv[..., None] * (quad[1] - quad[0])
    return float(((pts[..., 0] >= 0) & (pts[..., 0] <= width) & (pts[..., 1] >= 0) & (pts[..., 1] <= height)).mean())


def faces_of(rgb: np.ndarray, detections: list[Detection]) -> list[Face]:
    """Every detection as a Face, the ones that cannot be restored marked skipped with the reason."""
    h, w = rgb.shape[:2]
    faces = []
    for d in detections:
        f = Face(d, face_quad(d))
        inside = inside_fraction(f.quad, w, h)
        if inside < MIN_INSIDE:
            f.status, f.reason = "skipped", f"only {inside:.0%} of its alignment square lies inside the photo"
        faces.append(f)
    return faces


def auto_upscale(faces: list[Face], max_pixels: float, width: int, height: int) -> tuple[int, str]:
    """The upscale that brings the median face's square near the model's 128 px (1 to MAX_UPSCALE, within the
    output cap), and one line saying why."""
    squares = [f.square for f in faces if f.status == "restored"] or [f.square for f in faces]
    median = float(np.median(squares))
    ideal = int(np.clip(round(MODEL_OUTPUT / median), 1, MAX_UPSCALE))
    fits = max(1, int(np.floor(np.sqrt(max_pixels / (width * height)))))
    n = min(ideal, fits)
    why = (f"the median face's square is {median:.0f} px; x{n} makes it {median * n:.0f} px, near the model's "
           f"{MODEL_OUTPUT}")
    if n < ideal:
        why += f" (x{ideal} would pass the {max_pixels / 1e6:.0f}-megapixel output cap)"
    return n, why


def thumbnails(rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
    """(N, 16, 16, 3) uint8: each face aligned to 128x128 by its square, reduced as training inputs are."""
    hr = np.stack([align_quad(rgb, f.quad, size=MODEL_OUTPUT).image for f in faces])
    x = torch.from_numpy(hr).permute(0, 3, 1, 2).float() / 255
    return (downsample(x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def upscale_photo(rgb: np.ndarray, upscale: int, background: str = "bicubic") -> np.ndarray:
    if upscale == 1:
        return rgb.copy()
    h, w = rgb.shape[:2]
    return np.array(Image.fromarray(rgb).resize((w * upscale, h * upscale), BACKGROUNDS[background]))  # writable


def restore_photo(rgb: np.ndarray, model, faces: list[Face], upscale: int = 1, background: str = "bicubic",
                  thumbnail: np.ndarray | None = None, back_projection: int = 0) -> np.ndarray:
    """The photo upscaled ``upscale`` times by ``background``, every face marked restored hallucinated and pasted
    back at the output's resolution (``thumbnail`` replaces the first restored face's own).  ``back_projection``:
    steps of ``agree_with_photo`` (0: the model's face as it is).  Fills each face's ``thumbnail`` and ``output``."""
    out = upscale_photo(rgb, upscale, background)
    todo = [f for f in faces if f.status == "restored"]
    if not todo:
        return out
    thumbs = thumbnails(rgb, todo)
    if thumbnail is not None:
        thumbs[0] = thumbnail
    results = model.to_uint8(thumbs)
    for i, (f, t, r) in enumerate(zip(todo, thumbs, results, strict=True)):
        if back_projection and not (i == 0 and thumbnail is not None):
            r = agree_with_photo(rgb, f, r, back_projection)
        f.thumbnail, f.output = t, r
        paste_back(out, r, f.quad * upscale, inplace=True)  # the square's corners are pixel edges: they scale
    return out


def agree_with_photo(rgb: np.ndarray, face: Face, result: np.ndarray, steps: int) -> np.ndarray:
    """The hallucinated face corrected to agree with the photo's own pixels of it (``back_project``) at their own
    resolution: a 30-px face gives back what its 30 px show and the model's details beyond them; a face of
    128 px or more comes back as itself."""
    side = int(np.clip(round(face.square), 4, MODEL_OUTPUT))
    seen = torch.from_numpy(align_quad(rgb, face.quad, size=side).image).permute(2, 0, 1)[None].float() / 255
    sr = torch.from_numpy(result).permute(2, 0, 1)[None].float() / 255
    x = back_project(sr, seen, steps)
    return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def faces_grid(faces: list[Face], per_row: int = 6) -> np.ndarray:
    """Each restored face as thumbnail (nearest, 128 px) | result, ``per_row`` pairs a row."""
    cells = [np.concatenate([np.asarray(Image.fromarray(f.thumbnail).resize((128, 128), Image.NEAREST)), f.output], 1)
             for f in faces if f.output is not None]
    blank = np.zeros_like(cells[0])
    rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
    if len(rows) > 1:
        rows[-1] += [blank] * (per_row - len(rows[-1]))
    return np.concatenate([np.concatenate(r, 1) for r in rows], 0)
