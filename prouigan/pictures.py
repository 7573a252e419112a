"""Pictures of faces side by side, as training's validation grids and the evaluation's reports draw them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_u8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] -> (B, H, W, 3) uint8."""
    return (x.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def comparison_grid(lr: torch.Tensor, outputs: list[torch.Tensor], hr: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8: one row per face, columns  input (nearest x8) | each output (any size, nearest to HR's) |
    original."""
    up = lambda x: F.interpolate(x.detach().float().cpu(), size=hr.shape[-1], mode="nearest")  # noqa: E731
    cols = [up(lr), *[up(o) for o in outputs], hr.detach().float().cpu()]
    rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(len(hr))]
    return to_u8(torch.cat(rows, dim=1)[None])[0]
