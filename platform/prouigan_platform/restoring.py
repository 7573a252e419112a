"""Restoring the faces in a photo: detect (dlib), align by the dataset's FFHQ recipe, make the 16x16 thumbnail the
way training inputs are made (or take the one given), hallucinate, paste back with a feathered face mask."""

from __future__ import annotations

import numpy as np
import torch

from prouigan.align import align, keypoints_from_68, paste_back
from prouigan.degradation import downsample
from prouigan_platform.dataset.labeler import detect_faces


def restore_photo(rgb: np.ndarray, model, thumbnail: np.ndarray | None = None, upsample: int = 1):
    """(H, W, 3) uint8 -> (restored photo, [(thumbnail 16x16, face 128x128)] per face); no faces: (photo, [])."""
    faces = detect_faces(rgb, upsample)
    if not faces:
        return rgb, []
    aligned = [align(rgb, *keypoints_from_68(lm), size=128) for lm in faces]
    hr = torch.from_numpy(np.stack([a.image for a in aligned]).copy()).permute(0, 3, 1, 2).float() / 255
    thumbs = (downsample(hr).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    if thumbnail is not None:
        thumbs[0] = thumbnail
    out = model.to_uint8(thumbs)
    photo = rgb
    for a, face in zip(aligned, out, strict=True):
        photo = paste_back(photo, face, a.quad)
    return photo, list(zip(thumbs, out, strict=True))
