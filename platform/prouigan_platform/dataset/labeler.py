"""Face detection and 68-point labelling with dlib (the optional ``eval`` extra).

dlib's 68-point predictor (shape_predictor_68_face_landmarks.dat) is licensed for non-commercial use only;
its face detector (HOG) ships with dlib itself.  The model files come from the ``face-recognition-models``
package, located without importing it (its import needs ``pkg_resources``).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

EXTRA_HINT = "pip install -e '.[eval]'  (dlib-bin + face-recognition-models)"


class DlibMissing(RuntimeError):
    pass


def require_dlib():
    """dlib, imported here and only here: it is an optional extra, and a clear error beats an ImportError."""
    try:
        import dlib
    except ImportError as e:
        raise DlibMissing(f"face detection and landmark labelling need dlib from the optional 'eval' extra: "
                          f"{EXTRA_HINT} ({e})") from None
    return dlib


def model_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibMissing(f"the dlib model files (face-recognition-models) are not installed: {EXTRA_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@lru_cache(maxsize=1)
def _detector():
    return require_dlib().get_frontal_face_detector()


@lru_cache(maxsize=1)
def _predictor():
    dlib = require_dlib()
    return dlib.shape_predictor(str(model_dir() / "shape_predictor_68_face_landmarks.dat"))


# names the labeller in label records: a change here must change this string (old labels are then redone)
LABELLER = "dlib-hog(upsample 0, then 1)+shape_predictor_68"


def detect_faces(rgb: np.ndarray, upsample: int = 1) -> list[np.ndarray]:
    """Every face dlib's HOG detector finds, as (68, 2) landmarks, largest first."""
    dlib = require_dlib()
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    dets = sorted(_detector()(img, upsample), key=lambda r: -r.area())
    return [landmarks_in_box(img, (d.left(), d.top(), d.right(), d.bottom())) for d in dets
            if isinstance(d, dlib.rectangle)]


def detect_boxes(rgb: np.ndarray, upsample: int = 1) -> list[tuple[tuple[int, int, int, int], float]]:
    """Every box dlib's HOG detector finds as ((left, top, right, bottom), score: the SVM's margin), largest first."""
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    dets, scores, _ = _detector().run(img, upsample, 0.0)
    found = [((d.left(), d.top(), d.right(), d.bottom()), float(s)) for d, s in zip(dets, scores, strict=True)]
    return sorted(found, key=lambda f: -(f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))


def label_faces(rgb: np.ndarray) -> list[dict]:
    """Every face in a photo as ``{"box": [l, t, r, b], "points": 68 x [x, y]}``, largest first.

    The detector first looks at the photo as it is (4x cheaper) and upsamples it once only when that finds
    nothing: faces of 80 px and more (aligned CelebA photos) are found at the first try."""
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    dets = []
    for upsample in (0, 1):
        dets = sorted(_detector()(img, upsample), key=lambda r: -r.area())
        if dets:
            break
    out = []
    for d in dets:
        box = (d.left(), d.top(), d.right(), d.bottom())
        out.append({"box": list(box), "points": np.round(landmarks_in_box(img, box), 2).tolist()})
    return out


def landmarks_in_box(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """dlib's 68 points for the face in ``box`` (left, top, right, bottom)."""
    dlib = require_dlib()
    shape = _predictor()(np.ascontiguousarray(rgb, dtype=np.uint8), dlib.rectangle(*map(int, box)))
    return _points(shape)


def _points(shape) -> np.ndarray:
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)


@lru_cache(maxsize=1)
def _face_encoder():
    dlib = require_dlib()
    return dlib.face_recognition_model_v1(str(model_dir() / "dlib_face_recognition_resnet_model_v1.dat"))


def describe(rgb: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """dlib's 68 points and 128-d identity embedding (public-domain ResNet) for the face in ``box``."""
    dlib = require_dlib()
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    shape = _predictor()(img, dlib.rectangle(*map(int, box)))
    return _points(shape), np.asarray(_face_encoder().compute_face_descriptor(img, shape), np.float64)


def face_box(rgb: np.ndarray, fallback_points: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
    """The largest box dlib's HOG detector finds (image upsampled once), else the box of ``fallback_points``."""
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    dets = sorted(_detector()(img, 1), key=lambda r: -r.area())
    if dets:
        d = dets[0]
        return d.left(), d.top(), d.right(), d.bottom()
    if fallback_points is None:
        return None
    (x0, y0), (x1, y1) = fallback_points.min(0), fallback_points.max(0)
    return int(x0), int(y0), int(x1), int(y1)
