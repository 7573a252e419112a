"""Procedural sample faces: deterministic, with plausible iBUG-68 geometry, written in 300-W layout."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from prouigan.synthetic import synthetic_face
from tests.conftest import REPO, read_pts


def test_same_seed_same_face_other_seed_other_face():
    a, la = synthetic_face(7)
    b, lb = synthetic_face(7)
    c, _ = synthetic_face(8)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(la, lb)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_landmarks_are_inside_and_ordered():
    for seed in range(20):
        img, lm = synthetic_face(seed)
        w, h = img.size
        assert lm.shape == (68, 2) and (lm[:, 0] > 0).all() and (lm[:, 0] < w).all() and (lm[:, 1] < h).all()
        assert lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean() < lm[8, 1]
        assert lm[36:42, 0].mean() < lm[27, 0] < lm[42:48, 0].mean()


def test_synth_command_writes_a_300w_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "prouigan_platform.cli", "synth", "--out", str(tmp_path),
                          "--count", "3"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 3
    _, lm = synthetic_face(0)
    assert np.allclose(read_pts(pngs[0].with_suffix(".pts")), lm, atol=1e-3)
