"""128x128 HR face -> 16x16 LR input: occlude, antialiased bicubic x1/8, optional noise and JPEG.

The resize is torch's antialiased bicubic, which matches Pillow's ``resize((16, 16), BICUBIC)`` within a
small tolerance (tested), and runs batched on CPU or GPU.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCALE = 8


def downsample(hr: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) in [0, 1] -> antialiased bicubic 1/factor, clamped to [0, 1]."""
    squeeze = hr.dim() == 3
    x = hr[None] if squeeze else hr
    h, w = x.shape[-2:]
    y = F.interpolate(x.float(), size=(h // factor, w // factor), mode="bicubic", antialias=True,
                      align_corners=False).clamp(0, 1)
    return y[0] if squeeze else y


def upsample_bicubic(lr: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """The bicubic baseline: (B, 3, h, w) -> (B, 3, h*factor, w*factor)."""
    return F.interpolate(lr.float(), scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


def jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """(3, h, w) in [0, 1] -> the same after JPEG encode/decode at ``quality``."""
    arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32) / 255
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def degrade(hr: torch.Tensor, rng: np.random.Generator, noise_std: float = 0.0,
            jpeg_quality: int | None = None) -> torch.Tensor:
    """(3, 128, 128) occluded HR in [0, 1] -> (3, 16, 16) LR: downsample, then noise, then JPEG."""
    lr = downsample(hr)
    if noise_std > 0:
        lr = (lr + torch.from_numpy(rng.normal(0, noise_std, lr.shape).astype(np.float32))).clamp(0, 1)
    if jpeg_quality is not None:
        lr = jpeg_roundtrip(lr, jpeg_quality)
    return lr


def back_project(sr: torch.Tensor, observed: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Make a hallucinated face agree with what the photo shows of it (iterative back-projection, Irani & Peleg
    1991): ``sr`` (B, 3, S, S) is corrected until, reduced to the observed face's size (antialiased bicubic, as
    thumbnails are made), it matches ``observed`` (B, 3, s, s); the details the reduction cannot see are kept.
    Where a face is larger than the model's 16x16 input, its own pixels then come back into the result."""
    size = sr.shape[-2:]
    x = sr.float()
    for _ in range(steps):
        low = F.interpolate(x, size=observed.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
        x = x + F.interpolate(observed.float() - low, size=size, mode="bicubic", align_corners=False)
    return x.clamp(0, 1)
