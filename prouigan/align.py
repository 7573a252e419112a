"""Face alignment to a 128x128 square by the public FFHQ recipe, and its inverse.

The oriented square comes from the eye centres and the mouth corners (so 5-point and 68-point
annotations both work): centre a little below the eyes, side max(2 x eye distance, 1.8 x eye-to-mouth),
rotated with the eyes.  Where the square leaves the photo, the photo is reflect-padded and the padding is
blurred and faded towards the image median (as FFHQ does), never black.  Landmarks go through the same
transform.  ``native_side`` is the square's side in photo pixels: below the output size the "HR" face
would be an upsampled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from prouigan.ibug import LEFT_EYE, RIGHT_EYE


@dataclass
class AlignedFace:
    image: np.ndarray  # (S, S, 3) uint8
    landmarks: np.ndarray | None  # (K, 2) in output pixels (pixel centres at integers)
    native_side: float  # side of the alignment square in source pixels
    quad: np.ndarray  # (4, 2) source corners: upper-left, lower-left, lower-right, upper-right
    padded: bool  # the square left the photo and padding was synthesised


def keypoints_from_68(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lm = np.asarray(lm, np.float64)
    return lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0), lm[48], lm[54]


def keypoints_from_5(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CelebA order: left eye, right eye, nose, left mouth corner, right mouth corner."""
    lm = np.asarray(lm, np.float64)
    return lm[0], lm[1], lm[3], lm[4]


# five points a detector gives (YuNet, RetinaFace, MTCNN): image-left eye, image-right eye, nose tip, image-left
# and image-right mouth corners
FIVE_POINTS = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")


# Where the 68-point alignment puts the five points in a 128x128 face: the mean over the 964 aligned 300-W train
# faces (`python benchmarks/tiny_faces.py template`); a detector's five points are fitted to it
TEMPLATE_5 = np.array([[48.14, 60.49], [79.33, 60.44], [64.08, 77.36], [49.86, 93.26], [77.51, 93.16]])


def five_points_from_68(lm: np.ndarray) -> np.ndarray:
    """(68, 2) iBUG points -> (5, 2) in FIVE_POINTS order: eye centres (mean of each eye's 6 points), the nose tip
    (30) and the mouth corners (48, 54)."""
    lm = np.asarray(lm, np.float64)
    return np.stack([lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0), lm[30], lm[48], lm[54]])


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The similarity (rotation, uniform scale, shift; no reflection) that maps ``src`` (K, 2) onto ``dst`` (K, 2) in
    least squares (Umeyama, 1991): ``dst ~ src @ a.T + t``; returns (a (2, 2), t (2,))."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    # with complex numbers a similarity is one multiplication: z_dst = c * z_src
    zs, zd = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
    c = (np.conj(zs) @ zd) / max(float(np.real(np.conj(zs) @ zs)), 1e-12)
    a = np.array([[c.real, -c.imag], [c.imag, c.real]])
    return a, md - a @ ms


def quad_from_points(points: np.ndarray, template: np.ndarray = TEMPLATE_5) -> np.ndarray:
    """The alignment square (``align_quad``'s corners) that puts ``points`` (K, 2, source pixels) where ``template``
    (K, 2, pixels of a 128x128 aligned face) has them, by the least-squares similarity."""
    # pixel-edge coordinates (a pixel centre is at +0.5), as the quad's corners are
    a, t = similarity_fit(np.asarray(points, np.float64) + 0.5, np.asarray(template, np.float64) + 0.5)
    corners = np.array([[0, 0], [0, 128], [128, 128], [128, 0]], np.float64)
    return np.linalg.solve(a, (corners - t).T).T


def ffhq_quad(eye_left, eye_right, mouth_left, mouth_right) -> np.ndarray:
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x = x / (np.hypot(*x) + 1e-12)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def source_to_output(points: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    """Map source pixel coordinates into the aligned square's pixels."""
    a = np.stack([quad[3] - quad[0], quad[1] - quad[0]], 1) / size  # columns: du, dv
    return np.linalg.solve(a, (np.asarray(points, np.float64) + 0.5 - quad[0]).T).T - 0.5


def output_to_source(points: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    a = np.stack([quad[3] - quad[0], quad[1] - quad[0]], 1) / size
    return (a @ (np.asarray(points, np.float64) + 0.5).T).T + quad[0] - 0.5


def _pad_reflect_blur(img: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """FFHQ-style padding: reflect, then blur and fade the padded band towards the median colour."""
    left, top, right, bottom = pad
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    # np.pad's reflect needs pad < size; repeat in steps for very large pads
    while left or top or right or bottom:
        cur = [min(p, s - 1) for p, s in ((left, f.shape[1]), (top, f.shape[0]), (right, f.shape[1]),
                                          (bottom, f.shape[0]))]
        f = np.pad(f, ((cur[1], cur[3]), (cur[0], cur[2]), (0, 0)), mode="reflect")
        left, top, right, bottom = (p - c for p, c in zip((left, top, right, bottom), cur, strict=True))
    ph, pw = f.shape[:2]
    y, x = np.ogrid[:ph, :pw]
    l0, t0 = pad[0], pad[1]
    band = max(1.0, max(pad) * 1.0)
    dx = np.maximum(np.clip((l0 - x) / band, 0, 1) * (pad[0] > 0),
                    np.clip((x - (l0 + w - 1)) / band, 0, 1) * (pad[2] > 0))
    dy = np.maximum(np.clip((t0 - y) / band, 0, 1) * (pad[1] > 0),
                    np.clip((y - (t0 + h - 1)) / band, 0, 1) * (pad[3] > 0))
    dist = np.maximum(dx, dy).astype(np.float32)[..., None]  # 0 inside the photo, -> 1 at the far edge
    radius = float(max(1.0, max(pad) * 0.1))
    blurred = np.asarray(Image.fromarray(np.clip(f, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)),
                         np.float32)
    f = f + (blurred - f) * np.clip(dist * 3.0 + 1.0, 0, 1) * (dist > 0)
    f = f + (np.median(f.reshape(-1, 3), 0) - f) * np.clip(dist, 0, 1)
    return np.clip(f, 0, 255).round().astype(np.uint8)


def align(image: np.ndarray | Image.Image, eye_left, eye_right, mouth_left, mouth_right,
          landmarks: np.ndarray | None = None, size: int = 128) -> AlignedFace:
    """Crop the FFHQ square of a face to ``size`` x ``size``; carry ``landmarks`` (any K) along."""
    quad = ffhq_quad(*(np.asarray(p, np.float64) for p in (eye_left, eye_right, mouth_left, mouth_right)))
    return align_quad(image, quad, landmarks, size)


def align_quad(image: np.ndarray | Image.Image, quad: np.ndarray, landmarks: np.ndarray | None = None,
               size: int = 128) -> AlignedFace:
    """Crop the oriented square ``quad`` (source corners: upper-left, lower-left, lower-right, upper-right) to
    ``size`` x ``size``, padding FFHQ's way where it leaves the photo; carry ``landmarks`` along."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    quad = np.asarray(quad, np.float64)
    native = float(np.hypot(*(quad[3] - quad[0])))
    q = quad.copy()
    # shrink first when the square is much larger than the output (antialiasing, as FFHQ does)
    shrink = int(np.floor(native / size * 0.5))
    if shrink > 1:
        h, w = img.shape[:2]
        new = (max(1, int(round(w / shrink))), max(1, int(round(h / shrink))))
        img = np.asarray(Image.fromarray(img).resize(new, Image.LANCZOS))
        q = q * [new[0] / w, new[1] / h]
    # crop to the square's bounding box (+ a border), then pad only what lies outside the photo (as FFHQ does:
    # the blur and the median then cost the size of the face, not of the photo)
    h, w = img.shape[:2]
    border = max(int(np.rint(np.hypot(*(q[3] - q[0])) * 0.1)), 3)
    lo = np.floor(q.min(0)).astype(int) - border
    hi = np.ceil(q.max(0)).astype(int) + border
    padded = bool((q.min(0) < 0).any() or q.max(0)[0] > w or q.max(0)[1] > h)
    x0, y0, x1, y1 = max(lo[0], 0), max(lo[1], 0), min(hi[0], w), min(hi[1], h)
    img = img[y0:y1, x0:x1]
    q = q - [x0, y0]
    pad = tuple(int(v) for v in (max(-lo[0], 0), max(-lo[1], 0), max(hi[0] - w, 0), max(hi[1] - h, 0)))
    if any(pad):
        img = _pad_reflect_blur(img, pad)
        q = q + [pad[0], pad[1]]
    out = Image.fromarray(img).transform((size, size), Image.QUAD, tuple((q + 0.0).flatten()), Image.BICUBIC)
    lm_out = None if landmarks is None else source_to_output(landmarks, quad, size)
    return AlignedFace(np.asarray(out), lm_out, native, quad, padded)


def reframe(image: np.ndarray, landmarks: np.ndarray | None, shift: tuple[float, float], scale: float,
            rotation: float, unit: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """An aligned face (S, S, 3) uint8 seen through a misplaced alignment square: the square moved by ``shift``
    (x, y, in pixels of a ``unit``-px face: a 16x16 thumbnail's), ``scale`` times as large and turned by
    ``rotation`` degrees about its centre, as a detector's square lands on a face.  Where the new square leaves the
    face, the face is mirrored at its border.  ``landmarks`` (K, 2) follow."""
    size = image.shape[0]
    th = np.radians(rotation)
    a = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.array([size / 2, size / 2])
    t = c - a @ c + np.asarray(shift, np.float64) * size / unit  # new-square edge coords -> face edge coords
    pad = size // 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    coeffs = (a[0, 0], a[0, 1], t[0] + pad, a[1, 0], a[1, 1], t[1] + pad)
    out = np.asarray(Image.fromarray(padded).transform((size, size), Image.AFFINE, coeffs, Image.BICUBIC))
    lm = None if landmarks is None else \
        np.linalg.solve(a, (np.asarray(landmarks, np.float64) + 0.5 - t).T).T - 0.5
    return out, lm


def face_mask(size: int = 128, feather: float = 0.12) -> np.ndarray:
    """(size, size) float weights in [0, 1] for pasting an aligned face back: an ellipse over the face
    (the square's centre, a little low, where the FFHQ crop puts brows to chin), 1 inside and fading to 0
    over ``feather`` of its radius; exactly 0 well inside the square's border."""
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    r = np.sqrt(((x - 0.5) / 0.36) ** 2 + ((y - 0.54) / 0.42) ** 2)  # 1 on the ellipse
    return np.clip((1.0 - r) / feather, 0.0, 1.0).astype(np.float32)


def paste_back(photo: np.ndarray, face: np.ndarray, quad: np.ndarray, mask: np.ndarray | None = None,
               inplace: bool = False) -> np.ndarray:
    """Put an aligned ``face`` (S, S, 3) back into ``photo`` (H, W, 3) through the inverse of the alignment
    ``quad``, blended with ``mask`` (``face_mask`` by default).  Pixels the mask does not reach are unchanged.
    ``inplace``: write into ``photo`` (a large upscaled photo with many faces is then never copied)."""
    size = face.shape[0]
    mask = face_mask(size) if mask is None else mask
    side = float(np.hypot(*(quad[3] - quad[0])))
    if side < 0.75 * size:  # much smaller in the photo: shrink with antialiasing first (the warp itself has none)
        small = max(1, int(np.ceil(side)))
        face = np.asarray(Image.fromarray(face).resize((small, small), Image.LANCZOS))
        mask = np.asarray(Image.fromarray(mask, mode="F").resize((small, small), Image.BILINEAR), np.float32)
        size = small
    h, w = photo.shape[:2]
    lo = np.floor(quad.min(0)).astype(int) - 1
    hi = np.ceil(quad.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(lo[0], 0), max(lo[1], 0), min(hi[0], w), min(hi[1], h)
    out = photo if inplace else photo.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    # PIL's affine maps output pixel-corner coordinates to input ones: face = A^-1 (photo - quad[0]) / (1 / size)
    a = np.stack([quad[3] - quad[0], quad[1] - quad[0]], 1) / size
    inv = np.linalg.inv(a)
    off = inv @ (np.array([x0, y0], np.float64) - quad[0])
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    box = (x1 - x0, y1 - y0)
    resample = Image.BICUBIC if side > size else Image.BILINEAR
    warped = np.asarray(Image.fromarray(face).transform(box, Image.AFFINE, coeffs, resample), np.float32)
    m = np.asarray(Image.fromarray(mask, mode="F").transform(box, Image.AFFINE, coeffs, Image.BILINEAR),
                   np.float32)[..., None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = np.clip(region * (1 - m) + warped * m, 0, 255).round().astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(m > 0, blended, out[y0:y1, x0:x1])
    return out
