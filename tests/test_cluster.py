"""A real 2-node Ray cluster on 127.0.0.1: a head and a second `ray start --address` node, each with its own
resources, beside the test stack's MLflow server and S3 bucket.  Training goes in through the Jobs API (the
project installed on the nodes, as in the cluster image of infra/docker), its two workers spread over both
nodes; checkpoints and the registered model's artifacts land in the bucket.  Then the second node is stopped
mid-run: Ray Train restarts the worker group on what is left, from the latest checkpoint, and the job finishes
with the step count continuing.

`make cluster-test` (CI runs it after `make test`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from prouigan_platform.stack import SINGLE_NODE_ENV, free_port
from prouigan_platform.storage import boto3_client
from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.cluster, pytest.mark.stack]
RAY = str(Path(sys.executable).parent / "ray")
MODEL = "prouigan-cluster-test"


def _get(url: str):
    """The dashboard's REST API, with the Ray token every node of this cluster was started with."""
    req = urllib.request.Request(url)
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        req.add_header("Authorization", f"Bearer {Path(token_path).read_text().strip()}")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _alive_nodes(dash: str) -> list[dict]:
    try:
        rows = _get(f"{dash}/api/v0/nodes?limit=100")["data"]["result"]["result"]
    except (OSError, KeyError, ValueError):
        return []
    return [n for n in rows if n.get("state") == "ALIVE"]


def _start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                             "--dashboard-agent-listen-port=0", "--num-cpus=2",
                             f"--object-store-memory={200 * 2**20}", *args],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class TwoNodes:
    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env = tmp, env
        self.gcs, self.dash_port = free_port(), free_port()
        self.dash = f"http://127.0.0.1:{self.dash_port}"
        self.head = _start_node(["--head", f"--port={self.gcs}", "--include-dashboard=true",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
                                 f"--ray-client-server-port={free_port()}", '--resources={"head_node": 1}'],
                                tmp / "head.log", env)
        self.second = None
        self.wait_nodes(1)
        self.start_second()

    def start_second(self) -> None:
        self.second = _start_node([f"--address=127.0.0.1:{self.gcs}", '--resources={"second_node": 1}'],
                                  self.tmp / f"second-{time.time():.0f}.log", self.env)
        self.wait_nodes(2)

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            nodes = _alive_nodes(self.dash)
            if len(nodes) == n:
                return nodes
            time.sleep(1)
        raise AssertionError(f"the cluster did not reach {n} alive node(s); logs in {self.tmp}")

    def stop(self) -> None:
        for p in (self.second, self.head):
            if p is not None:
                _stop(p)


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory):
    # nodes of a real cluster: on the network, so without the embedded stack's single-node switch
    env = {k: v for k, v in {**os.environ, **stack.env()}.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *SINGLE_NODE_ENV)}
    # a second raylet on a loaded 2-core machine can take longer than Ray's default 30 s to see its agents
    env.update(RAY_raylet_start_wait_time_s="180", RAY_agent_register_timeout_ms="180000")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # nodes run the venv's python
    c = TwoNodes(tmp_path_factory.mktemp("ray2"), env)
    # the Jobs SDK lets RAY_ADDRESS (the session stack's, exported for the CLI) override the address it is given;
    # RAY_API_SERVER_ADDRESS comes before both
    os.environ["RAY_API_SERVER_ADDRESS"] = c.dash
    yield c
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    c.stop()


@pytest.fixture(scope="module")
def dataset(stack):
    root = f"s3://{stack.bucket}/datasets/cluster-test"
    out = run_cli(stack, "shard", "-c", "smoke", f"data.output={root}")
    assert out.returncode == 0, out.stderr[-3000:]
    return f"{root}/manifests/v0001.json"


def _submit(stack, cluster: TwoNodes, name: str, dataset: str, *overrides: str) -> tuple[str, object]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dash)
    env_vars = {k: v for k, v in stack.env().items()
                if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *SINGLE_NODE_ENV)}
    job = client.submit_job(
        entrypoint=(f"{sys.executable} {REPO}/pipelines/train.py -c smoke name={name} train.dataset={dataset} "
                    f"train.storage=s3://{stack.bucket}/cluster-ckpt tracking.experiment=cluster-test "
                    f"tracking.registered_model={MODEL} train.num_workers=2 train.placement_strategy=SPREAD "
                    + " ".join(overrides)),
        runtime_env={"env_vars": env_vars})
    return job, client


def _wait(client, job: str, timeout: float = 900) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    client.stop_job(job)
    raise AssertionError(f"job {job} did not finish in {timeout} s:\n{client.get_job_logs(job)[-4000:]}")


def _keys(stack, prefix: str) -> list[str]:
    return [o["Key"] for page in boto3_client().get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket, Prefix=prefix) for o in page.get("Contents", [])]


def test_a_training_job_runs_its_workers_on_both_nodes(stack, cluster, dataset):
    nodes = {n["node_id"] for n in _alive_nodes(cluster.dash)}
    assert len(nodes) == 2
    job, client = _submit(stack, cluster, "two-nodes", dataset, "train.steps=6")
    status = _wait(client, job)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-5000:]
    ran_on = dict(re.findall(r"world_rank=(\d) of 2 on node ([0-9a-f]+)", logs))
    assert set(ran_on) == {"0", "1"} and set(ran_on.values()) == nodes, (ran_on, nodes)
    assert any(k.endswith("step_0000006/state.pt") for k in _keys(stack, "cluster-ckpt/two-nodes/"))
    mv = mlflow.MlflowClient(stack.mlflow_uri).get_model_version_by_alias(MODEL, "challenger")
    exp = mlflow.MlflowClient(stack.mlflow_uri).get_run(mv.run_id).info.experiment_id
    assert any(k.endswith("generator.pt") for k in _keys(stack, f"mlflow-artifacts/{exp}/"))


def test_losing_the_second_node_mid_run_resumes_from_the_checkpoint(stack, cluster, dataset):
    steps = 120
    job, client = _submit(stack, cluster, "lose-a-node", dataset, f"train.steps={steps}", "train.val_every=10",
                          "train.checkpoint_every=10", "train.max_failures=3")
    deadline = time.time() + 600
    while not any(re.search(r"step_00000[2-9]0/state.pt$", k) for k in _keys(stack, "cluster-ckpt/lose-a-node/")):
        alive = client.get_job_status(job) in ("PENDING", "RUNNING")
        assert time.time() < deadline and alive, client.get_job_logs(job)[-4000:]
        time.sleep(1)
    _stop(cluster.second)  # the node and its training worker are gone
    status = _wait(client, job)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-6000:]
    # the restart picks up the latest checkpoint Ray Train had recorded when the node went (one being uploaded
    # from the lost node at that moment is lost with it), so the step count continues from 10 or later
    resumed = [int(s) for s in re.findall(r"\[train\] resumed from step (\d+)", logs)]
    assert resumed and min(resumed) >= 10, logs[-6000:]
    assert any(k.endswith(f"step_{steps:07d}/state.pt") for k in _keys(stack, "cluster-ckpt/lose-a-node/"))
    cluster.start_second()  # leave the cluster as the module found it
