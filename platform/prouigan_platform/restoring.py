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
import torch.nn.functional as F
from PIL import Image

from prouigan.align import align_quad, ffhq_quad, keypoints_from_68, paste_back, quad_from_points
from prouigan.degradation import SCALE, back_project, downsample
from prouigan_platform.detection import Detection

MODEL_OUTPUT = 128  # the side of the model's faces: auto upscale brings the typical face's square near it
MAX_UPSCALE = SCALE  # the model's own 8x: beyond it the faces would be upsampled again
BACKGROUNDS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
MIN_INSIDE = 0.5  # a face whose alignment square lies less than this much inside the photo is skipped
# a face larger than the thumbnail enters the model with its own pixels at the stage whose input it fills to this
# fraction or more, and is back-projected onto them in this many steps (both chosen on the 300-W val faces,
# BENCHMARKS.md "Tiny faces")
ENTRY_FRACTION = 0.6
BACK_PROJECTION = 5
# after pasting, each face is back-projected once more in the output photo itself, so that the output, reduced by
# the upscale, agrees with the input photo inside the face's mask: it undoes what the face's two resamplings (into
# its aligned square and back out) blur or shift (chosen on the 300-W val faces, BENCHMARKS.md "Tiny faces")
PHOTO_BACK_PROJECTION = 5
# the share of the upscaled photo blended back into each face made with the photo's pixels (inside its mask): 0 keeps
# every detail the model adds, 1 gives the upscaled photo back (GFPGAN's weight, CodeFormer's w); --fidelity sets it.
# 0.5: on the 300-W val faces the closest to the person (dlib identity) at every size, PSNR within 0.04 dB of the best
FIDELITY = 0.5


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


def entry_size(square: float) -> int | None:
    """The model stage a face of ``square`` px enters at with its own pixels: 64 or 32 once the photo shows it at
    ENTRY_FRACTION of that size or more (a 21-px face enters at 32), else None (the thumbnail alone)."""
    for size in (64, 32):
        if square >= ENTRY_FRACTION * size:
            return size
    return None


def hallucinate(rgb: np.ndarray, model, faces: list[Face], thumbs: np.ndarray, photo_pixels: bool = True,
                back_projection: int = BACK_PROJECTION) -> np.ndarray:
    """(N, 128, 128, 3) uint8, one face per thumbnail.  ``photo_pixels``: a face larger than the thumbnail also
    enters the model at its larger stage with its own pixels (``entry_size``), and every result is then corrected
    to agree with the photo at the face's own resolution (``back_project``, ``back_projection`` steps); off: the
    thumbnail alone, as the model was trained."""
    out = np.zeros((len(faces), MODEL_OUTPUT, MODEL_OUTPUT, 3), np.uint8)
    entries = [entry_size(f.square) if photo_pixels else None for f in faces]
    for size in sorted(set(entries), key=lambda e: e or 0):
        idx = [i for i, e in enumerate(entries) if e == size]
        seen = None if size is None else _tensor([align_quad(rgb, faces[i].quad, size=size).image for i in idx])
        res = model.run(thumbs[idx], observed=seen).final
        if photo_pixels and back_projection:
            res = torch.cat([back_project(res[k:k + 1], _observed(rgb, faces[i]), back_projection)
                             for k, i in enumerate(idx)])
        out[idx] = (res.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return out


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _observed(rgb: np.ndarray, face: Face) -> torch.Tensor:
    """(1, 3, s, s): the face as the photo shows it, at its own resolution (s = its square, at most 128)."""
    side = int(np.clip(round(face.square), 4, MODEL_OUTPUT))
    return _tensor([align_quad(rgb, face.quad, size=side).image])


def put_face(out: np.ndarray, rgb: np.ndarray, face: np.ndarray, quad: np.ndarray, upscale: int,
             back_projection: int = PHOTO_BACK_PROJECTION, fidelity: float = FIDELITY) -> None:
    """Paste ``face`` (128x128) into ``out`` (``rgb`` upscaled ``upscale`` times) through ``quad`` (output pixels)
    with its feathered mask, in place.  Then, inside the mask only: ``back_projection`` steps that correct the
    output until, reduced by ``upscale`` (antialiased bicubic), it agrees with ``rgb``; and ``fidelity`` of the
    upscaled photo blended back in."""
    if not 0 <= fidelity <= 1:
        raise ValueError(f"fidelity must be 0-1, got {fidelity}")
    h, w = rgb.shape[:2]
    lo = np.floor(quad.min(0) / upscale).astype(int) - 2
    hi = np.ceil(quad.max(0) / upscale).astype(int) + 2
    x0, y0, x1, y1 = max(lo[0], 0), max(lo[1], 0), min(hi[0], w), min(hi[1], h)
    if x1 <= x0 or y1 <= y0:
        return
    region = out[y0 * upscale:y1 * upscale, x0 * upscale:x1 * upscale]
    background = region.copy()
    paste_back(region, face, quad - np.array([x0, y0]) * upscale, inplace=True)
    if not (back_projection and upscale > 1) and not fidelity:
        return
    x = _tensor([region])
    if back_projection and upscale > 1:
        ones = np.full_like(face, 255)
        mask = paste_back(np.zeros_like(region), ones, quad - np.array([x0, y0]) * upscale)[..., :1]
        m = torch.from_numpy(mask.astype(np.float32) / 255).permute(2, 0, 1)[None]
        seen = _tensor([rgb[y0:y1, x0:x1]])
        for _ in range(back_projection):
            low = F.interpolate(x, size=seen.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
            x = (x + m * F.interpolate(seen - low, size=x.shape[-2:], mode="bicubic", align_corners=False)).clamp(0, 1)
    x = (1 - fidelity) * x + fidelity * _tensor([background])  # outside the mask x is the background already
    region[:] = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def restore_photo(rgb: np.ndarray, model, faces: list[Face], upscale: int = 1, background: str = "bicubic",
                  thumbnail: np.ndarray | None = None, photo_pixels: bool = True,
                  photo_back_projection: int = PHOTO_BACK_PROJECTION, fidelity: float = FIDELITY) -> np.ndarray:
    """The photo upscaled ``upscale`` times by ``background``, every face marked restored hallucinated
    (``hallucinate``) and pasted back at the output's resolution.  ``thumbnail`` replaces the first restored face's
    own (which then comes from it alone).  Fills each face's ``thumbnail`` and ``output``."""
    out = upscale_photo(rgb, upscale, background)
    todo = [f for f in faces if f.status == "restored"]
    if not todo:
        return out
    thumbs = thumbnails(rgb, todo)
    results = hallucinate(rgb, model, todo, thumbs, photo_pixels)
    if thumbnail is not None:
        thumbs[0] = thumbnail
        results[0] = model.to_uint8(thumbnail[None])[0]
    for k, (f, t, r) in enumerate(zip(todo, thumbs, results, strict=True)):
        f.thumbnail, f.output = t, r
        quad = f.quad * upscale  # the square's corners are pixel edges: they scale
        if photo_pixels and not (k == 0 and thumbnail is not None):
            put_face(out, rgb, r, quad, upscale, photo_back_projection, fidelity)
        else:  # the face from its thumbnail alone: nothing of the photo's pixels comes back
            paste_back(out, r, quad, inplace=True)
    return out


def faces_grid(faces: list[Face], per_row: int = 6) -> np.ndarray:
    """Each restored face as thumbnail (nearest, 128 px) | result, ``per_row`` pairs a row."""
    cells = [np.concatenate([np.asarray(Image.fromarray(f.thumbnail).resize((128, 128), Image.NEAREST)), f.output], 1)
             for f in faces if f.output is not None]
    blank = np.zeros_like(cells[0])
    rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
    if len(rows) > 1:
        rows[-1] += [blank] * (per_row - len(rows[-1]))
    return np.concatenate([np.concatenate(r, 1) for r in rows], 0)
