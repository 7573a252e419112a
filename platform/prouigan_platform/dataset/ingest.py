"""One input -> aligned 128x128 face rows, or quarantine rows with a reason.  No input is lost silently.

``process_record`` is a pure function of the record and the data settings; Ray Data maps it over the
listing (and the benchmark's plain loop runs the same function).  Every row has the same fields, so
accepted and quarantined rows share one Arrow schema:
  key, input (the record's key), source, split, status ("ok" | "quarantined"), reason, note, origin,
  fingerprint, native_side, png, meta
  labels (dlib's faces for this input as JSON when dlib ran in this call, else "")
Quarantine reasons: empty_file, truncated_image, corrupt_image, unreadable_file, image_too_small,
image_too_large, missing_landmarks, bad_landmarks, landmarks_outside_image, no_face_found, several_faces,
implausible_landmarks, low_resolution, duplicate_key.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import warnings

import numpy as np
from PIL import Image

from prouigan.align import align, keypoints_from_5, keypoints_from_68
from prouigan.synthetic import synthetic_face
from prouigan_platform.dataset.labeler import label_faces

MIN_IMAGE_SIDE = 32  # below this an image cannot hold a usable face at all
MAX_IMAGE_PIXELS = 100_000_000  # refused from the header, before a decoder allocates for it
OUTSIDE_MARGIN = 0.25  # landmarks may stray this fraction of the image beyond its border (cropped faces)


class Quarantine(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def assign_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test from a hash of the key: stable when data is added, the same on every machine.
    Pass the group (the person) instead of the sample key where it is known: then a person is in one split."""
    u = int.from_bytes(hashlib.sha256(f"split:{key}".encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def decode_image(data: bytes) -> tuple[np.ndarray, str]:
    """bytes -> (H, W, 3) uint8 RGB and a note saying what was converted ("" when nothing was)."""
    if not data:
        raise Quarantine("empty_file", "zero-byte file")
    try:
        with warnings.catch_warnings():  # the size is checked here, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise Quarantine("image_too_large", f"{im.width}x{im.height} pixels ({im.width * im.height / 1e6:.0f} MP;"
                                                f" the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP)")
        im.load()
    except Quarantine:
        raise
    except Image.DecompressionBombError as e:
        raise Quarantine("image_too_large", str(e)) from None
    except OSError as e:
        if "truncated" in str(e).lower():
            raise Quarantine("truncated_image", str(e)) from None
        raise Quarantine("corrupt_image", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # PIL raises a zoo of errors on hostile bytes
        raise Quarantine("corrupt_image", f"{type(e).__name__}: {e}") from None
    try:  # the conversion is part of decoding: a mode PIL cannot turn into RGB quarantines the input
        rgb, note = _to_rgb(im)
    except Exception as e:
        raise Quarantine("unsupported_image_mode", f"{im.mode}: {type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise Quarantine("unsupported_image_mode", f"{im.mode} decoded to {rgb.dtype} {rgb.shape}")
    return rgb, note


def _to_rgb(im) -> tuple[np.ndarray, str]:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im), ""
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, 2), f"converted from 16-bit greyscale ({mode})"
    if mode == "P":
        im = im.convert("RGBA")
        mode = "P+RGBA"
    if im.mode in ("RGBA", "LA", "PA") or "A" in im.mode:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba).convert("RGB")
        return np.asarray(flat), f"alpha flattened onto white (from {mode})"
    if mode in ("L", "1"):
        return np.asarray(im.convert("RGB")), "converted from greyscale"
    if mode == "CMYK":
        return np.asarray(im.convert("RGB")), "converted from CMYK"
    return np.asarray(im.convert("RGB")), f"converted from {mode}"


def parse_pts(text: str) -> np.ndarray:
    """A 300-W .pts file -> (N, 2).  Raises Quarantine(bad_landmarks) on anything malformed."""
    if "{" not in text or "}" not in text:
        raise Quarantine("bad_landmarks", "no '{ ... }' block in the .pts file")
    body = text.split("{", 1)[1].split("}", 1)[0].split()
    try:
        vals = np.array([float(v) for v in body], np.float64)
    except ValueError:
        raise Quarantine("bad_landmarks", "non-numeric point values") from None
    if len(vals) % 2:
        raise Quarantine("bad_landmarks", f"odd number of coordinates ({len(vals)})")
    pts = vals.reshape(-1, 2)
    declared = [line for line in text.split("{", 1)[0].splitlines() if line.strip().startswith("n_points")]
    if declared:
        try:
            n = int(declared[0].split(":", 1)[1])
        except ValueError:
            raise Quarantine("bad_landmarks", f"unreadable header line {declared[0]!r}") from None
        if n != len(pts):
            raise Quarantine("bad_landmarks", f"header says {n} points, file has {len(pts)}")
    return pts


def _check_points(pts: np.ndarray, expected: int, w: int, h: int) -> None:
    if len(pts) != expected:
        raise Quarantine("bad_landmarks", f"expected {expected} points, got {len(pts)}")
    if not np.isfinite(pts).all():
        raise Quarantine("bad_landmarks", "NaN or infinite point values")
    mx, my = OUTSIDE_MARGIN * w, OUTSIDE_MARGIN * h
    out = (pts[:, 0] < -mx) | (pts[:, 0] > w + mx) | (pts[:, 1] < -my) | (pts[:, 1] > h + my)
    if out.any():
        raise Quarantine("landmarks_outside_image",
                         f"{int(out.sum())} point(s) far outside the {w}x{h} image, "
                         f"e.g. {pts[out][0].round(1).tolist()}")


def _check_geometry(pts: np.ndarray, kind: int) -> None:
    """Points an alignment can use: not collapsed, eyes apart, mouth away from the eyes."""
    spread = float(np.ptp(pts, axis=0).max())
    if spread < 4.0:
        raise Quarantine("bad_landmarks", f"degenerate: all {len(pts)} points lie within {spread:.1f} px")
    le, re_, ml, mr = keypoints_from_68(pts) if kind == 68 else keypoints_from_5(pts)
    iod, e2m = float(np.hypot(*(re_ - le))), float(np.hypot(*((ml + mr) / 2 - (le + re_) / 2)))
    if iod < 2.0 or e2m < 2.0:
        raise Quarantine("bad_landmarks", f"degenerate: eyes {iod:.1f} px apart, mouth {e2m:.1f} px from them")


def check_labelled(points: np.ndarray, box: list[int]) -> None:
    """A face dlib labelled must look like a face: eyes a sane share of the box apart, the mouth below them,
    the points on the box.  Raises Quarantine(implausible_landmarks)."""
    _check_geometry(points, 68)
    le, re_, ml, mr = keypoints_from_68(points)
    bw = max(1.0, float(box[2] - box[0]))
    eye = re_ - le
    iod = float(np.hypot(*eye))
    down = np.array([-eye[1], eye[0]]) / max(iod, 1e-9)  # unit normal of the eye line, towards the chin
    drop = float(((ml + mr) / 2 - (le + re_) / 2) @ down)
    m = 0.5 * bw
    outside = ((points[:, 0] < box[0] - m) | (points[:, 0] > box[2] + m) |
               (points[:, 1] < box[1] - m) | (points[:, 1] > box[3] + m)).mean()
    if not 0.15 <= iod / bw <= 0.9:
        raise Quarantine("implausible_landmarks", f"eyes {iod:.0f} px apart in a {bw:.0f} px face box")
    if not 0.4 <= drop / max(iod, 1e-9) <= 2.5:
        raise Quarantine("implausible_landmarks", f"mouth {drop:.0f} px below the eye line, eyes {iod:.0f} px apart")
    if outside > 0.1:
        raise Quarantine("implausible_landmarks", f"{outside:.0%} of the points lie far outside dlib's face box")


def _read(path: str) -> bytes:
    """A regular file's bytes.  Anything else (a FIFO, a device, a socket, also behind a link) is never opened:
    reading one would block the shard run or never end."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(
                st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "folder" if stat.S_ISDIR(
                st.st_mode) else "special file"
            raise Quarantine("not_a_regular_file", f"a {kind}, not an image file: never read")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise Quarantine("unreadable_file", f"{type(e).__name__}: {e.strerror or e}") from None


def _row(record: dict, status: str, reason: str = "", note: str = "", key: str | None = None, split: str = "",
         native: float = math.nan, png: bytes = b"", meta: bytes = b"") -> dict:
    return {"key": key or record["key"], "input": record["key"], "source": record["source"], "split": split,
            "status": status,
            "reason": reason, "note": note, "origin": record.get("image") or f"synthetic seed {record.get('seed')}",
            "fingerprint": record["fingerprint"], "native_side": float(native), "png": png, "meta": meta,
            "labels": ""}


def quarantine_row(record: dict, reason: str, detail: str = "", key: str | None = None) -> dict:
    return _row(record, "quarantined", reason=reason, note=detail, key=key)


# one face of an input: (sample key, 68 points or None, 5 points or None, why it cannot be used or None)
Face = tuple[str, "np.ndarray | None", "np.ndarray | None", "Quarantine | None"]


def _labelled_faces(record: dict, img: np.ndarray, fresh: dict) -> list[Face]:
    """dlib's faces (cached ones when the build passed them in), checked; ``fresh`` gets what dlib saw now."""
    if record.get("labels"):
        found = json.loads(record["labels"])
    else:
        found = fresh["faces"] = label_faces(img)
    if not found:
        raise Quarantine("no_face_found", "dlib's detector found no face")
    if record["label"] == "one" and len(found) > 1:
        raise Quarantine("several_faces", f"dlib found {len(found)} faces where the source names one person")
    faces: list[Face] = []
    for i, f in enumerate(found):
        key = record["key"] if record["label"] == "one" else f"{record['key']}_f{i}"
        pts = np.asarray(f["points"], np.float64)
        try:
            check_labelled(pts, f["box"])
            faces.append((key, pts, None, None))
        except Quarantine as q:
            faces.append((key, pts, None, q))
    return faces


def _faces(record: dict, fresh: dict) -> tuple[np.ndarray, str, list[Face]]:
    """(image, note, faces) for one input."""
    kind = record["kind"]
    if kind == "synthetic":
        img, lm = synthetic_face(int(record["seed"]))
        return np.asarray(img), "", [(record["key"], lm, None, None)]
    if record.get("problem"):
        raise Quarantine("bad_landmarks", record["problem"])
    img, note = decode_image(_read(record["image"]))
    h, w = img.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise Quarantine("image_too_small", f"{w}x{h} pixels (need at least {MIN_IMAGE_SIDE} on each side)")
    if record.get("label"):
        return img, note, _labelled_faces(record, img, fresh)
    if kind == "300w":
        if not record.get("pts"):
            raise Quarantine("missing_landmarks", "no .pts file beside the image")
        try:
            text = _read(record["pts"]).decode("utf-8", errors="replace")
        except Quarantine as q:
            raise Quarantine("missing_landmarks", q.detail) from None
        pts = parse_pts(text)
        _check_points(pts, 68, w, h)
        _check_geometry(pts, 68)
        return img, note, [(record["key"], pts, None, None)]
    if kind == "celeba":
        pts5 = np.asarray(record["points5"], np.float64).reshape(-1, 2)
        _check_points(pts5, 5, w, h)
        _check_geometry(pts5, 5)
        return img, note, [(record["key"], None, pts5, None)]
    raise ValueError(f"unknown source kind {kind!r}")


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def process_record(record: dict, min_native_px: int = 128, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, size: int = 128) -> list[dict]:
    """Every face of one input, accepted (aligned PNG + JSON meta) or quarantined (reason + detail).
    When dlib labelled the input in this call, the first row carries what it found (``labels``)."""
    fresh: dict = {}
    try:
        img, note, faces = _faces(record, fresh)
        rows = [_face_row(record, img, note, face, min_native_px, val_fraction, test_fraction, size) for face in faces]
    except Quarantine as q:
        rows = [quarantine_row(record, q.reason, q.detail)]
    if "faces" in fresh:
        rows[0]["labels"] = json.dumps(fresh["faces"])
    return rows


def _face_row(record: dict, img: np.ndarray, note: str, face: Face, min_native_px: int, val_fraction: float,
              test_fraction: float, size: int) -> dict:
    key, lm68, pts5, problem = face
    if problem is not None:
        return quarantine_row(record, problem.reason, problem.detail, key=key)
    kp = keypoints_from_68(lm68) if lm68 is not None else keypoints_from_5(pts5)
    try:
        aligned = align(img, *kp, landmarks=lm68 if lm68 is not None else pts5, size=size)
    except np.linalg.LinAlgError as e:
        return quarantine_row(record, "bad_landmarks", f"no alignment from these points ({e})", key=key)
    if aligned.native_side < min_native_px:
        return _row(record, "quarantined", "low_resolution",
                    f"face square is {aligned.native_side:.0f} px in the photo (< {min_native_px})", key=key,
                    native=aligned.native_side)
    group = record.get("group")
    split = record.get("split") or assign_split(f"{record['source']}/group/{group}" if group else key,
                                                val_fraction, test_fraction)
    meta = {
        "key": key, "source": record["source"], "split": split, "origin": record.get("image"), "group": group,
        "landmarks68": None if lm68 is None else np.round(aligned.landmarks, 3).tolist(),
        "points5": None if pts5 is None else np.round(aligned.landmarks, 3).tolist(),
        "landmarks_from": "dlib" if record.get("label") else ("annotation" if lm68 is not None or pts5 is not None
                                                               else None),
        "native_side": round(aligned.native_side, 2), "padded": aligned.padded, "note": note,
    }
    return _row(record, "ok", note=note, key=key, split=split, native=aligned.native_side,
                png=encode_png(aligned.image), meta=json.dumps(meta).encode())
