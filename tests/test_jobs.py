"""The README's path, walked from the outside: a stack started by the `prouigan platform up` command, a shell that
has only what `prouigan platform env` prints (and the venv on PATH, as an activated venv has), then Ray's own job
CLI: `ray job submit` to SUCCEEDED with its logs read back; a 2-worker training submitted as a job, while it runs
the dashboard's Jobs, Train and Data routes answer and every socket of every process of the stack (GCS, raylet,
agents, the job driver, the training workers' torch store and gloo) is on loopback; `ray job stop` ends it STOPPED
and its MLflow run KILLED."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from prouigan_platform import stack as st
from tests.conftest import REPO

pytestmark = pytest.mark.stack
BIN = Path(sys.executable).parent


def _sh(env: dict, *cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def user_shell(tmp_path_factory):
    """(env, state folder): a stack of `prouigan platform up` on free ports; the shell's environment is a clean one
    plus the lines of `prouigan platform env`."""
    tmp = tmp_path_factory.mktemp("jobs")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PROUIGAN_", "AWS_"))}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    state = tmp / "platform"
    ports = [f"--{n}-port={st.free_port()}" for n in ("mlflow", "ray", "dashboard", "ray-client")]
    up = _sh(base, "prouigan", "platform", "up", "--state-dir", str(state), *ports, "--num-cpus", "4",
             "--object-store-mb", "400", timeout=300)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
    printed = _sh(base, "prouigan", "platform", "env", "--state-dir", str(state)).stdout
    env = dict(base)
    for line in printed.splitlines():
        k, _, v = line.removeprefix("export ").partition("=")
        env[k] = v
    assert env["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
    yield env, state, tmp
    _sh(base, "prouigan", "platform", "down", "--state-dir", str(state), timeout=300)


def _status(env: dict, job: str) -> str:
    """What `ray job status` says, lower case and without colour codes."""
    out = _sh(env, "ray", "job", "status", job)
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr).lower()


def _get(env: dict, route: str) -> tuple[int, bytes, float]:
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(env["RAY_API_SERVER_ADDRESS"] + route, headers={"Authorization": f"Bearer {token}"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read(), time.time() - t0


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


def _sockets(pids: set[int]) -> list[tuple[str, str, str, int]]:
    """(process, kind, address, port) of every listening TCP socket and every bound UDP socket of ``pids``."""
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid in pids and c.laddr and (c.status == psutil.CONN_LISTEN or c.type == 2):
            try:
                argv = psutil.Process(c.pid).cmdline()
                # the program's own name first: a full path to gcs_server in a deep checkout would not fit the cut
                cmd = " ".join([Path(argv[0]).name, *argv[1:]])[:120] if argv else ""
            except psutil.Error:
                continue
            out.append((cmd, "udp" if c.type == 2 else "tcp", c.laddr.ip, c.laddr.port))
    return out


def test_ray_job_submit_runs_a_pipeline_to_succeeded_and_its_logs_read_back(user_shell):
    env, _, _ = user_shell
    t0 = time.time()
    out = _sh(env, "ray", "job", "submit", "--working-dir", ".", "--", "python", "pipelines/hello.py", "-c", "smoke",
              "tracking.experiment=jobs-hello")
    wall = time.time() - t0
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "sum of squares = 140" in log and "succeeded" in log, log[-3000:]
    job = re.search(r"raysubmit_\w+", log).group(0)
    assert f"job '{job.lower()}' succeeded" in _status(env, job)
    assert "sum of squares = 140" in _sh(env, "ray", "job", "logs", job).stdout
    listed = _sh(env, "ray", "job", "list")
    assert job in listed.stdout + listed.stderr
    print(f"ray job submit (hello) to SUCCEEDED: {wall:.1f} s")


@pytest.fixture(scope="module")
def training_job(user_shell):
    """A 2-worker training submitted with `ray job submit --no-wait`, once it validates (both workers up, the process
    group made); -> its submission id.  The last test of the module stops it."""
    env, state, tmp = user_shell
    common = ["-c", "smoke", f"data.output={tmp / 'ds'}", f"train.storage={tmp / 'ck'}", "name=jobs-train",
              "tracking.experiment=jobs-train"]
    out = _sh(env, "prouigan", "shard", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _sh(env, "ray", "job", "submit", "--no-wait", "--working-dir", ".", "--", "python", "pipelines/train.py",
              *common, "train.num_workers=2", "train.steps=100000", "train.max_minutes=10", "train.val_every=5",
              "train.checkpoint_every=50")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    job = re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)
    deadline, logs = time.time() + 300, ""
    while "[val]" not in logs:
        assert time.time() < deadline, logs[-4000:]
        time.sleep(2)
        logs = _sh(env, "ray", "job", "logs", job).stdout
    yield job
    _sh(env, "ray", "job", "stop", job)  # in case the last test did not get that far


def test_the_dashboard_answers_while_a_training_job_runs(user_shell, training_job):
    env, _, _ = user_shell
    for route in ("/api/jobs/", "/api/data/datasets/all", "/api/train/v2/runs/v1"):
        code, body, seconds = _get(env, route)
        assert code == 200 and seconds < 10, (route, code, seconds)
    runs = json.loads(_get(env, "/api/train/v2/runs/v1")[1])["train_runs"]
    assert [r["status"] for r in runs if r["name"] == "jobs-train"] == ["RUNNING"], runs


def test_the_dashboard_pages_load_in_a_browser_with_the_token(user_shell, training_job):
    """As a person opens it: the dashboard asks for the token (the file named by RAY_AUTH_TOKEN_PATH); then the Jobs
    page lists the job, and the job's page its status and the training's progress lines.  (Ray 2.60's dashboard
    has no Train page of its own: its Train runs are the REST route tested above.)"""
    from tests.browser import browser, shot

    env, _, _ = user_shell
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    dash = env["RAY_API_SERVER_ADDRESS"]
    with browser() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{dash}/#/jobs")
        page.wait_for_selector("text=Authentication Token Required", timeout=60_000)
        page.get_by_placeholder("Enter your authentication token").fill(token)
        page.get_by_role("button", name="Submit").click()
        page.wait_for_selector(f"text={training_job}", timeout=60_000)
        shot(page, "ray-dashboard-jobs")
        page.goto(f"{dash}/#/jobs/{training_job}")
        page.wait_for_selector("text=[val]", timeout=60_000)  # the driver's log: the training's validation lines
        body = page.inner_text("body")
        assert "RUNNING" in body and "world_rank=1 of 2" in body, body[:3000]
        shot(page, "ray-dashboard-job")


def test_every_socket_of_the_stack_is_on_loopback_while_a_training_job_runs(user_shell, training_job):
    env, state, _ = user_shell
    sockets = _sockets(st.stack_pids(state))
    workers = [s for s in sockets if "RayTrainWorker" in s[0]]
    drivers = [s for s in sockets if "pipelines/train.py" in s[0]]
    assert {"gcs_server", "raylet"} <= {s[0].split(" ")[0] for s in sockets}, sockets
    assert workers and drivers, sockets  # looked while the training ran: its workers and driver listen too
    wide = [s for s in sockets if not _loopback(s[2])]
    assert wide == [], wide
    print(f"{len(sockets)} sockets of the stack during a 2-worker training job, all on loopback; "
          f"training workers: {sorted({(s[1], s[2]) for s in workers})}")


def test_ray_job_stop_ends_the_job_stopped_and_its_mlflow_run_killed(user_shell, training_job, monkeypatch):
    env, _, _ = user_shell
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the user's shell logs in to MLflow
        monkeypatch.setenv(k, env[k])
    stop = _sh(env, "ray", "job", "stop", training_job)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    deadline = time.time() + 120
    while f"job '{training_job.lower()}' was stopped" not in (status := _status(env, training_job)):
        assert time.time() < deadline, status
        time.sleep(2)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("jobs-train")
    deadline = time.time() + 60
    while (run := client.search_runs([exp.experiment_id])[0]).info.status == "RUNNING" and time.time() < deadline:
        time.sleep(2)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags.get("stopped", ""), (run.info, run.data.tags)
