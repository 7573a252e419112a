"""Evaluation streams a split batch by batch: the scores do not depend on the batch size, and the faces kept for the
report's picture stay a fixed few however many batches pass."""

from __future__ import annotations

import platform

import numpy as np
import psutil
import pytest
import torch

from prouigan import ProUIGANGenerator, generator_config
from prouigan.inference import Hallucinator
from prouigan.synthetic import synthetic_face, write_pts
from prouigan_platform.config import SourceConfig, load_config
from prouigan_platform.dataset.build import build_version
from prouigan_platform.dataset.sources import list_sources
from prouigan_platform.evaluation import evaluate, release_freed_memory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    src = tmp_path_factory.mktemp("faces") / "faces"
    src.mkdir()
    for i in range(30):
        img, lm = synthetic_face(500 + i)
        img.save(src / f"f{i:02d}.png")
        write_pts(src / f"f{i:02d}.pts", lm)
    data = load_config("smoke").data.model_copy(update={"sources": [SourceConfig(path=str(src))],
                                                        "val_fraction": 0.5})
    m = build_version(list_sources(data.sources), data, str(src.parent / "ds"), engine="plain").manifest
    assert m["counts"]["val"] >= 8
    return m["_uri"], data


def test_scores_do_not_depend_on_the_batch_size(dataset):
    uri, data = dataset
    torch.manual_seed(0)
    models = {"model": Hallucinator(ProUIGANGenerator(generator_config("tiny")))}
    whole = evaluate(models, uri, "val", data, use_dlib=False, batch_size=64, progress_every=None, cases=2)
    small = evaluate(models, uri, "val", data, use_dlib=False, batch_size=3, progress_every=None, cases=2)
    assert small.data.keys == whole.data.keys and len(whole.data.keys) == whole.data.expected
    for name in ("bicubic", "model"):
        a, b = whole.methods[name].per_face, small.methods[name].per_face
        assert set(a) == set(b) and "psnr" in a
        assert ("prior_nme" in a) == (name == "model")  # the model's own landmark prior; bicubic has none
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, equal_nan=True)
            assert len(b[k]) == len(whole.data.keys)
    # the report's faces: the same 2 best and 2 worst, one row each, whatever the batch size
    keys = lambda ev: [(kind, r["key"]) for kind, r, _ in ev.cases.rows()]  # noqa: E731
    assert keys(small) == keys(whole) and len(keys(small)) == 4
    assert all(r["hr"].shape == (1, 3, 128, 128) for _, r, _ in small.cases.rows())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's; elsewhere it is a no-op")
def test_memory_a_batch_freed_goes_back_to_the_os():
    """What made evaluation grow with the split: glibc keeps freed blocks below a live one, and only a trim hands
    their pages back."""
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    blocks = [bytearray(100_000) for _ in range(2000)]  # 200 MB in heap-sized blocks
    survivors = blocks[::50] + [blocks[-1]]  # a few live ones pin the heap, as a batch's leftovers do
    del blocks
    held = rss()
    release_freed_memory()
    assert held - rss() > 100 * 2**20, "the freed 200 MB stayed with the process"
    assert len(survivors) == 41
