"""Occlusion kinds honour their coverage and seeds; degradation matches Pillow; alignment geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prouigan.align import align, keypoints_from_68, output_to_source, source_to_output
from prouigan.degradation import degrade, downsample, jpeg_roundtrip
from prouigan.occlusion import KINDS, NEEDS_LANDMARKS, seed_from_key, synthesize
from tests.conftest import aligned_faces


@pytest.fixture(scope="module")
def faces():
    return aligned_faces(4, seed=1)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_hits_the_coverage_it_promises(kind, faces):
    _, lms = faces
    lo, hi = 0.1, 0.35
    for seed in range(25):
        occ = synthesize(seed, lms[seed % len(lms)], kinds=[kind], coverage=(lo, hi))
        assert occ.kind == kind
        assert abs(occ.coverage - occ.target) <= 0.04, (seed, occ.coverage, occ.target)
        assert lo - 0.04 <= occ.coverage <= hi + 0.04
        assert occ.mask.shape == (128, 128) and set(np.unique(occ.mask)) <= {0.0, 1.0}
        assert occ.fill.shape == (128, 128, 3) and 0 <= occ.fill.min() and occ.fill.max() <= 1


def test_face_aware_kinds_cover_their_part_of_the_face(faces):
    _, lms = faces
    lm = lms[0]
    eyes = np.concatenate([lm[36:48]]).round().astype(int)
    mouth = lm[48:68].round().astype(int)
    for seed in range(10):
        m = synthesize(seed, lm, kinds=["sunglasses"], coverage=(0.1, 0.2)).mask
        assert m[eyes[:, 1], eyes[:, 0]].mean() > 0.8
        m = synthesize(seed, lm, kinds=["mask"], coverage=(0.15, 0.3)).mask
        assert m[mouth[:, 1], mouth[:, 0]].mean() > 0.8


def test_same_seed_same_occlusion_other_seed_other_occlusion(faces):
    _, lms = faces
    a, b = synthesize(123, lms[0]), synthesize(123, lms[0])
    assert a.kind == b.kind and np.array_equal(a.mask, b.mask) and np.array_equal(a.fill, b.fill)
    masks = {synthesize(s, lms[0]).mask.tobytes() for s in range(10)}
    assert len(masks) == 10
    assert seed_from_key("helen_1") == seed_from_key("helen_1") != seed_from_key("helen_2")


def test_face_aware_kinds_need_landmarks():
    assert {synthesize(s, None).kind for s in range(40)}.isdisjoint(NEEDS_LANDMARKS)
    with pytest.raises(ValueError, match="need landmarks"):
        synthesize(0, None, kinds=["sunglasses"])
    with pytest.raises(ValueError, match="unknown occlusion kind"):
        synthesize(0, None, kinds=["laser"])


def test_apply_replaces_exactly_the_masked_pixels(faces):
    imgs, lms = faces
    img = imgs[0].astype(np.float32) / 255
    occ = synthesize(5, lms[0])
    out = occ.apply(img)
    m = occ.mask.astype(bool)
    assert np.array_equal(out[~m], img[~m]) and np.allclose(out[m], occ.fill[m])


def test_downsample_matches_pillow_bicubic(faces):
    imgs, _ = faces
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((128, 128),
                                                                                                 Image.BICUBIC))
    for img in [*imgs, smooth]:
        ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.BICUBIC)).astype(np.float32) / 255
        ours = downsample(torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255).permute(1, 2, 0).numpy()
        diff = np.abs(ours - ref)
        assert diff.max() <= 3 / 255 and diff.mean() <= 0.6 / 255, (diff.max() * 255, diff.mean() * 255)


def test_degrade_noise_and_jpeg_are_seeded():
    hr = torch.rand(3, 128, 128)
    a = degrade(hr, np.random.default_rng(1), noise_std=0.05, jpeg_quality=50)
    b = degrade(hr, np.random.default_rng(1), noise_std=0.05, jpeg_quality=50)
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, degrade(hr, np.random.default_rng(2), noise_std=0.05, jpeg_quality=50))
    assert (jpeg_roundtrip(a, 95) - a).abs().mean() < 0.05


def test_alignment_puts_eyes_above_nose_above_mouth_inside_the_image(faces):
    _, lms = faces
    for lm in lms:
        assert (lm >= 0).all() and (lm <= 127).all()
        eyes_y, nose_y, mouth_y = lm[36:48, 1].mean(), lm[30, 1], lm[48:68, 1].mean()
        assert eyes_y < nose_y < mouth_y
        assert lm[36:42, 0].mean() < lm[42:48, 0].mean()  # image-left eye on the left
        # FFHQ square: eyes level and near a fixed height
        assert abs(lm[36:42, 1].mean() - lm[42:48, 1].mean()) < 6
        assert 35 < eyes_y < 65


def test_alignment_transform_inverts_and_pads_outside_the_photo():
    rng = np.random.default_rng(0)
    photo = (rng.random((100, 120, 3)) * 255).astype(np.uint8)
    lm = np.array([[20.0, 30.0], [60.0, 32.0], [25.0, 70.0], [58.0, 71.0]])
    a = align(photo, lm[0], lm[1], lm[2], lm[3], landmarks=lm)
    back = output_to_source(source_to_output(lm, a.quad, 128), a.quad, 128)
    assert np.allclose(back, lm, atol=1e-6)
    assert a.padded and a.image.shape == (128, 128, 3)
    corner = a.image[:8, :8].astype(float)  # outside the photo: reflected, blurred, faded to the median
    assert corner.mean() > 60 and corner.std() < 40
    # a face whose eyes/mouth are the 68-point means gives the same square
    lm68 = np.zeros((68, 2))
    lm68[36:42], lm68[42:48], lm68[48], lm68[54] = lm[0], lm[1], lm[2], lm[3]
    assert np.allclose(align(photo, *keypoints_from_68(lm68)).quad, a.quad)



def test_every_occlusion_kind_has_one_drawing_in_each_implementation_checked_at_import(monkeypatch):
    """A kind added to the vocabulary alone fails when the implementations are imported, naming it (it used to fall
    through an if-chain and draw hands)."""
    import prouigan.vocabulary as vocabulary
    from prouigan import batched_occlusion, occlusion

    assert set(occlusion.DRAW) == set(batched_occlusion.DRAW) == set(vocabulary.OCCLUSION_KINDS)
    monkeypatch.setattr(vocabulary, "OCCLUSION_KINDS", (*vocabulary.OCCLUSION_KINDS, "scarf"))
    for module in (occlusion, batched_occlusion):
        with pytest.raises(ImportError, match=r"occlusion kinds without a drawing: \['scarf'\]"):
            vocabulary.check_kinds(module.DRAW, module.__name__)
