"""Every bad input gets one line on stderr and an exit code, never a traceback, and loses nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prouigan_platform import stack as st
from tests.conftest import REPO


def _run(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prouigan_platform.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _one_line_error(out: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[prouigan] using")]
    assert out.returncode == code, (out.returncode, out.stdout[-1500:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and " error: " in lines[0], out.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def thumbs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("thumbs")
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"t{i}.png")
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real (tiny, untrained) generator checkpoint file."""
    from prouigan import ProUIGANGenerator, generator_config
    from prouigan.inference import save_generator

    p = tmp_path_factory.mktemp("model") / "generator.pt"
    save_generator(ProUIGANGenerator(generator_config("tiny")), p)
    return p


def test_a_text_file_as_the_model(thumbs, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    out = _run("hallucinate", "--model", str(text), "--input", str(thumbs), "--output", str(tmp_path / "o"))
    _one_line_error(out, 1, "not a Pro-UIGAN generator checkpoint")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_batch_size_below_one(thumbs, checkpoint, tmp_path, value):
    out = _run("hallucinate", "--model", str(checkpoint), "--input", str(thumbs), "--output", str(tmp_path / "o"),
               "--batch-size", value)
    _one_line_error(out, 2, "--batch-size", "at least 1")


def test_two_inputs_with_the_same_stem_are_refused_not_overwritten(checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(src / "face.png")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(src / "face.jpg")
    out = _run("hallucinate", "--model", str(checkpoint), "--input", str(src), "--output", str(tmp_path / "o"))
    _one_line_error(out, 2, "face.jpg and face.png", "rename one")
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_file_or_the_input_folder(thumbs, checkpoint, tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    _one_line_error(_run("hallucinate", "--model", str(checkpoint), "--input", str(thumbs), "--output", str(f)),
                    1, "is a file")
    _one_line_error(_run("hallucinate", "--model", str(checkpoint), "--input", str(thumbs), "--output",
                         str(thumbs)), 1, "is the input folder")
    assert sorted(p.name for p in thumbs.iterdir()) == ["t0.png", "t1.png"]


def test_cuda_asked_for_on_a_machine_without_it(thumbs, checkpoint, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = _run("hallucinate", "--model", str(checkpoint), "--input", str(thumbs), "--output", str(tmp_path / "o"),
               "--device", "cuda")
    _one_line_error(out, 2, "--device cuda", "no CUDA")


def test_config_on_a_binary_file(tmp_path):
    f = tmp_path / "weights.yaml"
    f.write_bytes(bytes(range(256)) * 8)
    _one_line_error(_run("config", "-c", str(f)), 2, "not a text file")


@pytest.mark.parametrize("name", ["a/b", "it's", "two words", "../up"])
def test_a_run_name_that_cannot_be_a_folder(name):
    _one_line_error(_run("config", "-c", "smoke", f"name={name}"), 2, "config key 'name'", "run name")


def test_synth_with_a_negative_count(tmp_path):
    _one_line_error(_run("synth", "--count", "-5", "--out", str(tmp_path / "s")), 2, "--count", "at least 1")
    assert not (tmp_path / "s").exists()


def test_a_corrupt_stack_record(tmp_path):
    (tmp_path / "stack.json").write_text('{"spec": {"state_dir": ')
    out = _run("platform", "status", "--state-dir", str(tmp_path))
    _one_line_error(out, 1, "stack.json", "not a stack record")
    out = _run("platform", "env", "--state-dir", str(tmp_path))
    _one_line_error(out, 1, "stack.json")


def test_restore_with_a_thumbnail_that_is_not_an_image(checkpoint, tmp_path):
    pytest.importorskip("dlib", reason="restore needs the eval extra")
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 64)).save(photo)
    bad = tmp_path / "thumb.png"
    bad.write_text("not an image")
    out = _run("restore", str(photo), "-o", str(tmp_path / "o"), "--model", str(checkpoint), "--thumbnail", str(bad))
    _one_line_error(out, 2, "--thumbnail", "not a readable image")


@pytest.mark.stack
def test_evaluate_a_version_that_does_not_exist_and_restore_with_no_champion(stack, tmp_path):
    pytest.importorskip("dlib", reason="restore needs the eval extra")
    env = stack.env()
    out = _run("evaluate", "-c", "smoke", "--model", "models:/no-such-model/3", "--data", str(tmp_path / "m.json"),
               env=env)
    _one_line_error(out, 1, "models:/no-such-model/3", "not in the registry")
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 64)).save(photo)
    out = _run("restore", str(photo), "-o", str(tmp_path / "o"), "--model", "models:/never-registered@champion",
               env=env)
    _one_line_error(out, 1, "models:/never-registered@champion", "not in the registry")


def test_degenerate_landmarks_and_a_100_megapixel_image_are_quarantined(tmp_path):
    """All 68 points equal would break the alignment (a singular transform): the input is quarantined with its
    reason; an image of 100+ megapixels is refused from its header, before anything decodes it."""
    from prouigan.synthetic import synthetic_face, write_pts
    from prouigan_platform.config import SourceConfig, load_config
    from prouigan_platform.dataset.build import build_version
    from prouigan_platform.dataset.sources import list_sources

    src = tmp_path / "faces"
    src.mkdir()
    img, lm = synthetic_face(3)
    img.save(src / "good.png")
    write_pts(src / "good.pts", lm)
    img.save(src / "flat.png")
    write_pts(src / "flat.pts", np.full_like(lm, 60.0))
    Image.new("1", (10_001, 10_001)).save(src / "huge.png")  # 100.02 MP, a few KB on disk
    write_pts(src / "huge.pts", lm)
    data = load_config("smoke").data.model_copy(update={"sources": [SourceConfig(path=str(src))]})
    m = build_version(list_sources(data.sources), data, str(tmp_path / "ds"), engine="plain").manifest
    reasons = {q["input"].rsplit("_", 1)[-1]: (q["reason"], q["detail"]) for q in m["quarantine"]}
    assert reasons["flat"][0] == "bad_landmarks" and "degenerate" in reasons["flat"][1]
    assert reasons["huge"][0] == "image_too_large" and "10001x10001" in reasons["huge"][1]
    assert m["accepted"] == 1
    json.dumps(m)  # the manifest stays plain JSON


def test_unreadable_source_is_a_clear_error(tmp_path):
    for path in (tmp_path / "missing", tmp_path / "file.txt"):
        if path.suffix:
            path.write_text("x")
        out = subprocess.run([sys.executable, "pipelines/shard.py", "--local", "--config", "smoke",
                              f"data.sources=[{{kind: 300w, path: {path}}}]", f"data.output={tmp_path / 'o'}"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 1
        assert str(path) in out.stderr and ("does not exist" in out.stderr or "not a folder" in out.stderr)


def test_a_taken_port_gives_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "prouigan_platform.cli", "platform", "up", "--s3",
                              "--state-dir", str(tmp_path), "--s3-port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"port {port}" in out.stderr and "already in use" in out.stderr
    assert not any(r["running"] for r in st.status(tmp_path))


def test_a_full_disk_inside_a_ray_task_is_the_machines_error_not_a_bug():
    """Ray sends a task's error back as text (RayTaskError(UserCodeException)); the chaos test found a shard run on
    a full disk ending in a traceback.  The disk's errno is read from the cause chain or, failing that, the text."""
    from prouigan_platform.cli import _expected, _message

    class RayTaskError(Exception):  # the name Ray's driver-side class carries; the chain is lost on the way
        pass

    remote = RayTaskError("ray::MapBatches(_ingest_batch)() (pid=1, ip=127.0.0.1)\n  File \"storage.py\", line 75\n"
                          "OSError: [Errno 28] No space left on device\n\nUDF failed to process a data block.")
    assert _expected(remote) == 1 and _message(remote) == "No space left on device"
    chained = RuntimeError("wrapped")
    chained.__cause__ = OSError(28, "No space left on device", "/data/x.tar")
    assert _expected(chained) == 1 and _message(chained) == "No space left on device: /data/x.tar"
    assert _expected(RayTaskError("ValueError: [Errno 2] a bug")) is None  # not a machine errno: still a bug
    assert _expected(RuntimeError("a bug")) is None


def test_judges_train_without_a_judge_with_no_time_or_on_a_folder_that_is_not_a_parsing_folder(tmp_path):
    env = {"PROUIGAN_STATE_DIR": str(tmp_path / "state")}
    _one_line_error(_run("judges", "train", env=env), 2, "required: kind")
    _one_line_error(_run("judges", "train", "parser", "--minutes", "0", env=env), 2, "must be above 0")
    _one_line_error(_run("judges", "train", "parser", "--parsing", str(tmp_path), "--steps", "1", env=env), 2,
                    "is not a parsing folder")
    assert not (tmp_path / "state" / "store" / "judges").exists()  # nothing half-written


def test_a_fifo_among_the_inputs_is_refused_at_once_not_read_forever(thumbs, checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in thumbs.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    os.mkfifo(src / "x.png")  # opening it for reading would block until a writer comes
    out = _run("hallucinate", "--model", str(checkpoint), "--input", str(src), "--output", str(tmp_path / "o"),
               timeout=60)
    _one_line_error(out, 2, "x.png is a FIFO, not a regular file")
    assert not (tmp_path / "o").exists()
    out = _run("restore", str(src / "x.png"), "-o", str(tmp_path / "r"), "--model", str(checkpoint), timeout=60)
    _one_line_error(out, 2, "x.png is a FIFO, not a regular file")


def test_a_photo_of_more_than_100_megapixels_is_refused_from_its_header(checkpoint, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (10_001, 10_001)).save(huge)  # 100.02 MP, a few KB on disk
    out = _run("restore", str(huge), "-o", str(tmp_path / "r"), "--model", str(checkpoint), "--upscale", "1",
               "--max-megapixels", "1000")
    _one_line_error(out, 2, "10001x10001 pixels", "refused before decoding")
    assert not (tmp_path / "r").exists()
