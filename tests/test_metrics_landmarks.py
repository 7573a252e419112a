"""Metrics agree with scikit-image; heatmaps round-trip through soft-argmax; NME."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from prouigan.landmarks import from_grid, heatmaps, nme, soft_argmax, to_grid
from prouigan.metrics import masked_psnr, psnr, ssim
from tests.conftest import aligned_faces


def _pairs():
    imgs, _ = aligned_faces(3, seed=2)
    rng = np.random.default_rng(0)
    for img in imgs:
        a = img.astype(np.float64) / 255
        b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
        yield a, b
        yield a, np.clip(a * 0.8 + 0.1, 0, 1)


def _t(x):
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def test_psnr_and_ssim_match_scikit_image():
    for a, b in _pairs():
        ref_p = peak_signal_noise_ratio(a, b, data_range=1.0)
        ref_s = structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
        assert abs(psnr(_t(a), _t(b)).item() - ref_p) < 1e-6
        assert abs(ssim(_t(a), _t(b)).item() - ref_s) < 1e-3


def test_ssim_of_identical_images_is_one_and_batches_are_independent():
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    y = x.clone()
    y[1] = torch.rand(3, 32, 32)
    s = ssim(x, y)
    assert s[0] == 1 and s[2] == 1 and s[1] < 0.5


def test_masked_psnr_only_counts_the_masked_pixels():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[:, :, :4] = 0.1  # error only in the top half
    top = torch.zeros(2, 8, 8)
    top[:, :4] = 1
    assert torch.allclose(masked_psnr(a, b, top), torch.full((2,), 20.0, dtype=torch.float64))
    assert masked_psnr(a, b, 1 - top).min() > 100  # no error where unmasked
    assert torch.isnan(masked_psnr(a, b, torch.zeros(2, 8, 8))).all()


def test_heatmaps_round_trip_through_soft_argmax():
    rng = np.random.default_rng(0)
    pts = torch.from_numpy(rng.uniform(16, 112, (2, 68, 2)))
    for res in (16, 32, 64):
        maps = heatmaps(pts, res, sigma=1.5)
        assert maps.shape == (2, 68, res, res) and maps.max() <= 1.0
        back = soft_argmax(maps)
        assert (back - pts).abs().max() < 0.15 * 128 / res
    assert torch.allclose(from_grid(to_grid(pts, 32), 32), pts)


def test_nme_is_inter_ocular_normalised():
    _, lms = aligned_faces(1, seed=3)
    gt = torch.from_numpy(lms)
    iod = (gt[0, 36] - gt[0, 45]).norm()
    assert nme(gt, gt).item() == 0
    shifted = gt + torch.tensor([3.0, 4.0])  # every point 5 px off
    assert abs(nme(shifted, gt).item() - 5 / iod.item()) < 1e-6
