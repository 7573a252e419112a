"""Finding faces in photos: YuNet (the ``yuface`` wheel, the default) or dlib's HOG detector (``--detector dlib``).

YuNet (libfacedetection, BSD-3; its weights are compiled into the wheel, nothing is downloaded) finds faces from
about 10 px wide and gives 5 points each.  It looks at a photo several times: whole (shrunk to at most
``WHOLE_SIDE`` so large faces fit its receptive field), at its own size in overlapping tiles, and enlarged
``upsample`` times in tiles (faces of 5-10 px become the 10-20 px it sees).  Boxes found more than once are merged
by non-maximum suppression.  Where a face is small, its 5 points are measured again on a crop enlarged until the
face is ``REFINE_SIDE`` px: YuNet's points are whole pixels, a quarter of an eye distance on a 16-px face.

dlib's HOG detector (the optional ``eval`` extra) misses faces under ~40 px unless the photo is upsampled; its
68 points give the 5 the same way the dataset's annotations do.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from prouigan.align import five_points_from_68

DETECTORS = ("yunet", "dlib")
WHOLE_SIDE = 640  # the whole photo, shrunk to this long side, finds the large faces
TILE = 640  # tiles of this side (at the pass's scale), overlapping by OVERLAP
OVERLAP = 96  # the largest face a tile pass must see whole; larger ones are the whole-photo pass's
REFINE_BELOW = 48  # faces narrower than this (px) get their points measured again, enlarged
REFINE_SIDE = 96  # ... until the face's box is about this wide
DLIB_SIDE = 160  # --landmarks dlib: dlib's 68 points measured on the face enlarged until its box is this wide
LANDMARKS = ("yunet", "dlib")
NMS_IOU = 0.4
DEFAULT_UPSAMPLE = {"yunet": 3, "dlib": 1}  # YuNet's enlarged pass; dlib's pyramid upsamplings
DEFAULT_THRESHOLD = 0.7  # YuNet's least score: at 0.7 every other box it found on the 300-W photos was a face


class DetectorMissing(RuntimeError):
    """The detector's package is not installed (or has no wheel for this machine)."""


@dataclass
class Detection:
    """One face found in a photo, in the photo's pixels."""

    box: np.ndarray  # (4,) x0, y0, x1, y1
    points5: np.ndarray  # (5, 2) prouigan.align.FIVE_POINTS order
    score: float  # 0..1
    detector: str
    landmarks68: np.ndarray | None = field(default=None, repr=False)  # dlib's 68 points, where measured

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    def to_json(self) -> dict:
        return {"box": [round(float(v), 1) for v in self.box], "points5": np.round(self.points5, 2).tolist(),
                "score": round(self.score, 3), "detector": self.detector, "box_px": round(self.width, 1),
                "landmarks": "dlib-68" if self.landmarks68 is not None else "yunet-5"}


@lru_cache(maxsize=1)
def _yuface():
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read once by the wheel's own OpenMP runtime as it loads (_one_thread)
    try:
        from yuface.yuface import detect
    except ImportError as e:
        raise DetectorMissing(f"the YuNet detector needs the 'yuface' package (pip install yuface; wheels for "
                              f"x86-64 Linux and Windows); or use --detector dlib ({e})") from None
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return detect


@contextmanager
def _one_thread():
    """YuNet on one OpenMP thread.  With every core it ran 20-90x slower beside a training that held both cores (a
    crowd photo: 187 s instead of 2 s): each parallel layer waits at a barrier for a thread the scheduler has put
    aside.  Where torch is loaded its OpenMP runtime answers the wheel's calls (loaded first, its symbols win), so
    torch's thread count is the one to set, for the detection's time."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _yunet_raw(bgr: np.ndarray) -> np.ndarray:
    """(N, 15) float: score 0..1, x, y, w, h, 5 x (x, y), in ``bgr``'s pixels.  yuface's ``detect`` wrapper names
    its threshold ``conf`` (its README says ``conf_thresh``) and scores 0-100; the C function is called directly and
    its 16th column (uninitialised memory) dropped."""
    if min(bgr.shape[:2]) < 8:
        return np.zeros((0, 15), np.float64)
    r = np.asarray(_yuface()(np.ascontiguousarray(bgr, dtype=np.uint8)), np.float64).reshape(-1, 16)[:, :15]
    r[:, 0] /= 100.0
    return r


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC if scale > 1 else Image.LANCZOS))


def _tiles(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


def _shift(r: np.ndarray, x: float, y: float) -> None:
    """Move rows of _yunet_raw by (x, y): the box's corner and the 5 points (not its width and height)."""
    r[:, [1, 5, 7, 9, 11, 13]] += x
    r[:, [2, 6, 8, 10, 12, 14]] += y


def _pass(rgb: np.ndarray, scale: float, tiled: bool) -> np.ndarray:
    """Detections of one pass, in the photo's pixels: rows of _yunet_raw."""
    img = _resize(rgb, scale)[:, :, ::-1]  # YuNet takes BGR
    h, w = img.shape[:2]
    ys, xs = (_tiles(h, TILE, OVERLAP), _tiles(w, TILE, OVERLAP)) if tiled else ([0], [0])
    th, tw = (TILE, TILE) if tiled else (h, w)
    rows = []
    for y in ys:
        for x in xs:
            r = _yunet_raw(img[y:y + th, x:x + tw])
            if len(r):
                _shift(r, x, y)
                rows.append(r)
    if not rows:
        return np.zeros((0, 15))
    r = np.concatenate(rows)
    # pixel centres: a value v at scale s is the photo's (v + 0.5) / s - 0.5; box corners are edges
    r[:, 5:15] = (r[:, 5:15] + 0.5) / scale - 0.5
    r[:, 1:5] /= scale
    return r


def _areas(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, area of a, areas of b) of box a (4,) and boxes b (N, 4), corners x0 y0 x1 y1."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    return ix * iy, area(a), area(b)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4,) against boxes b (N, 4), corners x0 y0 x1 y1."""
    inter, aa, ab = _areas(a, b)
    return inter / np.maximum(aa + ab - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, overlap: float = NMS_IOU, nested: float = 0.7) -> list[int]:
    """Indices of the boxes kept: the best-scored of each group overlapping by more than ``overlap`` IoU, or lying
    ``nested`` or more inside one another (a face holds no smaller face: that is the same face found twice)."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            o = np.array(order)
            inter, ai, ao = _areas(boxes[i], boxes[o])
            same = (inter / np.maximum(ai + ao - inter, 1e-9) > overlap) | \
                (inter / np.maximum(np.minimum(ai, ao), 1e-9) >= nested)
            order = list(o[~same])
    return keep


def _refine(rgb: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Measure a small face's 5 points again on a crop around it enlarged until the face is ~REFINE_SIDE wide;
    the row as it was where the enlarged crop finds no face at that place."""
    x, y, w, h = d[1:5]
    scale = REFINE_SIDE / max(w, 1.0)
    side = max(w, h) * 2.0
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(np.floor(cx - side / 2)), int(np.floor(cy - side / 2))
    x1, y1 = int(np.ceil(cx + side / 2)), int(np.ceil(cy + side / 2))
    H, W = rgb.shape[:2]
    crop = rgb[max(y0, 0):min(y1, H), max(x0, 0):min(x1, W)]
    if crop.size == 0:
        return d
    r = _pass(crop, scale, tiled=False)
    if not len(r):
        return d
    _shift(r, max(x0, 0), max(y0, 0))
    box = np.array([x, y, x + w, y + h])
    boxes = np.stack([r[:, 1], r[:, 2], r[:, 1] + r[:, 3], r[:, 2] + r[:, 4]], 1)
    ious = iou(box, boxes)
    best = int(np.argmax(ious))
    if ious[best] < 0.5:
        return d
    out = d.copy()
    out[5:15] = r[best, 5:15]
    return out


def _detect_rows(rgb: np.ndarray, threshold: float, upsample: int, refine: bool) -> np.ndarray:
    h, w = rgb.shape[:2]
    passes = []
    if max(h, w) > WHOLE_SIDE:
        passes.append(_pass(rgb, WHOLE_SIDE / max(h, w), tiled=False))
    passes.append(_pass(rgb, 1, tiled=True))
    if upsample > 1:
        passes.append(_pass(rgb, upsample, tiled=True))
    r = np.concatenate(passes)
    r = r[r[:, 0] >= threshold]
    if not len(r):
        return r
    boxes = np.stack([r[:, 1], r[:, 2], r[:, 1] + r[:, 3], r[:, 2] + r[:, 4]], 1)
    r = r[nms(boxes, r[:, 0])]
    if refine:
        r = np.stack([_refine(rgb, d) if d[3] < REFINE_BELOW else d for d in r])
    return r


def detect_yunet(rgb: np.ndarray, threshold: float = 0.7, upsample: int = 3, refine: bool = True
                 ) -> list[Detection]:
    """Every face YuNet finds in ``rgb`` (H, W, 3) uint8 with a score of at least ``threshold``, largest first."""
    with _one_thread():
        r = _detect_rows(rgb, threshold, upsample, refine)
    out = [Detection(np.array([d[1], d[2], d[1] + d[3], d[2] + d[4]]), d[5:15].reshape(5, 2), float(d[0]), "yunet")
           for d in r]
    return sorted(out, key=lambda d: -d.width)


def detect_dlib(rgb: np.ndarray, upsample: int = 1) -> list[Detection]:
    from prouigan_platform.dataset.labeler import DlibMissing, detect_boxes, landmarks_in_box

    try:
        boxes = detect_boxes(rgb, upsample)
    except DlibMissing as e:
        raise DetectorMissing(str(e)) from None
    out = []
    for box, score in boxes:
        lm = landmarks_in_box(rgb, box)
        out.append(Detection(np.asarray(box, np.float64), five_points_from_68(lm), score, "dlib", lm))
    return out


def with_dlib_points(rgb: np.ndarray, d: Detection) -> Detection:
    """``d`` with dlib's 68 points (the eval extra's predictor) measured in its box, on a crop enlarged until the box
    is DLIB_SIDE px wide: on 16-32 px faces they place the alignment square about twice as well as YuNet's five
    points (BENCHMARKS.md, "Tiny faces")."""
    from prouigan_platform.dataset.labeler import DlibMissing, landmarks_in_box

    x0, y0, x1, y1 = d.box
    w = max(x1 - x0, 1.0)
    scale = max(1.0, DLIB_SIDE / w)
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 1.5 * max(w, y1 - y0)
    h_, w_ = rgb.shape[:2]
    left, top = int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half)))
    right, bottom = int(min(w_, np.ceil(cx + half))), int(min(h_, np.ceil(cy + half)))
    crop = _resize(rgb[top:bottom, left:right], scale)
    sx, sy = crop.shape[1] / (right - left), crop.shape[0] / (bottom - top)
    box = ((x0 - left) * sx, (y0 - top) * sy, (x1 - left) * sx, (y1 - top) * sy)
    try:
        pts = landmarks_in_box(crop, box)
    except DlibMissing as e:
        raise DetectorMissing(str(e)) from None
    lm = (pts + 0.5) / [sx, sy] - 0.5 + [left, top]
    return Detection(d.box, five_points_from_68(lm), d.score, d.detector, lm)


def detect(rgb: np.ndarray, detector: str = "yunet", upsample: int | None = None,
           threshold: float | None = None, landmarks: str = "yunet") -> list[Detection]:
    """The faces ``detector`` finds, largest first.  ``upsample``: YuNet's enlarged tile pass, dlib's image pyramid
    steps (DEFAULT_UPSAMPLE); ``threshold``: YuNet's least score (DEFAULT_THRESHOLD); ``landmarks="dlib"``: YuNet's
    faces get dlib's 68 points (``with_dlib_points``; dlib's own faces always have them)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; known: {', '.join(DETECTORS)}")
    up = DEFAULT_UPSAMPLE[detector] if upsample is None else upsample
    if detector == "dlib":
        return detect_dlib(rgb, up)
    found = detect_yunet(rgb, DEFAULT_THRESHOLD if threshold is None else threshold, up)
    return [with_dlib_points(rgb, d) for d in found] if landmarks == "dlib" else found
