"""Image metrics in torch (batched, CPU or GPU): PSNR, SSIM, PSNR over the occluded region only.

SSIM follows Wang et al. 2004 as scikit-image computes it with ``gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1``: an 11x11 Gaussian window, per channel, averaged over the
valid (un-padded) region and the channels.  Images are (B, 3, H, W) in [0, 1]; every function returns (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    return 10 * torch.log10(data_range ** 2 / mse(a, b).clamp_min(1e-12))


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR over the pixels where ``mask`` (B, 1, H, W) or (B, H, W) is 1; NaN for an empty mask."""
    if mask.dim() == 3:
        mask = mask[:, None]
    m = mask.double().expand_as(a)
    err = (((a.double() - b.double()) ** 2) * m).flatten(1).sum(1)
    n = m.flatten(1).sum(1)
    out = 10 * torch.log10(data_range ** 2 / (err / n.clamp_min(1)).clamp_min(1e-12))
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """The 1-D Gaussian; the 2-D SSIM window is its outer product with itself."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    a, b = a.double(), b.double()
    c = a.shape[1]
    # the Gaussian window is separable: a column pass then a row pass, on the five maps at once, is the 2-D
    # window's result at a fifth of the work (float64 convolutions have no fast CPU kernel)
    g = _gaussian_window(win, sigma, device=a.device)
    x = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    x = F.conv2d(x, g.view(1, 1, win, 1).expand(5 * c, 1, win, 1), groups=5 * c)  # 'valid', as skimage crops
    x = F.conv2d(x, g.view(1, 1, 1, win).expand(5 * c, 1, 1, win), groups=5 * c)
    mu_a, mu_b, aa, bb, ab = x.split(c, dim=1)
    va = aa - mu_a ** 2
    vb = bb - mu_b ** 2
    cov = ab - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def face_scores(out: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-face scores validation and evaluation share: PSNR, SSIM, and PSNR over the occluded pixels (NaN for
    a face without an occluded region), each (B,)."""
    return {"psnr": psnr(out, hr), "ssim": ssim(out, hr), "psnr_occluded": masked_psnr(out, hr, mask)}
