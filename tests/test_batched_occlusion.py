"""Occlusion and degradation a batch at a time (prouigan.batched_occlusion) against the per-sample version:
the same kinds, coverage and placement in distribution (the random streams differ, so not the same pixels), and
exactly the same degradation of a given face."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prouigan.align import ffhq_quad, keypoints_from_68, source_to_output
from prouigan.batched_occlusion import degrade_batch, occlude_and_degrade, synthesize_batch
from prouigan.degradation import degrade
from prouigan.ibug import LEFT_EYE, MOUTH, RIGHT_EYE
from prouigan.occlusion import KINDS, synthesize
from prouigan.synthetic import synthetic_face


@pytest.fixture(scope="module")
def landmarks() -> torch.Tensor:
    """Aligned 128x128 landmarks of 32 synthetic faces (varied shapes and poses)."""
    out = []
    for seed in range(32):
        _, lm = synthetic_face(seed)
        out.append(source_to_output(lm, ffhq_quad(*keypoints_from_68(lm)), 128))
    return torch.tensor(np.array(out), dtype=torch.float32)


def _hits(mask: np.ndarray, point) -> bool:
    x, y = np.clip(np.round(point).astype(int), 0, mask.shape[0] - 1)
    return bool(mask[y, x] > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_hits_its_target_coverage_as_the_per_sample_version_does(kind, landmarks):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    has = torch.ones(len(landmarks), dtype=torch.bool)
    mask, fill, kinds = synthesize_batch(g, landmarks, has, (kind,), coverage=(0.1, 0.35))
    assert mask.shape == (32, 1, 128, 128) and fill.shape == (32, 3, 128, 128)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 <= fill.min() and fill.max() <= 1
    assert (kinds == KINDS.index(kind)).all()
    cov = mask.flatten(1).mean(1).numpy()
    rng = np.random.default_rng(0)
    ref = np.array([synthesize(rng, lm.numpy(), (kind,)).coverage for lm in landmarks])
    # targets are U(0.1, 0.35): mean 0.225, sd 0.072; both versions land there, face by face within a few %
    assert abs(cov.mean() - ref.mean()) < 0.03, (cov.mean(), ref.mean())
    assert abs(cov.std() - ref.std()) < 0.03, (cov.std(), ref.std())
    assert cov.min() > 0.05 and cov.max() < 0.45, (cov.min(), cov.max())


def test_the_face_aware_kinds_land_where_the_per_sample_ones_do(landmarks):
    """Sunglasses cover both eyes, a face mask the mouth: as often as the per-sample version's."""
    g = torch.Generator().manual_seed(1)
    has = torch.ones(len(landmarks), dtype=torch.bool)
    rng = np.random.default_rng(1)
    for kind, parts in (("sunglasses", (LEFT_EYE, RIGHT_EYE)), ("mask", (MOUTH,))):
        batched = synthesize_batch(g, landmarks, has, (kind,))[0][:, 0].numpy()
        per_sample = [synthesize(rng, lm.numpy(), (kind,)).mask for lm in landmarks]
        for masks in (batched, per_sample):
            rate = np.mean([all(_hits(m, lm[p].mean(0)) for p in parts)
                            for m, lm in zip(masks, landmarks.numpy(), strict=True)])
            assert rate >= 0.9, (kind, rate)


def test_kinds_are_drawn_uniformly_and_faces_without_landmarks_get_only_plain_kinds(landmarks):
    g = torch.Generator().manual_seed(2)
    lm = landmarks.repeat(8, 1, 1)  # 256 faces
    has = torch.arange(len(lm)) % 2 == 0
    _, _, kinds = synthesize_batch(g, lm, has, KINDS, coverage=(0.1, 0.2))
    face_aware = torch.tensor([KINDS.index(k) for k in ("sunglasses", "mask", "hand")])
    assert not torch.isin(kinds[~has], face_aware).any()
    counts = torch.bincount(kinds[has], minlength=len(KINDS)).float()
    assert (counts > 0).all() and counts.max() / counts.min() < 3, counts  # 128 draws over 7 kinds: ~18 each


def test_probability_zero_leaves_faces_clear_and_a_seed_repeats_itself(landmarks):
    has = torch.ones(len(landmarks), dtype=torch.bool)
    mask, _, kinds = synthesize_batch(torch.Generator().manual_seed(3), landmarks, has, probability=0.0)
    assert mask.sum() == 0 and (kinds == -1).all()
    a = synthesize_batch(torch.Generator().manual_seed(4), landmarks, has, ("rectangle", "sunglasses"))[0]
    b = synthesize_batch(torch.Generator().manual_seed(4), landmarks, has, ("rectangle", "sunglasses"))[0]
    assert torch.equal(a, b)


def test_batched_degradation_is_the_per_sample_one():
    hr = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(0)
    want = torch.stack([degrade(h, rng) for h in hr])
    assert torch.equal(degrade_batch(hr), want)  # no noise: the same pixels
    noisy = degrade_batch(hr, torch.Generator().manual_seed(6), noise_std=0.02)
    diff = (noisy - want)[(want > 0.1) & (want < 0.9)]  # away from the clamp
    assert abs(diff.std().item() - 0.02) < 0.002 and abs(diff.mean().item()) < 0.002


def test_a_clean_batch_becomes_a_training_batch(landmarks):
    hr = torch.rand(len(landmarks), 3, 128, 128, generator=torch.Generator().manual_seed(7))
    batch = {"hr": hr, "landmarks": landmarks, "has_landmarks": torch.ones(len(hr), dtype=torch.bool),
             "key": [str(i) for i in range(len(hr))]}
    out = occlude_and_degrade(batch, torch.Generator().manual_seed(8), ("rectangle",), (0.2, 0.2))
    assert out["lr"].shape == (len(hr), 3, 16, 16) and out["mask"].shape == (len(hr), 1, 128, 128)
    assert out["key"] == batch["key"] and torch.equal(out["hr"], hr)  # the target stays clean
    assert torch.allclose(out["mask"].flatten(1).mean(1), torch.full((len(hr),), 0.2), atol=0.01)
    # the lr is the degraded occluded face: unlike the clean face's where the occluder is, equal far from it
    clean_lr = degrade_batch(hr)
    near = torch.nn.functional.max_pool2d(out["mask"], 8) > 0  # (B, 1, 16, 16) lr pixels the occluder touches
    far = torch.nn.functional.max_pool2d(out["mask"], 40, stride=8, padding=16) == 0  # bicubic reach: 2 lr px
    diff = (out["lr"] - clean_lr).abs().amax(1, keepdim=True)
    assert far.any() and (diff[near] > 0).float().mean() > 0.9 and diff[far].max() < 1e-5
    untouched = occlude_and_degrade(batch, torch.Generator().manual_seed(8), ("rectangle",), probability=0.0)
    assert torch.equal(untouched["lr"], clean_lr) and untouched["mask"].sum() == 0


def test_faces_without_landmarks_stay_clear_when_every_kind_needs_landmarks(landmarks):
    """kinds = face-aware only, half the faces without landmarks: no error mid-run, those faces untouched."""
    has = torch.arange(len(landmarks)) % 2 == 0
    mask, _, kinds = synthesize_batch(torch.Generator().manual_seed(9), landmarks, has, ("sunglasses", "mask"))
    assert (kinds[~has] == -1).all() and mask[~has].sum() == 0
    assert (kinds[has] >= 0).all() and (mask[has].flatten(1).mean(1) > 0.05).all()
    with pytest.raises(ValueError, match="unknown occlusion kind"):
        synthesize_batch(torch.Generator(), landmarks, has, ("scarf",))
