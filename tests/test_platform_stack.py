"""The embedded platform stack, as real processes on loopback: health, every listening socket on loopback, Ray's
token required, S3 through boto3 and pyarrow, a Ray task on the head, MLflow REST + UI, idempotent `up`, clean
`down`, data surviving down + up, busy ports."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest

from prouigan_platform import stack as st
from tests.conftest import REPO, own_stack

pytestmark = pytest.mark.stack


def _get(url: str, login: dict[str, str] | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url)
    if login:
        pair = f"{login['MLFLOW_TRACKING_USERNAME']}:{login['MLFLOW_TRACKING_PASSWORD']}"
        req.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode(errors="replace")


def test_every_service_is_healthy(stack):
    rows = st.status(stack.state_dir)
    assert [r["service"] for r in rows] == ["s3", "mlflow", "ray"]
    assert all(r["running"] and r["healthy"] for r in rows), rows


def test_mlflow_answers_its_login_only_and_ui_is_html(stack):
    """The embedded MLflow runs its basic-auth app: no page, API call or artifact without the stack's login (in
    `prouigan platform env`, its file 0600); a wrong password is refused too.  /health stays open (`up` checks it)."""
    login = st.mlflow_login(stack)
    assert stack.env()["MLFLOW_TRACKING_PASSWORD"] == login["MLFLOW_TRACKING_PASSWORD"]
    assert len(login["MLFLOW_TRACKING_PASSWORD"]) >= 24
    assert oct(stack.credentials_file.stat().st_mode & 0o777) == "0o600"
    api = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    wrong = {**login, "MLFLOW_TRACKING_PASSWORD": "not-" + login["MLFLOW_TRACKING_PASSWORD"]}
    for path in (api, f"{stack.mlflow_uri}/", f"{stack.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts"):
        assert _get(path)[0] == 401, path
        assert _get(path, wrong)[0] == 401, path
    assert _get(f"{stack.mlflow_uri}/health")[0] == 200
    code, ctype, body = _get(api, login)
    assert code == 200 and json.loads(body)["experiment"]["name"] == "Default"
    code, ctype, body = _get(f"{stack.mlflow_uri}/", login)
    assert code == 200 and "text/html" in ctype and "<html" in body.lower()


def test_object_written_with_boto3_reads_back_with_pyarrow(stack):
    from prouigan_platform.storage import boto3_client, read_bytes

    boto3_client().put_object(Bucket=stack.bucket, Key="tests/hello.bin", Body=b"\x00pro-uigan\xff")
    assert read_bytes(f"s3://{stack.bucket}/tests/hello.bin") == b"\x00pro-uigan\xff"


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.pid, c.laddr.ip, c.laddr.port))
    return out


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


def test_every_listening_socket_is_on_loopback_and_ray_wants_its_token(stack, tmp_path):
    import ray

    ray.shutdown()
    ray.init(address=stack.ray_address, log_to_driver=False)  # the stack's env: RAY_AUTH_MODE + token path
    try:  # start workers, so their sockets are counted too
        assert ray.get([ray.remote(lambda i: i * i).remote(i) for i in range(4)]) == [0, 1, 4, 9]
        sockets = _listening(st.stack_pids(stack.state_dir))
        names = {psutil.Process(pid).name() for pid, _, _ in sockets}
        assert len(sockets) >= 8 and {"gcs_server", "raylet"} <= names, (names, sockets)
        wide = [(psutil.Process(pid).name(), ip, port) for pid, ip, port in sockets if not _loopback(ip)]
        assert wide == [], wide
    finally:
        ray.shutdown()
    # a client without the token, or with another one, is refused
    code = f"import ray; ray.init(address='{stack.ray_address}', log_to_driver=False); print('CONNECTED')"
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    for env in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}, {"RAY_AUTH_MODE": "disabled"}):
        clean = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **st.SINGLE_NODE_ENV}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**clean, "HOME": str(tmp_path), **env})
        assert out.returncode != 0 and "CONNECTED" not in out.stdout, (env, out.stdout[-500:], out.stderr[-1500:])
        assert "uthenticat" in out.stderr or "token" in out.stderr.lower(), out.stderr[-1500:]
    # the dashboard / Jobs API too
    token = stack.token_file.read_text().strip()
    assert oct(stack.token_file.stat().st_mode & 0o777) == "0o600"
    req = urllib.request.Request(f"{stack.dashboard_url}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code in (401, 403)
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def test_ray_task_runs_on_the_local_head(stack):
    import ray

    ray.shutdown()  # a connection left by an earlier test module; this test connects by address itself
    ray.init(address=stack.ray_address, log_to_driver=False)
    try:
        node = ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).remote())
        head = [n for n in ray.nodes() if n["Alive"]]
        assert len(head) == 1 and node == head[0]["NodeID"]
        # the stack's environment reaches Ray workers (they must find MLflow and S3)
        env = ray.get(ray.remote(lambda: os.environ.get("MLFLOW_TRACKING_URI")).remote())
        assert env == stack.mlflow_uri
    finally:
        ray.shutdown()


def test_up_twice_starts_nothing_twice(stack):
    before = {r["service"]: r["pid"] for r in st.status(stack.state_dir)}
    lines: list[str] = []
    st.up(st.StackSpec(state_dir=stack.state_dir), log=lines.append)
    after = {r["service"]: r["pid"] for r in st.status(stack.state_dir)}
    assert before == after
    already = [s for s in st.SERVICES if any(line.startswith(f"{s}: already running") for line in lines)]
    assert already == list(st.SERVICES) == list(stack.services())


def test_hello_pipeline_logs_a_run_with_an_artifact_in_the_bucket(stack):
    env = {**os.environ, **stack.env()}
    out = subprocess.run([sys.executable, "pipelines/hello.py", "--config", "smoke", "tracking.experiment=hello-test"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sum of squares = 140" in out.stdout
    import mlflow

    from prouigan_platform.storage import boto3_client

    client = mlflow.MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("hello-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.params["train.steps"] == "4"
    keys = [o["Key"] for o in boto3_client().list_objects_v2(
        Bucket=stack.bucket, Prefix=f"mlflow-artifacts/{exp.experiment_id}/{runs[0].info.run_id}/")["Contents"]]
    assert any(k.endswith("/hello.txt") for k in keys) and any(k.endswith("/config.yaml") for k in keys)


def test_down_stops_every_process_and_data_survives_down_up(tmp_path):
    """Its own stack: stopped and started again."""
    import mlflow

    from prouigan_platform.storage import boto3_client

    with own_stack(tmp_path / "state", s3=True) as spec:
        boto3_client().put_object(Bucket=spec.bucket, Key="keep/", Body=b"")  # a folder marker beside data
        boto3_client().put_object(Bucket=spec.bucket, Key="keep/me.txt", Body=b"still here")
        exp_id = mlflow.MlflowClient(spec.mlflow_uri).create_experiment("survives")
        pids = st.stack_pids(spec.state_dir)
        assert len(pids) >= 5  # moto, mlflow (+ its worker), ray start, gcs, raylet, ...
        st.down(spec.state_dir, log=lambda *_: None)
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == []
        assert not any(r["running"] for r in st.status(spec.state_dir))

        st.up(spec, log=lambda *_: None)
        assert boto3_client().get_object(Bucket=spec.bucket, Key="keep/me.txt")["Body"].read() == b"still here"
        assert mlflow.MlflowClient(spec.mlflow_uri).get_experiment(exp_id).name == "survives"
        assert st.mlflow_login(spec) == {k: os.environ[k] for k in st.mlflow_login(spec)}  # the login survives too

        # the login's file deleted while the stack is down: `up` makes a new one that works, the registry is kept
        st.down(spec.state_dir, log=lambda *_: None)
        spec.credentials_file.unlink()
        lines: list[str] = []
        st.up(spec, log=lines.append)
        assert any("a new login is made" in x for x in lines), lines
        os.environ.update(spec.env())
        assert mlflow.MlflowClient(spec.mlflow_uri).get_experiment(exp_id).name == "survives"


@pytest.mark.slow  # about a minute or more on 2 cores (a stack of its own, three restarts): `make test-slow` and CI
def test_a_service_whose_main_process_died_leaves_nothing_running_that_holds_its_port(tmp_path):
    """The OOM killer takes one process: `mlflow` dies, its uvicorn worker lives on and keeps the port.  `up` stops
    what the dead service left and starts it again on the same port; so does `down`.  And `up` right after a
    whole tree was killed waits the moment the kernel takes to free the port, instead of calling it busy."""
    import mlflow

    with own_stack(tmp_path / "state") as spec:
        exp_id = mlflow.MlflowClient(spec.mlflow_uri).create_experiment("kept")

        def kill_main() -> st.ServiceRecord:
            rec = st.load_state(spec.state_dir)[1]["mlflow"]
            main = st.alive(rec)
            assert st.leftovers(rec), "the mlflow service runs in worker processes of its own"
            main.kill()
            psutil.wait_procs([main], timeout=10)
            return rec

        rec = kill_main()
        assert st.leftovers(rec) and st.port_in_use(spec.mlflow_port)  # orphans still serve the port
        lines: list[str] = []
        st.up(spec, log=lines.append)
        assert any("were left running" in x for x in lines), lines
        assert st.leftovers(rec) == []
        assert mlflow.MlflowClient(spec.mlflow_uri).get_experiment(exp_id).name == "kept"

        rec = st.load_state(spec.state_dir)[1]["mlflow"]
        tree = [st.alive(rec), *st.alive(rec).children(recursive=True)]
        for p in tree:
            p.kill()
        st.up(spec, log=lambda *_: None)  # at once: no time for the kernel to close the killed sockets first
        assert mlflow.MlflowClient(spec.mlflow_uri).get_experiment(exp_id).name == "kept"

        rec = kill_main()
        st.down(spec.state_dir, log=lambda *_: None)
        assert st.leftovers(rec) == [] and not st.port_in_use(spec.mlflow_port)


def test_a_private_local_ray_wants_a_token_of_its_own_that_only_this_user_reads(tmp_path):
    """A command run with --local (or without RAY_ADDRESS) starts a private Ray with token authentication: the token
    0600 in a 0700 temporary folder, known to the node and its workers but put out of the caller's environment once
    Ray started (a later `ray job submit` from that process must not take it), gone when the process ends; another
    process without it, or with another token, is refused."""
    owner = ("import os, sys\n"
             "from prouigan_platform.runtime import prepare_local_ray, init_ray\n"
             "prepare_local_ray(True)\n"
             "import ray\n"
             "init_ray(local=True, object_store_memory=128 * 2**20)\n"
             "p = ray.get(ray.remote(lambda: os.environ['RAY_AUTH_TOKEN_PATH']).remote())\n"
             "mode = ray.get(ray.remote(lambda: os.environ['RAY_AUTH_MODE']).remote())\n"
             "left = [k for k in ('RAY_AUTH_MODE', 'RAY_AUTH_TOKEN_PATH') if k in os.environ]\n"
             "print(mode, oct(os.stat(p).st_mode & 0o777), oct(os.stat(os.path.dirname(p)).st_mode & 0o777),\n"
             "      p, ray.get_runtime_context().gcs_address, 'left:' + ','.join(left), flush=True)\n"
             "sys.stdin.readline()\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-c", owner], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**clean, "HOME": str(tmp_path)})
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:] if proc.poll() is not None else "no answer"
        mode, file_mode, dir_mode, token_path, gcs, left = line.split()
        assert (mode, file_mode, dir_mode, left) == ("token", "0o600", "0o700", "left:"), line
        code = f"import ray; ray.init(address='{gcs}', log_to_driver=False); print('CONNECTED')"
        wrong = tmp_path / "wrong_token"
        wrong.write_text("0" * 64)
        for env in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}, {"RAY_AUTH_MODE": "disabled"}):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                 env={**clean, **st.SINGLE_NODE_ENV, "HOME": str(tmp_path), **env})
            assert out.returncode != 0 and "CONNECTED" not in out.stdout, (env, out.stdout[-500:], out.stderr[-1500:])
    finally:
        proc.communicate("\n", timeout=120)
    assert proc.returncode == 0
    assert not os.path.exists(token_path)  # removed with the process


def test_the_state_folder_and_all_it_holds_are_this_users_alone(stack, tmp_path):
    """The registry database, the token, the logs, the S3 snapshot: 0700 folders, 0600 files; a state folder from
    before the rule is tightened at the next `up`."""
    from pathlib import Path

    root = Path(stack.state_dir)
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    opened = [(str(p), oct(p.stat().st_mode & 0o777)) for p in root.rglob("*")
              if not p.is_symlink() and p.exists() and p.stat().st_mode & 0o077]
    assert opened == [], opened[:5]
    assert any(p.name.endswith(".db") for p in root.rglob("*"))  # the registry's database is among them
    old = tmp_path / "old-state"
    (old / "store" / "datasets").mkdir(parents=True)
    (old / "store" / "datasets" / "v0001.json").write_text("{}")
    os.chmod(old / "store" / "datasets" / "v0001.json", 0o644)
    os.chmod(old / "store", 0o755)
    st.private(old)
    assert oct((old / "store").stat().st_mode & 0o777) == "0o700"
    assert oct((old / "store" / "datasets" / "v0001.json").stat().st_mode & 0o777) == "0o600"
