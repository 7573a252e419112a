"""Faults, second pass: what a chaos test and a hostile neighbour found after the first lock-down, each probe and
each reading of the code as a test (docs/failure-modes.md has a row for each).  These need no stack; the ones that
do are in test_faults_stack.py, the chaos test in test_chaos.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prouigan_platform import storage
from tests.conftest import REPO
from tests.test_bad_input import _one_line_error, _run


@pytest.fixture()
def generator_file(tmp_path) -> Path:
    from prouigan import ProUIGANGenerator, generator_config
    from prouigan.inference import save_generator

    p = tmp_path / "generator.pt"
    save_generator(ProUIGANGenerator(generator_config("tiny")), p)
    return p


def _thumbs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            folder / f"t{i:03d}.png")
    return folder


@pytest.fixture()
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a disk that fills up for real (root only: skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'not root'}): the full-disk probe needs it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_hallucinate_onto_a_full_disk_is_one_line_and_leaves_no_temporary_file(generator_file, small_disk, tmp_path):
    thumbs = _thumbs(tmp_path / "in", 40)  # 40 faces of ~30 KB: more than 256 KiB
    out = _run("hallucinate", "--model", str(generator_file), "--input", str(thumbs), "--output",
               str(small_disk / "out"))
    _one_line_error(out, 1, "No space left on device")
    left = sorted(p.name for p in (small_disk / "out").iterdir())
    assert left and not [n for n in left if n.startswith("_tmp")], left  # whole files only
    for name in left:
        assert Image.open(small_disk / "out" / name).size == (128, 128)


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_a_manifest_that_is_not_json_is_one_line(command, generator_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not json")
    env = {k: "" for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    if command == "evaluate":
        out = _run("evaluate", "-c", "smoke", "--model", str(generator_file), "--data", str(bad), env=env)
    else:
        out = _run("train", "-c", "smoke", f"train.dataset={bad}", env=env)
    _one_line_error(out, 1, "is not a dataset manifest: not JSON")


def test_a_stack_record_with_fields_of_the_wrong_type_is_one_line(tmp_path):
    from prouigan_platform import stack as st

    st._save_state(st.StackSpec(state_dir=tmp_path), {"mlflow": st.ServiceRecord("mlflow", 1, 1.0, [5000], "x")})
    raw = json.loads((tmp_path / "stack.json").read_text())
    raw["services"]["mlflow"]["pid"] = "1"
    raw["spec"]["mlflow_port"] = [5000]
    (tmp_path / "stack.json").write_text(json.dumps(raw))
    out = _run("platform", "status", "--state-dir", str(tmp_path))
    _one_line_error(out, 1, "is not a stack record this version can read")


def test_the_stack_refuses_to_listen_beyond_loopback(tmp_path):
    t0 = time.time()
    out = _run("platform", "up", "--host", "0.0.0.0", "--state-dir", str(tmp_path))
    _one_line_error(out, 2, "--host 0.0.0.0", "loopback only")
    assert time.time() - t0 < 30 and not (tmp_path / "stack.json").exists()  # nothing was started


def test_restore_refuses_outputs_that_two_photos_would_share(generator_file, tmp_path):
    for name in ("a.jpg", "a_faces.jpg"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    out = _run("restore", str(tmp_path / "a.jpg"), str(tmp_path / "a_faces.jpg"), "--faces", "-o",
               str(tmp_path / "out"), "--model", str(generator_file))
    _one_line_error(out, 2, "a_faces.png", "a.jpg and", "a_faces.jpg")
    assert not (tmp_path / "out").exists()


def test_a_crafted_checkpoint_asking_for_a_huge_generator_is_one_line(tmp_path):
    from prouigan import ProUIGANGenerator, generator_config
    from prouigan.inference import generator_state

    state = generator_state(ProUIGANGenerator(generator_config("tiny")))
    state["generator_config"]["channels"] = [10_000_000, 16, 8]
    torch.save(state, tmp_path / "crafted.pt")
    thumbs = _thumbs(tmp_path / "in", 1)
    t0 = time.time()
    out = _run("hallucinate", "--model", str(tmp_path / "crafted.pt"), "--input", str(thumbs), "--output",
               str(tmp_path / "o"))
    _one_line_error(out, 1, "not a Pro-UIGAN generator checkpoint", "outside 1..2048")
    assert time.time() - t0 < 60


def test_a_fifo_and_a_link_to_a_device_among_the_photos_are_quarantined_not_read(tmp_path):
    from prouigan_platform.dataset.ingest import Quarantine, _read

    os.mkfifo(tmp_path / "blocks.jpg")  # open() on it would wait for a writer forever
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # and this one would never end
    for name in ("blocks.jpg", "zero.jpg"):
        t0 = time.time()
        with pytest.raises(Quarantine) as q:
            _read(str(tmp_path / name))
        assert q.value.reason == "not_a_regular_file" and time.time() - t0 < 5
    assert stat.S_ISFIFO(os.stat(tmp_path / "blocks.jpg").st_mode)


def test_every_image_mode_pil_writes_decodes_to_rgb_or_is_quarantined():
    """The conversion to RGB is inside the decoder's guard: whatever the mode, RGB or a quarantine, never a raise."""
    import io

    from prouigan_platform.dataset.ingest import Quarantine, decode_image

    seen = 0
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16",
                 "I;16B", "I;16L"):
        for fmt in ("TIFF", "PNG", "BMP", "PPM", "WEBP", "GIF"):
            buf = io.BytesIO()
            try:
                Image.new(mode, (160, 150)).save(buf, fmt)
            except (OSError, ValueError, KeyError):
                continue
            try:
                rgb, _ = decode_image(buf.getvalue())
            except Quarantine:
                continue
            seen += 1
            assert rgb.shape == (150, 160, 3) and rgb.dtype == np.uint8, (mode, fmt)
    assert seen > 20


@pytest.mark.stack
def test_the_s3_snapshot_keeps_keys_that_are_not_paths(tmp_path):
    """`platform down` keeps every key of the in-memory S3 server, '..', a leading '/', and 'a' beside 'a/b'
    included, and `up` puts each back under its own key."""
    from tests.conftest import own_stack

    keys = {"a": b"file a", "a/b": b"a/b under a", "../escape": b"dots", "/rooted": b"slash", "d/./e": b"dot"}
    with own_stack(tmp_path / "state", s3=True) as spec:
        client = storage.boto3_client()
        for k, v in keys.items():
            client.put_object(Bucket=spec.bucket, Key=k, Body=v)
        from prouigan_platform import stack as st

        st.down(spec.state_dir, log=lambda *_: None)
        assert not (tmp_path / "escape").exists() and not (tmp_path / "state" / "escape").exists()
        st.up(spec, log=lambda *_: None)
        for k, v in keys.items():
            assert client.get_object(Bucket=spec.bucket, Key=k)["Body"].read() == v, k


# ------------------------------------------------------------------------------------------------------- locks

def _take(args) -> bool:
    uri, = args
    from prouigan_platform.locks import Lock

    lock = Lock(uri, lease_s=60, purpose="race", heartbeat=False)
    ok = lock.acquire()
    if ok:
        time.sleep(0.5)  # hold it while the others try
    return ok


def test_taking_over_a_stale_local_lock_is_atomic(tmp_path):
    """Four processes find the same expired lock at once: exactly one takes it over."""
    from prouigan_platform.locks import Lock

    uri = str(tmp_path / "locks" / "race.lock")
    dead = Lock(uri, lease_s=0.2, purpose="dead holder", heartbeat=False)
    assert dead.acquire()
    time.sleep(0.5)  # its lease runs out; it never renews
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        won = pool.map(_take, [(uri,)] * 4)
    assert sum(won) == 1, won


def test_a_holder_whose_lease_ran_out_cannot_commit(tmp_path):
    """A shard run stalled past its lease (SIGSTOP, a long pause) while another took the lock: its commit is fenced:
    no shard moves, no manifest is written, one line says why."""
    from prouigan_platform.dataset import build
    from prouigan_platform.dataset import manifest as mf
    from prouigan_platform.locks import Lock, LockLost, dataset_lock

    root = str(tmp_path / "ds")
    stalled = dataset_lock(root)
    stalled.lease_s, stalled.heartbeat = 0.2, False
    assert stalled.acquire()
    time.sleep(0.5)
    successor = Lock(stalled.uri, lease_s=60, purpose="the successor", heartbeat=False)
    assert successor.acquire()
    tmp = build.write_tmp_shard(root, "s", "train", [{"key": "k1", "png": b"x", "meta": b"{}", "fingerprint": "f",
                                                      "input": "i"}], run=stalled.token)
    with pytest.raises(LockLost, match="lease ran out and it is now held by"):
        build.commit_version(root, None, {}, [], [], [], [{**tmp, "type": "shard"}], [], lock=stalled)
    assert mf.latest_version(root) == 0 and not storage.list_files(mf.shards_dir(root), ".tar")
    successor.check()  # the successor still holds it


def test_the_registry_lock_is_one_per_registry_whatever_the_storage_or_spelling(monkeypatch, tmp_path):
    """The lock is named by the registry's backend store, not by the address's spelling (here two spellings of one
    sqlite store; tests/test_retrain.py does it with two host names of one server) nor by a config's storage."""
    from prouigan_platform.config import load_config
    from prouigan_platform.locks import registry_lock, retrain_lock

    monkeypatch.setenv("PROUIGAN_STORE", str(tmp_path / "store"))
    (tmp_path / "sub").mkdir()
    one, same = f"sqlite:///{tmp_path}/registry.db", f"sqlite:///{tmp_path}/sub/../registry.db"
    a, b = registry_lock("prouigan", one), registry_lock("prouigan", same)
    other = registry_lock("prouigan", f"sqlite:///{tmp_path}/another.db")
    assert a.uri == b.uri != other.uri and a.uri.startswith(str(tmp_path / "store" / "locks"))
    # a recipe with its checkpoints elsewhere retrains and promotes the same model under the same locks
    load_config("smoke", ["train.storage=s3://bucket/ck"])
    assert retrain_lock("prouigan", same).uri == a.uri.replace("/registry-", "/retrain-")


def _training_state(step: int):
    from prouigan_platform.training.checkpoints import TrainingState

    return TrainingState(step=step, generator={"format": "prouigan-generator/1", "generator_config": {"x": 1},
                                               "generator": {"w": torch.zeros(1000)}},
                         d_global={}, d_local={}, optimizers={}, config={"name": "t"}, manifest_digest="abc")


def test_the_training_state_round_trips_reads_the_first_format_and_refuses_a_newer_one(tmp_path):
    from prouigan_platform.training import checkpoints

    folder = tmp_path / "step_0000003"
    folder.mkdir()
    checkpoints.write(folder, _training_state(3))
    back = checkpoints.load(str(folder))
    assert (back.step, back.manifest_digest, back.generator_raw) == (3, "abc", None)
    assert torch.equal(back.trained_weights["w"], torch.zeros(1000))
    old = {k: v for k, v in torch.load(folder / "state.pt", weights_only=True).items() if k != "training_format"}
    assert checkpoints.TrainingState.from_dict(old).step == 3  # format 1: the same keys, before the field
    with pytest.raises(checkpoints.CheckpointFormatError, match="has training format 3; this platform reads up to 2"):
        checkpoints.TrainingState.from_dict({**old, "training_format": 3}, "x/state.pt")
    with pytest.raises(checkpoints.CheckpointFormatError, match="not a Pro-UIGAN training checkpoint"):
        checkpoints.TrainingState.from_dict({"weights": 1}, "x/state.pt")


def test_a_torn_checkpoint_is_skipped_for_the_newest_complete_one(tmp_path):
    from prouigan_platform.training import checkpoints

    run = tmp_path / "ck" / "run"
    for step in (2, 4, 6):
        (run / f"step_{step:07d}").mkdir(parents=True)
        checkpoints.write(run / f"step_{step:07d}", _training_state(step))
    data = (run / "step_0000006" / "state.pt").read_bytes()
    (run / "step_0000006" / "state.pt").write_bytes(data[: len(data) // 2])  # a crash while writing
    (run / "step_0000004" / "complete.json").unlink()
    (run / "step_0000004" / "state.pt").write_bytes(b"PK\x03\x04 not a zip")  # torn before its record
    uri, skipped = checkpoints.newest_complete(str(run))
    assert uri.endswith("step_0000002") and checkpoints.load(uri).step == 2
    assert [Path(u).name for u, _ in skipped] == ["step_0000006", "step_0000004"]
    assert "do not match its record" in skipped[0][1] and "does not load" in skipped[1][1]


def test_served_models_are_code_not_pickles_and_registering_leaves_the_run_to_its_pipeline(generator_file, tmp_path,
                                                                                          monkeypatch):
    import mlflow

    from prouigan_platform.registry import log_and_register

    monkeypatch.setenv("PROUIGAN_STORE", str(tmp_path / "store"))  # the version's file record goes there
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.set_experiment("code")
    try:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        client = mlflow.MlflowClient()
        run = client.create_run(exp.experiment_id)  # a training's run, still RUNNING when its best is registered
        v = log_and_register(generator_file, run.info.run_id, "code-test")
        files = {p.name for p in Path(mlflow.artifacts.download_artifacts(f"models:/code-test/{v.version}")).rglob("*")}
        status = client.get_run(run.info.run_id).info.status
    finally:
        mlflow.set_tracking_uri(None)
    assert "serving.py" in files and "generator.pt" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert status == "RUNNING"  # its pipeline's run_scope ends it with the pipeline's outcome


def test_sigterm_ends_a_command_stopped_with_143(tmp_path):
    """A long command stopped by SIGTERM says so in one line and exits 143 (Ctrl-C: 130)."""
    code = ("import sys, time; sys.argv = ['prouigan', 'synth', '--out', sys.argv[1], '--count', '100000000'];"
            "from prouigan_platform.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 60
    while not list((tmp_path / "s").glob("*.png")) and time.time() < deadline:  # at work: faces being written
        time.sleep(0.2)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "Traceback" not in err, err[-2000:]


def test_a_crash_between_the_s3_snapshots_two_renames_restores_a_whole_snapshot(tmp_path):
    """`down` writes the new snapshot aside (s3.partial, its .snapshot.json last), moves the old one aside (s3.old),
    then renames the new one into place: whichever step a crash stops, the next `up` restores a whole snapshot."""
    from prouigan_platform.stack import _snapshot_dir

    old, partial = tmp_path / "s3.old", tmp_path / "s3.partial"
    old.mkdir()
    partial.mkdir()
    assert _snapshot_dir(tmp_path) == old  # the new one was not finished: the old one
    (partial / ".snapshot.json").write_text("{}")
    assert _snapshot_dir(tmp_path) == partial  # finished, not yet renamed: the new one
    (tmp_path / "s3").mkdir()
    assert _snapshot_dir(tmp_path) == tmp_path / "s3"
