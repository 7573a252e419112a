"""The chaos test, beside the cluster test (`make cluster-test`): during one shard run and one training, on a stack
of its own, it fills a small disk (a 48 MiB tmpfs holding the dataset and the checkpoints), stops MLflow (SIGSTOP)
and kills a training worker, then checks that the runs finish or resume and that nothing was lost: no dataset
version half made and every shard matching its sha256, the training at its last step with a complete checkpoint,
a validation metric for every validation step, the model registered.  What it did and saw goes to
docs/failure-modes.md ("The chaos test").  Needs root (the tmpfs); skipped elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from tests.conftest import REPO, own_stack

pytestmark = [pytest.mark.cluster, pytest.mark.stack]
STEPS, VAL_EVERY, CKPT_EVERY = 60, 5, 10


@pytest.fixture()
def disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"the chaos test needs a small tmpfs (root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int = 0) -> Path:
    """Fill the disk up to ``leave`` free bytes with one file; -> that file (unlink it to free the space)."""
    filler = mnt / "filler.bin"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(filler, "ab") as f:
        chunk = b"\0" * (1 << 20)
        left = max(0, free - leave)
        try:
            while left > 0:
                left -= f.write(chunk[: min(len(chunk), left)])
        except OSError:
            pass  # full already
    return filler


def cli(env: dict, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prouigan_platform.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_a_shard_and_a_training_survive_a_full_disk_a_stopped_mlflow_and_a_killed_worker(disk, tmp_path):
    with own_stack(tmp_path / "state", ray_num_cpus=4) as spec:
        env = {**os.environ, **spec.env(), "PYTHONUNBUFFERED": "1"}
        log_lines: list[str] = []
        ds = disk / "ds"
        common = ["-c", "smoke", f"data.output={ds}", f"train.storage={disk / 'ck'}", "name=chaos",
                  "tracking.experiment=chaos", "tracking.registered_model=chaos"]

        # 1. a shard run on a disk with 64 KiB free: one line, no version, nothing temporary left
        filler = fill(disk, leave=64 * 1024)
        out = cli(env, "shard", *common, "data.sources=[{kind: synthetic, count: 300}]")
        text = out.communicate(timeout=600)[0]
        log_lines.append(f"shard on a full disk: exit {out.returncode}: {text.strip().splitlines()[-1]}")
        assert out.returncode == 1 and "No space left on device" in text and "Traceback" not in text, text[-3000:]
        assert not list((ds / "manifests").glob("*.json")) if (ds / "manifests").exists() else True
        assert not [p for p in ds.rglob("*") if p.is_file() and "_tmp" in str(p)]
        filler.unlink()
        out = cli(env, "shard", *common, "data.sources=[{kind: synthetic, count: 300}]")
        text = out.communicate(timeout=600)[0]
        assert out.returncode == 0, text[-3000:]
        manifest = json.loads((ds / "manifests" / "v0001.json").read_text())
        for s in manifest["shards"]:
            assert hashlib.sha256((ds / "shards" / s["name"]).read_bytes()).hexdigest() == s["sha256"], s["name"]
        log_lines.append(f"shard again with space: v0001, {len(manifest['shards'])} shards, every sha256 matches")

        # 2. a training: MLflow stopped for 20 s, a worker killed, the checkpoint disk full for 30 s
        train = cli(env, "train", *common, "train.num_workers=2", f"train.steps={STEPS}",
                    f"train.val_every={VAL_EVERY}", f"train.checkpoint_every={CKPT_EVERY}", "train.max_failures=8")
        lines: list[str] = []

        def wait_for(pattern: str, timeout: float = 600) -> re.Match:
            deadline = time.time() + timeout
            while time.time() < deadline:
                line = train.stdout.readline()
                if not line:
                    if train.poll() is not None:
                        break
                    continue
                lines.append(line)
                if m := re.search(pattern, line):
                    return m
            raise AssertionError(f"never saw {pattern!r}:\n" + "".join(lines[-80:]))

        wait_for(r"\[val\]   step 10 ")
        mlflow_proc = psutil.Process(json.loads((spec.state_dir / "stack.json").read_text())["services"]["mlflow"]
                                     ["pid"])
        stopped = [mlflow_proc, *mlflow_proc.children(recursive=True)]
        for p in stopped:
            p.send_signal(signal.SIGSTOP)
        wait_for(r"\[val\]   step 20 ")
        time.sleep(5)
        for p in stopped:
            p.send_signal(signal.SIGCONT)
        log_lines.append("training: MLflow stopped (SIGSTOP) from step 10 to past step 20, then continued")
        victim = int(re.search(r"world_rank=1 of 2 on node \w+ pid (\d+)", "".join(lines)).group(1))
        os.kill(victim, signal.SIGKILL)
        log_lines.append(f"training: killed the rank-1 worker (pid {victim}) after step 20")
        wait_for(r"resumed from step (\d+)")
        wait_for(r"\[val\]   step 35 ")
        filler = fill(disk)
        log_lines.append("training: checkpoint disk filled after step 35")
        time.sleep(30)
        filler.unlink()
        log_lines.append("training: space given back 30 s later")
        rest = train.communicate(timeout=1200)[0]
        lines.append(rest)
        text = "".join(lines)
        assert train.returncode == 0, text[-6000:]

        # nothing lost: the last checkpoint complete, a val metric for every val step, the model registered
        from prouigan_platform.training import checkpoints

        newest, torn = checkpoints.newest_complete(str(disk / "ck" / "chaos"))
        assert newest.endswith(f"step_{STEPS:07d}"), (newest, torn)
        client = mlflow.MlflowClient(spec.mlflow_uri)
        run = client.search_runs([client.get_experiment_by_name("chaos").experiment_id])[0]
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")}
        assert set(range(VAL_EVERY, STEPS + 1, VAL_EVERY)) <= steps, sorted(steps)
        assert run.info.status == "FINISHED" and client.get_model_version_by_alias("chaos", "challenger")
        restarts = len(re.findall(r"resumed from step", text))
        log_lines.append(f"training: finished at step {STEPS} after {restarts} restart(s); torn checkpoints skipped: "
                         f"{[Path(u).name for u, _ in torn]}; val_psnr logged at every one of "
                         f"{len(range(VAL_EVERY, STEPS + 1, VAL_EVERY))} val steps; registered "
                         f"models:/chaos@challenger")
        print("\n".join(["chaos test:", *log_lines]))
