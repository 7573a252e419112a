"""Tiny faces in photos: the detector, the five-point alignment, the training jitter, back-projection, and
`prouigan restore --upscale` on a photo of procedural faces whose squares are 16, 24, 32 and 64 px."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prouigan.align import (
    ffhq_quad,
    five_points_from_68,
    keypoints_from_68,
    quad_from_points,
    reframe,
    similarity_fit,
    source_to_output,
)
from prouigan.degradation import back_project, downsample
from prouigan.synthetic import synthetic_crowd, synthetic_face
from tests.conftest import REPO

SQUARES = [16, 24, 32, 64]
CROWD_SEED = 1  # YuNet finds all four of this photo's faces (at 16 px a cartoon face is at its limit)


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prouigan_platform.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _one_line(out: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[prouigan] using")]
    assert out.returncode == code, (out.returncode, out.stdout[-1500:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]


def _square(points68: np.ndarray) -> float:
    q = ffhq_quad(*keypoints_from_68(points68))
    return float(np.hypot(*(q[3] - q[0])))


@pytest.fixture(scope="module")
def crowd(tmp_path_factory) -> tuple[Path, np.ndarray, list[np.ndarray]]:
    img, points = synthetic_crowd(SQUARES, seed=CROWD_SEED)
    path = tmp_path_factory.mktemp("crowd") / "crowd.png"
    Image.fromarray(img).save(path)
    return path, img, points


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny generator whose output is loud noise: every pasted pixel visibly differs from the background."""
    from prouigan import ProUIGANGenerator, generator_config
    from prouigan.inference import save_generator

    torch.manual_seed(0)
    g = ProUIGANGenerator(generator_config("tiny"))
    with torch.no_grad():
        for stage in g.stages:
            stage.to_rgb.weight.mul_(30.0)
    p = tmp_path_factory.mktemp("model") / "loud.pt"
    save_generator(g, p)
    return p


def test_yunet_finds_faces_of_16_to_64_px_and_sizes_them(crowd):
    from prouigan_platform.detection import detect
    from prouigan_platform.restoring import faces_of

    _, img, points = crowd
    faces = faces_of(img, detect(img))
    assert len(faces) == len(SQUARES)
    for s, pts in zip(SQUARES, points, strict=True):
        assert abs(_square(pts) - s) < 0.5  # the photo is what it says
        centre = pts.mean(0)
        hit = [f for f in faces if f.detection.box[0] <= centre[0] <= f.detection.box[2]
               and f.detection.box[1] <= centre[1] <= f.detection.box[3]]
        assert len(hit) == 1, (s, [f.detection.box for f in faces])
        assert abs(hit[0].square / s - 1) < 0.3, (s, hit[0].square)
        assert hit[0].status == "restored" and 0.7 <= hit[0].detection.score <= 1


def test_a_face_mostly_outside_the_photo_is_skipped_with_the_reason_and_threads_are_given_back(crowd):
    from prouigan_platform.detection import detect
    from prouigan_platform.restoring import faces_of

    _, img, _ = crowd
    torch.set_num_threads(2)
    found = detect(img)
    assert torch.get_num_threads() == 2  # YuNet ran on one OpenMP thread; torch's count is back
    d = max(found, key=lambda d: d.width)
    width = img.shape[1]
    shift = width - d.points5[:, 0].min() + 2  # the face's points just past the right edge: its square is outside
    d.points5 = d.points5 + [shift, 0]
    d.box = d.box + [shift, 0, shift, 0]
    face = faces_of(img, [d])[0]
    assert face.status == "skipped" and "lies inside the photo" in face.reason


def test_nms_merges_the_same_face_found_twice_and_keeps_neighbours():
    from prouigan_platform.detection import nms

    boxes = np.array([[0, 0, 20, 24], [1, 1, 21, 25], [4, 5, 14, 16], [30, 0, 50, 24]], np.float64)
    keep = nms(boxes, np.array([0.9, 0.8, 0.95, 0.7]))
    # the small box inside the first is the same face (kept: the best score); the overlapping one goes; the
    # neighbour stays
    assert sorted(keep) == [2, 3]


def test_similarity_fit_recovers_a_known_similarity_and_the_template_fits_the_68_point_alignment():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    th = np.radians(17.0)
    a = 1.7 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    fit_a, fit_t = similarity_fit(src, src @ a.T + [3.0, -8.0])
    assert np.allclose(fit_a, a) and np.allclose(fit_t, [3.0, -8.0])
    # on faces, the square of the five points fitted to the template lands where the 68-point recipe puts it,
    # within a few pixels of the 128-px face
    for seed in range(8):
        _, lm = synthetic_face(seed)
        gt = ffhq_quad(*keypoints_from_68(lm))
        quad = quad_from_points(five_points_from_68(lm))
        corners = source_to_output(quad, gt, 128)
        expected = source_to_output(gt, gt, 128)
        assert np.abs(corners - expected).max() < 16, (seed, corners - expected)


def test_reframe_moves_the_face_and_its_landmarks_together():
    img, lm = synthetic_face(3)
    from prouigan.align import align

    a = align(img, *keypoints_from_68(lm), landmarks=lm)
    same, lm_same = reframe(a.image, a.landmarks, (0.0, 0.0), 1.0, 0.0)
    assert np.abs(same.astype(int) - a.image).mean() < 1.0 and np.allclose(lm_same, a.landmarks)
    moved, lm_moved = reframe(a.image, a.landmarks, (1.0, 0.5), 1.0, 0.0)  # the square 1 thumbnail px right
    assert np.allclose(lm_moved - a.landmarks, [-8.0, -4.0])  # the face moves 8 px left, 4 up in the 128 face
    assert np.abs(moved[20:108, 20:100].astype(int) - a.image[24:112, 28:108]).mean() < 2.0
    turned, lm_turned = reframe(a.image, a.landmarks, (0.0, 0.0), 1.2, 10.0)
    d = lm_turned[45] - lm_turned[36]  # outer eye corners: the eye line turns by -10 degrees, shrinks by 1.2
    d0 = a.landmarks[45] - a.landmarks[36]
    assert abs(np.degrees(np.arctan2(d[1], d[0]) - np.arctan2(d0[1], d0[0])) + 10) < 0.01
    assert abs(np.hypot(*d) * 1.2 - np.hypot(*d0)) < 1e-6


def test_training_faces_are_jittered_and_held_out_ones_are_not(tmp_path):
    import io

    from prouigan.align import align
    from prouigan_platform.config import load_config
    from prouigan_platform.dataset.reader import make_example

    cfg = load_config("cpu-mixed")
    assert cfg.data.align_jitter is not None and cfg.data.align_jitter.rotation_std > 0
    img, lm = synthetic_face(5)
    a = align(img, *keypoints_from_68(lm), landmarks=lm)
    buf = io.BytesIO()
    Image.fromarray(a.image).save(buf, format="PNG")
    sample = {"png": buf.getvalue(), "json": json.dumps({"key": "k", "landmarks68": a.landmarks.tolist()}).encode()}
    rng = np.random.default_rng(0)
    exact = make_example(sample, rng, cfg.data, augment=False)
    assert torch.allclose(exact["landmarks"], torch.from_numpy(a.landmarks.astype(np.float32)))
    assert cfg.data.align_jitter.probability == 0.5  # half the training faces, the recipes' choice
    moved = [make_example(sample, rng, cfg.data, augment=False, jitter=True)["landmarks"] for _ in range(40)]
    shifts = np.array([(m - exact["landmarks"]).mean(0).numpy() for m in moved])
    assert 0.25 < (np.abs(shifts) > 0.1).any(1).mean() < 0.75  # about half the draws move the face
    assert (np.abs(shifts) == 0).all(1).any()  # the others are the exact face
    assert np.abs(shifts).max() < 8 * 3 * 0.6 + 30  # within 3 sigma (plus what turning and scaling add)
    off = make_example(sample, rng, load_config("cpu-mixed-exact").data, augment=False, jitter=True)
    assert torch.allclose(off["landmarks"], exact["landmarks"])


def test_back_projection_makes_the_face_agree_with_what_the_photo_shows():
    torch.manual_seed(0)
    truth = torch.rand(2, 3, 32, 32)
    truth = torch.nn.functional.interpolate(truth, size=128, mode="bicubic").clamp(0, 1)
    observed = downsample(truth, 4)  # a 32-px face
    guess = torch.rand(2, 3, 128, 128)
    fixed = back_project(guess, observed, steps=10)
    before = (downsample(guess, 4) - observed).abs().mean()
    after = (downsample(fixed, 4) - observed).abs().mean()
    assert after < 0.2 * before
    assert (fixed - truth).abs().mean() < (guess - truth).abs().mean()


def test_the_cli_and_the_restorer_agree_on_the_largest_upscale():
    from prouigan_platform import cli, restoring

    assert cli.MAX_UPSCALE == restoring.MAX_UPSCALE == 8
    assert cli.FIDELITY == restoring.FIDELITY


def test_a_pasted_face_is_made_to_agree_with_the_photo_inside_its_mask_and_fidelity_blends_the_photo_back():
    from prouigan.align import paste_back
    from prouigan_platform.restoring import put_face, upscale_photo

    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).resize((40, 30), Image.BICUBIC))
    face = rng.integers(0, 256, (128, 128, 3), np.uint8)  # nothing like the photo
    quad = np.array([[8.0, 6], [8, 26], [28, 26], [28, 6]]) * 4  # a 20-px square, in the x4 output
    bg = upscale_photo(photo, 4)
    pasted = paste_back(bg, face, quad)
    mask = paste_back(np.zeros_like(bg), np.full_like(face, 255), quad)[..., 0] > 0

    def disagreement(out):  # the output reduced to the photo's size, against the photo, over the face's square
        small = torch.nn.functional.interpolate(torch.from_numpy(out).permute(2, 0, 1)[None].float(), size=(30, 40),
                                                mode="bicubic", antialias=True, align_corners=False)[0]
        return (small.permute(1, 2, 0).numpy() - photo)[8:24, 10:26].__abs__().mean()

    out = bg.copy()
    put_face(out, photo, face, quad, 4, back_projection=5)
    assert (out[~mask] == bg[~mask]).all()  # outside the face's mask: the upscaled photo, bit for bit
    assert disagreement(out) < 0.5 * disagreement(pasted)
    assert np.abs(out.astype(int) - bg)[mask].mean() > 5  # the face's detail stays
    half, whole = bg.copy(), bg.copy()
    put_face(half, photo, face, quad, 4, back_projection=0, fidelity=0.5)
    put_face(whole, photo, face, quad, 4, back_projection=0, fidelity=1.0)
    assert np.abs(whole.astype(int) - bg).max() <= 1  # all the photo: the upscaled photo back, to rounding
    expected = (pasted.astype(float) + bg) / 2
    assert np.abs(half - expected).max() <= 1
    with pytest.raises(ValueError, match="fidelity must be 0-1"):
        put_face(bg.copy(), photo, face, quad, 4, fidelity=1.5)


def _inside(points: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Which (N, 2) points lie inside the convex quadrilateral ``quad`` (4, 2)."""
    inside = np.ones(len(points), bool)
    sign = None
    for i in range(4):
        a, b = quad[i], quad[(i + 1) % 4]
        cross = (b[0] - a[0]) * (points[:, 1] - a[1]) - (b[1] - a[1]) * (points[:, 0] - a[0])
        s = np.sign(cross)
        sign = s if sign is None else sign
        inside &= (s == sign) | (s == 0)
    return inside


@pytest.fixture(scope="module")
def restored(crowd, model, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`prouigan restore crowd.png --upscale 3 --faces`, run once for the tests that read what it wrote."""
    out_dir = tmp_path_factory.mktemp("restored")
    out = _run("restore", str(crowd[0]), "-o", str(out_dir), "--model", str(model), "--upscale", "3", "--faces")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out, out_dir


@pytest.mark.cli
def test_restore_upscales_the_photo_and_pastes_every_face_back_only_inside_its_square(crowd, restored):
    from prouigan_platform.restoring import upscale_photo

    _, img, points = crowd
    out, out_dir = restored
    assert "x3: --upscale" in out.stdout and "4 face(s) restored" in out.stdout
    result = np.asarray(Image.open(out_dir / "crowd.png"))
    assert result.shape == (img.shape[0] * 3, img.shape[1] * 3, 3)
    record = json.loads((out_dir / "crowd.json").read_text())
    assert record["output_size"] == [img.shape[1] * 3, img.shape[0] * 3] and record["upscale"] == 3
    assert record["faces_found"] == record["faces_restored"] == 4 and record["detector"]["name"] == "yunet"
    assert record["fidelity"] == 0.5
    for f, s in zip(sorted(record["faces"], key=lambda f: f["square_px"]), SQUARES, strict=True):
        assert abs(f["square_px"] / s - 1) < 0.3 and f["square_px_in_output"] == pytest.approx(3 * f["square_px"], 0.01)
    for f in record["faces"]:
        assert f["status"] == "restored" and f["detector"] == "yunet" and len(f["points5"]) == 5
        assert len(f["box"]) == 4 and 0.7 <= f["score"] <= 1 and f["box_px"] > 0
    assert (out_dir / "crowd_faces.png").is_file()
    # the background is the bicubic upscale, bit for bit; what changed lies inside the faces' squares
    changed = np.abs(result.astype(int) - upscale_photo(img, 3, "bicubic")).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    pix = np.stack([xs + 0.5, ys + 0.5], 1)
    from prouigan_platform.detection import detect
    from prouigan_platform.restoring import faces_of

    quads = [f.quad * 3 for f in faces_of(img, detect(img))]
    assert np.any([_inside(pix, q) for q in quads], axis=0).all()
    for q in quads:  # every face was pasted
        assert _inside(pix, q).sum() > 0.2 * np.hypot(*(q[3] - q[0])) ** 2


@pytest.mark.cli
def test_the_demo_draws_bicubic_beside_restored_from_a_restore_record(crowd, restored, tmp_path):
    from prouigan_platform.commands.demo import before_after

    path, img, _ = crowd
    pic = np.asarray(Image.open(before_after(path, restored[1], tmp_path / "pair.png")))
    h, w = img.shape[0] * 3, img.shape[1] * 3
    assert pic.shape == (min(400, h), 2 * min(720, w) + 8, 3)
    left, right = pic[:, :min(720, w)], pic[:, -min(720, w):]
    assert 0.02 < np.abs(left.astype(int) - right).sum(-1).astype(bool).mean() < 0.9  # the faces differ


@pytest.mark.cli
def test_restore_chooses_the_upscale_from_the_faces_and_says_why(crowd, model, tmp_path):
    path, img, _ = crowd
    out = _run("restore", str(path), "-o", str(tmp_path), "--model", str(model))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    record = json.loads((tmp_path / "crowd.json").read_text())
    # the median square (~28 px) brought near 128: x4 or x5
    assert record["upscale"] in (4, 5) and "median face" in record["upscale_why"]
    assert f"x{record['upscale']}: the median face's square is" in out.stdout


@pytest.mark.cli
def test_restore_refuses_bad_requests_in_one_line_and_writes_nothing(crowd, model, tmp_path):
    path, _, _ = crowd
    base = ["restore", str(path), "-o", str(tmp_path / "o"), "--model", str(model)]
    _one_line(_run(*base, "--upscale", "0"), 2, "--upscale", "must be 1-8")
    _one_line(_run(*base, "--upscale", "twice"), 2, "--upscale", "expected 'auto'")
    _one_line(_run(*base, "--detector", "retinaface"), 2, "--detector", "invalid choice")
    _one_line(_run(*base, "--upscale", "8", "--max-megapixels", "0.5"), 2, "over the 0.5-megapixel cap")
    _one_line(_run(*base, "--detector", "dlib", "--threshold", "0.5"), 2, "--threshold")
    _one_line(_run(*base, "--fidelity", "1.5"), 2, "--fidelity", "must be 0-1")
    _one_line(_run(*base, "--fidelity", "0.5", "--thumbnail-only"), 2, "--thumbnail-only uses none")
    assert not (tmp_path / "o").exists()
    Image.new("RGB", (120, 90), (90, 120, 200)).save(tmp_path / "wall.png")
    out = _run("restore", str(tmp_path / "wall.png"), "-o", str(tmp_path / "o"), "--model", str(model))
    assert out.returncode == 1 and "wall.png: no face found by yunet" in out.stderr and "Traceback" not in out.stderr
    assert not any((tmp_path / "o").iterdir())


@pytest.mark.cli
def test_dlib_landmarks_place_the_faces_yunet_found(crowd, model, tmp_path):
    pytest.importorskip("dlib", reason="--landmarks dlib needs the eval extra")
    from prouigan_platform.detection import detect

    path, img, points = crowd
    plain, refined = detect(img), detect(img, landmarks="dlib")
    assert [d.box.tolist() for d in plain] == [d.box.tolist() for d in refined]  # the same faces
    assert all(d.landmarks68 is not None and d.landmarks68.shape == (68, 2) for d in refined)
    for d in refined:  # dlib's points lie on the face YuNet found
        centre = d.landmarks68.mean(0)
        assert d.box[0] <= centre[0] <= d.box[2] and d.box[1] <= centre[1] <= d.box[3]
    out = _run("restore", str(path), "-o", str(tmp_path), "--model", str(model), "--landmarks", "dlib",
               "--upscale", "2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    record = json.loads((tmp_path / "crowd.json").read_text())
    assert record["detector"]["landmarks"] == "dlib-68"
    assert {f["landmarks"] for f in record["faces"]} == {"dlib-68"} and record["faces_restored"] == 4
