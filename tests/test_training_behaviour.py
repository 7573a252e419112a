"""Behaviour: the cpu-small generator, trained adversarially for a few hundred steps on a handful of
occluded faces, cuts its pixel and heatmap losses and beats bicubic PSNR on those faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prouigan import LossWeights, ProUIGANGenerator, build_discriminators, generator_config
from prouigan.degradation import degrade, upsample_bicubic
from prouigan.metrics import psnr
from prouigan.occlusion import synthesize
from prouigan.training import GANStep
from tests.conftest import aligned_faces

STEPS = 100  # ~2 minutes on 2 cores


def _batch(n: int = 8) -> dict:
    imgs, lms = aligned_faces(n, seed=7)
    hr, lr = [], []
    for i, (img, lm) in enumerate(zip(imgs, lms, strict=True)):
        x = img.astype(np.float32) / 255
        occ = synthesize(i, lm, coverage=(0.1, 0.25))
        hr.append(torch.from_numpy(x).permute(2, 0, 1))
        lr.append(degrade(torch.from_numpy(occ.apply(x)).permute(2, 0, 1), np.random.default_rng(i)))
    return {"hr": torch.stack(hr), "lr": torch.stack(lr), "landmarks": torch.from_numpy(lms).float(),
            "has_landmarks": torch.ones(n, dtype=torch.bool)}


@pytest.mark.slow  # ~1 minute of training on 2 cores
def test_cpu_small_learns_a_handful_of_faces_and_beats_bicubic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    batch = _batch()
    g = ProUIGANGenerator(generator_config("cpu-small"))
    d_g, d_l = build_discriminators("cpu-small")
    trainer = GANStep(g, d_g, d_l, LossWeights(pixel=1.0, heatmap=0.1, adversarial=1e-3), lr_g=2e-3, lr_d=1e-4)
    logs = [{k: float(v) for k, v in trainer.step(batch).items()} for _ in range(STEPS)]
    first = {k: np.mean([lg[k] for lg in logs[:5]]) for k in ("pixel", "heatmap")}
    last = {k: np.mean([lg[k] for lg in logs[-5:]]) for k in ("pixel", "heatmap")}
    assert last["pixel"] < 0.4 * first["pixel"], (first, last)
    assert last["heatmap"] < 0.6 * first["heatmap"], (first, last)
    assert all(np.isfinite(lg["d_global"]) and np.isfinite(lg["d_local"]) for lg in logs)
    g.eval()
    with torch.no_grad():
        ours = psnr(g(batch["lr"]).final.clamp(0, 1), batch["hr"]).mean().item()
    bicubic = psnr(upsample_bicubic(batch["lr"]), batch["hr"]).mean().item()
    assert ours > bicubic + 1.5, (ours, bicubic)
