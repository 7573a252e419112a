"""Nothing lost, on the stack a user runs by default (local-disk store, sqlite registry): MLflow killed with
SIGKILL in the middle of a training run costs no checkpoint and no restart, and after another SIGKILL the
registry still points only at artifacts that exist; a failed training ends FAILED; two shard runs on one
dataset make one version and the second is told who holds it.  The optional in-memory S3 server says, at the
next `up`, what a crash of it lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest

from prouigan_platform import stack as st
from tests.conftest import REPO, own_stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def durable_stack(tmp_path_factory):
    spec = st.StackSpec.on_free_ports(tmp_path_factory.mktemp("durable"), ray_num_cpus=4, object_store_mb=512)
    st.up(spec, log=lambda *_: None)
    saved = dict(os.environ)
    os.environ.update(spec.env())  # this test's MlflowClient logs in to this stack, not to the session's
    yield spec
    os.environ.clear()
    os.environ.update(saved)
    st.down(spec.state_dir, log=lambda *_: None)


def _env(spec) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "PROUIGAN_"))}
    return {**clean, **spec.env(), "PYTHONUNBUFFERED": "1"}


def _cli(spec, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prouigan_platform.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=_env(spec), timeout=timeout)


def _kill_service(spec, name: str) -> None:
    _, services = st.load_state(spec.state_dir)
    proc = st.alive(services[name])
    for p in [proc, *proc.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs([proc], timeout=10)


@pytest.mark.slow  # about a minute or more on 2 cores: `make test-slow` and CI
def test_mlflow_killed_mid_training_costs_no_checkpoint_and_the_registry_survives(durable_stack, tmp_path):
    spec = durable_stack
    store = Path(spec.store)
    common = ["-c", "smoke", f"data.output={store / 'ds-outage'}", f"train.storage={store / 'checkpoints'}",
              "name=outage", "tracking.experiment=outage",
              "train.num_workers=1", "train.steps=100000", "train.max_minutes=1.5", "train.val_every=10",
              "train.checkpoint_every=10", "train.keep_best=100"]
    assert _cli(spec, "shard", *common).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "prouigan_platform.cli", "train", *common], cwd=REPO,
                            env=_env(spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = store / "checkpoints" / "outage"
    deadline = time.time() + 240
    while not (run_dir / "step_0000020").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not (run_dir / "step_0000020").exists():
        proc.kill()
        raise AssertionError(f"no checkpoint appeared:\n{proc.communicate()[0][-5000:]}")
    _kill_service(spec, "mlflow")  # SIGKILL, mid-run
    killed_at = len(list(run_dir.glob("step_*")))
    time.sleep(15)  # an outage: the run goes on, its metrics wait in the worker
    lines: list[str] = []
    st.up(spec, log=lines.append)
    assert any("not stopped by `down`" in x for x in lines) and any("integrity check ok" in x for x in lines), lines
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-5000:]
    assert "registered models:/prouigan/" in log
    steps = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("step_*"))
    assert len(steps) > killed_at  # checkpoints kept coming during the outage
    reported = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    for r in reported:  # every checkpoint Ray Train acknowledged is on disk, whole
        assert (run_dir / r["checkpoint_dir_name"] / "state.pt").stat().st_size > 0
    client = mlflow.MlflowClient(spec.mlflow_uri)
    mv = client.get_model_version_by_alias("prouigan", "challenger")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    logged = {m.step for m in client.get_metric_history(mv.run_id, "val_psnr")}
    assert logged == set(steps), (sorted(logged), steps)  # metrics from the outage arrived afterwards

    _kill_service(spec, "mlflow")  # again, after the model was registered
    st.up(spec, log=lambda *_: None)
    client = mlflow.MlflowClient(spec.mlflow_uri)
    after = client.get_model_version_by_alias("prouigan", "challenger")
    assert after.version == mv.version
    os.environ.update(spec.env())
    model = mlflow.pyfunc.load_model("models:/prouigan@challenger")  # the registry points at files that exist
    assert model.predict(np.zeros((2, 16, 16, 3), np.uint8)).shape == (2, 128, 128, 3)


def test_a_training_that_fails_ends_failed_in_mlflow(durable_stack, tmp_path):
    spec = durable_stack
    ds = Path(spec.store) / "ds-broken"
    common = ["-c", "smoke", f"data.output={ds}", f"train.storage={Path(spec.store) / 'checkpoints'}", "name=broken",
              "tracking.experiment=broken",
              "train.num_workers=1", "train.steps=20", "train.max_failures=0"]
    assert _cli(spec, "shard", *common).returncode == 0
    for shard in (ds / "shards").glob("train-*.tar"):
        shard.write_bytes(b"not a tar")  # every train shard damaged: the workers have nothing to train on
    out = _cli(spec, "train", *common)
    assert out.returncode == 1, (out.stdout + out.stderr)[-3000:]
    assert "training failed" in out.stderr and "FAILED" in out.stderr
    client = mlflow.MlflowClient(spec.mlflow_uri)
    exp = client.get_experiment_by_name("broken")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags["error"]


def test_two_shard_runs_on_one_dataset_make_one_version(durable_stack, tmp_path):
    spec = durable_stack
    out_dir = tmp_path / "ds"
    args = ["shard", "-c", "smoke", "data.sources=[{kind: synthetic, count: 600}]", f"data.output={out_dir}"]
    procs = [subprocess.Popen([sys.executable, "-m", "prouigan_platform.cli", *args], cwd=REPO, env=_env(spec),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 3], [(r[0], r[2][-800:]) for r in results]
    busy = next(r for r in results if r[0] == 3)
    lines = busy[2].strip().splitlines()
    assert len(lines) == 1 and "is held by" in lines[0] and "shard into" in lines[0], busy[2]
    assert sorted(p.name for p in (out_dir / "manifests").iterdir()) == ["v0001.json"]
    m = json.loads((out_dir / "manifests" / "v0001.json").read_text())
    assert m["accepted"] == 600 and not (out_dir / "locks" / "shard.lock").exists()


def test_a_killed_s3_test_server_is_reported_at_the_next_up(tmp_path):
    """The in-memory S3 server is not the default; when it is used and killed, `up` says what was lost."""
    from prouigan_platform.storage import boto3_client

    with own_stack(tmp_path / "s3stack", s3=True) as spec:
        boto3_client().put_object(Bucket=spec.bucket, Key="kept.txt", Body=b"in the snapshot")
        st.down(spec.state_dir, log=lambda *_: None)
        st.up(spec, log=lambda *_: None)
        boto3_client().put_object(Bucket=spec.bucket, Key="lost.txt", Body=b"after the snapshot")
        _kill_service(spec, "s3")
        lines: list[str] = []
        st.up(spec, log=lines.append)
        assert any("LOST" in x and "s3" in x for x in lines), lines
        keys = [o["Key"] for o in boto3_client().list_objects_v2(Bucket=spec.bucket).get("Contents", [])]
        assert "kept.txt" in keys and "lost.txt" not in keys


def test_commands_find_the_stack_from_its_state_folder_alone(durable_stack):
    """A user's shell after `prouigan platform up`, with nothing exported: the command finds the stack (and its Ray
    token) through the state folder, before Ray reads its settings."""
    spec = durable_stack
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "PROUIGAN_"))}
    out = subprocess.run([sys.executable, "-m", "prouigan_platform.cli", "hello", "-c", "smoke",
                          "tracking.experiment=found"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**clean, "PROUIGAN_STATE_DIR": str(spec.state_dir)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "using the embedded stack" in out.stderr and "sum of squares = 140" in out.stdout

