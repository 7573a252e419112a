"""iBUG-68 landmarks <-> Gaussian heatmaps at any resolution, soft-argmax, NME.

Coordinates are pixels of a 128x128 face (x right, y down, pixel centres at integers).  A heatmap of
resolution r samples the same face on an r x r grid: pixel i of it covers 128/r face pixels.
"""

from __future__ import annotations

import torch

from prouigan.ibug import LEFT_EYE, MOUTH, OUTER_EYE_CORNERS, RIGHT_EYE

FACE_SIZE = 128
__all__ = ["FACE_SIZE", "LEFT_EYE", "MOUTH", "OUTER_EYE_CORNERS", "RIGHT_EYE", "from_grid", "heatmaps", "interocular",
           "nme", "soft_argmax", "to_grid"]


def to_grid(points: torch.Tensor, res: int, size: int = FACE_SIZE) -> torch.Tensor:
    """Face-pixel coordinates -> coordinates on an res x res grid (same physical point)."""
    return (points + 0.5) * (res / size) - 0.5


def from_grid(points: torch.Tensor, res: int, size: int = FACE_SIZE) -> torch.Tensor:
    return (points + 0.5) * (size / res) - 0.5


def heatmaps(points: torch.Tensor, res: int, sigma: float, size: int = FACE_SIZE) -> torch.Tensor:
    """(B, K, 2) face-pixel landmarks -> (B, K, res, res) Gaussians with peak 1.

    ``sigma`` is in pixels of a 32x32 grid and scales with the resolution, so every stage's target
    covers the same part of the face.
    """
    p = to_grid(points.float(), res, size)  # (B, K, 2)
    s = sigma * res / 32.0
    grid = torch.arange(res, dtype=p.dtype, device=p.device)
    gx = torch.exp(-((grid[None, None, :] - p[..., 0:1]) ** 2) / (2 * s * s))  # (B, K, res)
    gy = torch.exp(-((grid[None, None, :] - p[..., 1:2]) ** 2) / (2 * s * s))
    return gy[..., :, None] * gx[..., None, :]  # separable: (B, K, res, res)


def soft_argmax(maps: torch.Tensor, sigma: float = 1.5, size: int = FACE_SIZE) -> torch.Tensor:
    """(B, K, r, r) heatmaps -> (B, K, 2) face-pixel coordinates.

    The centroid of the (non-negative) heatmap in a window of +-3 sigma around its peak: exact for a
    sampled Gaussian even at 16x16, robust to noise far from the peak, differentiable in the values.
    """
    b, k, h, w = maps.shape
    m = maps.float().clamp_min(0)
    idx = m.reshape(b, k, h * w).argmax(-1)
    py, px = (idx // w).to(m.dtype), (idx % w).to(m.dtype)
    radius = max(2.0, float(torch.ceil(torch.tensor(3 * sigma * h / 32.0))))
    ys = torch.arange(h, dtype=m.dtype, device=m.device)
    xs = torch.arange(w, dtype=m.dtype, device=m.device)
    win_y = ((ys[None, None] - py[..., None]).abs() <= radius).to(m.dtype)  # (B, K, h)
    win_x = ((xs[None, None] - px[..., None]).abs() <= radius).to(m.dtype)  # (B, K, w)
    wgt = m * win_y[..., :, None] * win_x[..., None, :]
    total = wgt.sum((2, 3)).clamp_min(1e-8)
    x = (wgt.sum(2) * xs).sum(-1) / total
    y = (wgt.sum(3) * ys).sum(-1) / total
    return from_grid(torch.stack([x, y], -1), h, size)


def interocular(points: torch.Tensor) -> torch.Tensor:
    a, b = OUTER_EYE_CORNERS
    return (points[..., a, :] - points[..., b, :]).norm(dim=-1)


def nme(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean point error normalised by the inter-ocular (outer eye corner) distance of the target."""
    err = (pred.float() - target.float()).norm(dim=-1).mean(-1)
    return err / interocular(target.float()).clamp_min(1e-6)
