"""Faults, second pass, on the real stack: a torn checkpoint at resume, the gate's evidence, a training that could
not read all of its data, credentials kept out of what the dashboard shows, two runs creating one experiment."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.stack


def _common(tmp: Path, name: str) -> list[str]:
    return ["-c", "smoke", f"data.output={tmp / 'ds'}", f"train.storage={tmp / 'ck'}", f"name={name}",
            f"tracking.experiment={name}", f"tracking.registered_model={name}"]


@pytest.fixture(scope="module")
def sharded(stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    out = run_cli(stack, "shard", *_common(tmp, "faults"))
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp


@pytest.mark.slow  # about a minute or more on 2 cores: `make test-slow` and CI
def test_a_resume_skips_a_torn_newest_checkpoint_and_says_so(stack, sharded):
    common = _common(sharded, "torn")
    out = run_cli(stack, "train", *common, "train.steps=4")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    newest = sharded / "ck" / "torn" / "step_0000004" / "state.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # a crash while it was written
    out = run_cli(stack, "train", *common, "train.steps=6")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "skipping the torn checkpoint" in log and "step_0000004" in log, log[-4000:]
    assert "resuming from" in log and "step_0000002" in log and "resumed from step 2" in log, log[-4000:]
    assert (sharded / "ck" / "torn" / "step_0000006" / "complete.json").exists()


def test_the_gate_refuses_the_train_split_and_too_few_faces(stack, sharded):
    common = _common(sharded, "gate-evidence")
    assert run_cli(stack, "train", *common, "train.steps=2").returncode == 0
    model = "models:/gate-evidence@challenger"
    out = run_cli(stack, "evaluate", *common, "--model", model, "--split", "train", "--promote")
    assert out.returncode == 2 and "train split cannot be the gate's evidence" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    out = run_cli(stack, "evaluate", *common, "eval.dlib=false", "eval.min_faces=1000", "--model", model, "--split",
                  "test", "--promote")
    assert "refused" in out.stdout and "too few to decide" in out.stdout, (out.stdout + out.stderr)[-3000:]
    client = mlflow.MlflowClient(stack.mlflow_uri)
    v = client.get_model_version_by_alias("gate-evidence", "challenger")
    assert client.get_model_version("gate-evidence", v.version).tags["gate.decision"] == "refused"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("gate-evidence", "champion")


@pytest.mark.slow  # about a minute or more on 2 cores: `make test-slow` and CI
def test_a_training_that_could_not_read_a_shard_registers_nothing_unless_told(stack, sharded, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(sharded / "ds", ds)
    manifest = json.loads((ds / "manifests" / "v0001.json").read_text())
    train_shards = [s["name"] for s in manifest["shards"] if s["split"] == "train"]
    (ds / "shards" / train_shards[0]).write_bytes(b"damaged")
    common = ["-c", "smoke", f"data.output={ds}", f"train.storage={tmp_path / 'ck'}", "tracking.experiment=partial",
              "tracking.registered_model=partial", "train.steps=6", "data.shard_max_samples=4"]
    out = run_cli(stack, "train", *common, "name=partial")
    log = out.stdout + out.stderr
    assert out.returncode == 1 and "trained on less than dataset" in log and train_shards[0] in log, log[-4000:]
    client = mlflow.MlflowClient(stack.mlflow_uri)
    assert not client.search_model_versions("name = 'partial'")
    run = client.search_runs([client.get_experiment_by_name("partial").experiment_id])[0]
    assert run.info.status == "FAILED" and train_shards[0] in run.data.tags["data_shards_skipped"]
    assert int(run.data.tags["data_shards_read"]) >= 1 and len(run.data.tags["data_shards_read_digest"]) == 16
    out = run_cli(stack, "train", *common, "name=partial-allowed", "train.allow_partial_data=true")
    assert out.returncode == 0 and "registered models:/partial/1" in out.stdout, (out.stdout + out.stderr)[-4000:]


def test_credentials_never_travel_in_a_jobs_runtime_env(stack, sharded):
    """The dashboard shows every job's runtime env: the S3 secret key and the MLflow password the stack's nodes
    hold are not in it."""
    out = run_cli(stack, "hello", "-c", "smoke", "tracking.experiment=no-secrets")
    assert out.returncode == 0, out.stderr[-3000:]
    token = stack.token_file.read_text().strip()
    req = urllib.request.Request(f"{stack.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        jobs = r.read().decode()
    for secret in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"):
        assert "MLFLOW_TRACKING_URI" in jobs and stack.env()[secret] not in jobs, secret


def test_two_runs_creating_one_experiment_at_once_both_get_it(stack, monkeypatch):
    """On a new server two runs starting together both find the experiment missing; the create that loses the race
    must read the winner's experiment, not fail the run (seen: two side-by-side trainings, one died)."""
    from prouigan_platform import tracking

    mlflow.set_tracking_uri(stack.mlflow_uri)
    name = f"race-{os.getpid()}"
    winner = mlflow.MlflowClient().create_experiment(name)  # the other run's create, just before ours
    real = mlflow.MlflowClient.get_experiment_by_name
    calls = []

    def stale_first(self, n):  # our first look happened before the other run's create
        calls.append(n)
        return None if len(calls) == 1 else real(self, n)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", stale_first)
    assert tracking.experiment_id(name) == winner and len(calls) == 2
