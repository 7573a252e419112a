"""Training on the real stack: a 2-worker Ray Train run (DDP over gloo) on shards in the S3 bucket, checkpoints
in the bucket, MLflow tracking, a registered pyfunc version with alias `challenger`, resume by re-running the
same name, and `prouigan hallucinate` on the registered model."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from PIL import Image

from prouigan_platform.config import load_config
from prouigan_platform.storage import boto3_client
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.stack


def _cli(stack, *args: str, timeout: int = 900):
    return run_cli(stack, *args, timeout=timeout)


@pytest.fixture(scope="module")
def trained(stack):
    b = stack.bucket
    common = ["-c", "smoke", f"data.output=s3://{b}/datasets/train-test", f"train.storage=s3://{b}/checkpoints",
              "name=train-test", "tracking.experiment=train-test", "train.num_workers=2"]
    out = _cli(stack, "shard", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _cli(stack, "train", *common, "train.steps=4")
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return stack, common, out.stdout + out.stderr


def test_two_workers_train_register_and_store_in_the_bucket(trained):
    stack, _, log = trained
    assert "world_rank=1" in log and "registered models:/prouigan/" in log
    client = mlflow.MlflowClient(stack.mlflow_uri)
    mv = client.get_model_version_by_alias("prouigan", "challenger")
    run = client.get_run(mv.run_id)
    assert run.data.params["model.preset"] == "tiny" and run.data.tags["data_manifest_digest"]
    assert {"val_psnr", "val_ssim", "val_psnr_occluded", "val_nme", "samples_per_s"} <= set(run.data.metrics)
    assert run.data.tags["best_checkpoint"].startswith(f"s3://{stack.bucket}/checkpoints/train-test/step_")
    keys = [o["Key"] for page in boto3_client().get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
            for o in page.get("Contents", [])]
    assert any(k.startswith("checkpoints/train-test/step_0000004/") and k.endswith("state.pt") for k in keys)
    exp = run.info.experiment_id
    assert any(k.startswith(f"mlflow-artifacts/{exp}/") and k.endswith("generator.pt") for k in keys)
    # the val grids, one per validation, browsable by step on the run page (MLflow images)
    assert any(k.startswith(f"mlflow-artifacts/{exp}/") and "/images/val_grid+step+" in k for k in keys)
    # the registered pyfunc answers for batch sizes other than the example's
    os.environ.update(stack.env())
    model = mlflow.pyfunc.load_model("models:/prouigan@challenger")
    for n in (1, 5):
        out = model.predict(np.random.default_rng(n).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8))
        assert out.shape == (n, 128, 128, 3) and out.dtype == np.uint8


def test_rerunning_the_same_name_resumes_from_the_latest_checkpoint(trained):
    stack, common, _ = trained
    out = _cli(stack, "train", *common, "train.steps=6")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "resumed from step 4" in log and "step_0000006" in log
    runs = mlflow.MlflowClient(stack.mlflow_uri).search_runs(
        [mlflow.MlflowClient(stack.mlflow_uri).get_experiment_by_name("train-test").experiment_id])
    assert len(runs) == 1  # the same MLflow run continues


def test_hallucinate_round_trips_a_folder_and_rejects_a_bad_file(trained, tmp_path):
    stack, _, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src / f"t{i}.png")
    out = _cli(stack, "hallucinate", "--model", "models:/prouigan@challenger", "--input", str(src),
               "--output", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    outs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in outs] == ["t0.png", "t1.png", "t2.png"]
    assert all(Image.open(p).size == (128, 128) for p in outs)
    Image.new("RGB", (20, 16)).save(src / "wide.jpg")
    out = _cli(stack, "hallucinate", "--model", "models:/prouigan@challenger", "--input", str(src),
               "--output", str(tmp_path / "out2"))
    assert out.returncode == 2 and "wide.jpg: 20x16 pixels, expected 16x16" in out.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow  # about a minute or more on 2 cores: `make test-slow` and CI
def test_a_killed_worker_restarts_from_the_checkpoint_and_the_step_count_continues(stack, tmp_path):
    """SIGKILL a training worker mid-run: FailureConfig restarts the group from the latest checkpoint."""
    import signal
    import time

    import psutil

    common = ["-c", "smoke", f"data.output={tmp_path / 'ds'}", f"train.storage={tmp_path / 'ck'}", "name=killed",
              "tracking.experiment=killed", "train.num_workers=2", "train.steps=40", "train.val_every=4",
              "train.checkpoint_every=4", "train.max_failures=2"]
    assert _cli(stack, "shard", *common).returncode == 0
    env = {**os.environ, **stack.env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prouigan_platform.cli", "train", *common], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckdir = tmp_path / "ck" / "killed"
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None:
        # step 12's folder appearing means step 8 was reported by both workers and recorded by Ray Train (a
        # folder alone may still be mid-copy, and a kill then rightly resumes from the one before)
        if ckdir.exists() and any(p.name >= "step_0000012" for p in ckdir.glob("step_*")):
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if any("RayTrainWorker" in c for c in (p.info["cmdline"] or []))]
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    log, _ = proc.communicate(timeout=600)
    assert killed is not None, "no training worker process was found to kill"
    assert proc.returncode == 0, log[-4000:]
    resumed = [int(line.rsplit(" ", 1)[-1]) for line in log.splitlines() if "[train] resumed from step" in line]
    assert resumed and min(resumed) >= 8, log[-4000:]
    assert (ckdir / "step_0000040").exists()


def test_a_time_budget_ends_the_run_with_a_final_checkpoint(stack, tmp_path):
    """train.max_minutes stops a run that would take 100000 steps; the last step is validated and checkpointed,
    with the cosine schedule and the late discriminators on the way; the two workers agree on the budget every 3
    steps, in NHWC, on batches occluded in the worker; an EMA of G's weights is the checkpoint's generator."""
    import torch

    from prouigan_platform.training import checkpoints

    common = ["-c", "smoke", f"data.output={tmp_path / 'ds'}", f"train.storage={tmp_path / 'ck'}", "name=budget",
              "tracking.experiment=budget", "train.num_workers=2", "train.steps=100000", "train.val_every=5",
              "train.max_minutes=0.3", "train.lr_schedule=cosine", "train.adversarial_start=0.5",
              "train.sync_every=3", "train.channels_last=true", "data.occlusion.on_device=true",
              "train.ema_decay=0.9"]
    assert _cli(stack, "shard", *common).returncode == 0
    out = _cli(stack, "train", *common)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "ck" / "budget").glob("step_*"))
    assert steps and 0 < steps[-1] < 100000
    state = checkpoints.load(str(tmp_path / "ck" / "budget" / f"step_{steps[-1]:07d}"))
    assert state.step == steps[-1] and 18 <= state.elapsed_s < 120
    # the average is what registers and serves; the raw weights are kept to resume training from
    assert set(state.generator_raw) == set(state.generator["generator"])
    assert any(not torch.equal(state.generator_raw[k], v) for k, v in state.generator["generator"].items())
    assert "world_rank=1" in out.stdout + out.stderr


@pytest.mark.inductor  # Inductor compiles G and both Ds in each worker: minutes on 2 cores
def test_a_compiled_run_on_two_workers_says_what_runs_compiled(stack, tmp_path):
    """train.compile under DDP (gloo) on CPU, Inductor generating C++: the run trains, checkpoints, and the console
    says which forwards run compiled (or why one fell back)."""
    common = ["-c", "smoke", f"data.output={tmp_path / 'ds'}", f"train.storage={tmp_path / 'ck'}", "name=compiled",
              "tracking.experiment=compiled", "train.num_workers=2", "train.steps=3", "train.val_every=3",
              "train.compile=default"]
    assert _cli(stack, "shard", *common).returncode == 0
    out = _cli(stack, "train", *common)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    line = next(x for x in log.splitlines() if "[train] torch.compile (default):" in x)
    assert "generator compiled," in line and "global discriminator compiled" in line, line
    assert (tmp_path / "ck" / "compiled" / "step_0000003").exists()


def test_resuming_with_another_model_is_a_one_line_config_error(trained):
    stack, common, _ = trained
    out = _cli(stack, "train", *common, "train.steps=8", "model.overrides.attn_dim=4")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert lines[-1].startswith("prouigan train: error: config key 'model'") and "attn_dim" in lines[-1]
    assert "Traceback" not in out.stderr


def test_checkpoint_every_is_its_own_rhythm_and_the_console_shows_progress(stack, tmp_path):
    # two sources, and the last half of the run on source a alone
    common = ["-c", "smoke", f"data.output={tmp_path / 'ds'}", f"train.storage={tmp_path / 'ck'}", "name=rhythm",
              "data.sources=[{kind: synthetic, count: 24, name: a}, {kind: synthetic, count: 24, name: b}]",
              "data.source_weights={a: 1, b: 1}", "data.final_source_weights={a: 1, b: 0}", "data.final_fraction=0.5",
              "tracking.experiment=rhythm", "train.num_workers=1", "train.steps=6", "train.val_every=4",
              "train.checkpoint_every=2", "train.keep_best=10"]
    assert _cli(stack, "shard", *common).returncode == 0
    out = _cli(stack, "train", *common)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert sorted(p.name for p in (tmp_path / "ck" / "rhythm").glob("step_*")) == \
        ["step_0000002", "step_0000004", "step_0000006"]
    assert log.count("[train] step 6 | step 6/6 (100%)") == 1 and "samples/s" in log and "ETA" in log
    assert log.count("the last 50% of the run reads the final mix {'a': 1.0, 'b': 0.0}") == 1
    assert "[train] step 4: the last 50%" in log  # progress 3/6 after step 3: step 4 is the first on the final mix
    assert "[val]   step 4 | PSNR" in log and "best PSNR" in log
    assert "Reporting training result" not in log
    assert "INFO worker.py" not in log and "Moving model to device" not in log  # Ray's INFO lines: only --verbose


@pytest.mark.slow  # about a minute or more on 2 cores: `make test-slow` and CI
def test_the_step_benchmark_runs_its_whole_table_on_cpu(stack, tmp_path):
    """benchmarks/step.py is what a lent GPU runs first: every row kind (eager and compiled, data out, data in
    from the reader, occluded on the device) must work before device time is spent on it."""
    common = ["-c", "smoke", f"data.output={tmp_path / 'ds'}", "name=step-bench"]
    assert _cli(stack, "shard", *common).returncode == 0
    manifest = next((tmp_path / "ds" / "manifests").glob("v*.json"))
    out = subprocess.run([sys.executable, "benchmarks/step.py", "--device", "cpu", "--preset", "tiny", "--batches",
                          "4", "--steps", "2", "--compile-backend", "eager", "--dataset", str(manifest),
                          "--readers", "1", "--reader-seconds", "1"], cwd=REPO, env={**os.environ, **stack.env()},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().startswith("4 ")]
    from prouigan.training import cpu_bf16_supported

    # fp32 rows, then bf16 rows where this CPU has bf16 instructions (and says so where it has not)
    precisions = ["tf32/fp32", "bf16"] if cpu_bf16_supported() else ["tf32/fp32"]
    table = [(p, mode, "out") for p in precisions for mode in ("eager", "default")]
    assert [(r[1], r[2], r[3]) for r in rows] == [*table, (rows[-2][1], rows[-2][2], "in"),
                                                  (rows[-2][1], rows[-2][2], "dev")], out.stdout
    assert cpu_bf16_supported() or "this CPU has no bf16 instructions" in out.stdout
    assert all(float(r[4]) > 0 and r[-1] == "True" for r in rows), out.stdout
    assert "GFLOP per sample" in out.stdout and out.stdout.count("data path alone") == 2


def test_a_run_resumed_on_another_dataset_version_names_that_version(stack, tmp_path):
    """A training re-opened by its name on a newer dataset version: the run's lineage tags follow, and both
    versions are among its inputs."""
    from prouigan_platform import run_names as names
    from prouigan_platform import tracking
    from prouigan_platform.dataset import manifest as mf

    cfg = load_config("smoke", ["tracking.experiment=lineage-test"])

    def version(n: int):
        return mf.Manifest.of({"format": mf.FORMAT, "version": n, "root": str(tmp_path / "ds"), "shards": [],
                               "counts": {"train": n}, "digest": f"digest{n}"},
                              uri=str(tmp_path / "ds" / "manifests" / f"v{n:04d}.json"))

    first = tracking.open_run(cfg, "train", "lineage", manifest=version(1), find_tag=(names.TRAIN_NAME, "lineage"))
    again = tracking.open_run(cfg, "train", "lineage", manifest=version(2), find_tag=(names.TRAIN_NAME, "lineage"))
    run = mlflow.MlflowClient(stack.mlflow_uri).get_run(first)
    assert again == first and run.data.tags[names.DATASET_DIGEST] == "digest2"
    assert run.data.tags[names.DATASET].endswith("v0002.json")
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {"digest1", "digest2"}
