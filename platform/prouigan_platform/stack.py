"""The embedded platform stack: a Ray head and an MLflow tracking server (and, with ``--s3``, an S3-compatible test
server), real processes on 127.0.0.1, with their state in one folder (default ``.platform/``).

Private by default: every socket of every process the stack starts binds ``host`` (127.0.0.1), Ray runs with token
authentication (the token in ``<state>/ray_auth_token``, mode 0600; ``prouigan platform env`` points clients at it)
and MLflow behind its basic-auth app (one user, ``prouigan``, its password made once in
``<state>/mlflow_credentials``, 0600; ``prouigan platform env`` exports it as MLflow's clients read it). Durable by
default: datasets, checkpoints and MLflow artifacts live in the store, local disk under ``<state>/store``
(``paths.py``), and MLflow's registry in sqlite: a write that returned survives a kill -9 of any service. The
optional S3 server (moto) holds objects in memory: ``down`` snapshots its buckets to ``<state>/s3/`` and ``up``
restores them, and an ``up`` after an unclean stop says what was lost.

``up`` is idempotent and waits for health checks; ``down`` stops exactly the process trees it started (by PID,
recorded in ``stack.json``) and keeps the data."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psutil

from prouigan_platform.errors import Exit
from prouigan_platform.local_files import fsync_dir, write_local_atomic

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")  # the embedded stack is single-user: never on the network
SERVICES = ("s3", "mlflow", "ray")  # start order; stop order is the reverse
S3_ACCESS_KEY = "prouigan"  # the embedded S3 server accepts any key; these are not secrets
S3_SECRET_KEY = "prouigan-local-secret"
S3_REGION = "us-east-1"
SNAPSHOT_INDEX = "index.json"  # <state>/s3/<bucket>/index.json: [{key, file}], the files in objects/
# Ray's single-node switch (``ray_constants.ENABLE_RAY_CLUSTER``, read once when a process imports Ray).  Off, Ray
# keeps 127.0.0.1 as every node and client address instead of replacing it by the machine's network address, so
# the GCS, raylet, dashboard and its agent, workers, job drivers and every client of the stack stay on loopback.
# It reaches every Ray process of the stack through the environment: `ray start` gets it from `up`, the processes
# Ray starts inherit it, and `platform env` exports it to clients.  (Ray's name for it comes from the platforms where
# it is off by default; a stack with it off cannot take a second node, which the embedded stack never has.)
SINGLE_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class StackError(RuntimeError):
    """A stack operation failed; the message says which service and why."""

    def __init__(self, message: str, code: int = Exit.FAILED):
        super().__init__(message)
        self.code = code


class StackCorrupt(StackError):
    """The state folder's record of the stack cannot be read."""


@dataclass
class StackSpec:
    state_dir: Path = Path(".platform")
    host: str = LOOPBACK  # every service binds this address only
    s3: bool = False  # also run the S3 test server, and make s3://bucket the store
    bucket: str = "prouigan"
    s3_port: int = 9000
    mlflow_port: int = 5000
    ray_port: int = 6379
    dashboard_port: int = 8265
    ray_client_port: int = 10001
    ray_num_cpus: int = max(4, os.cpu_count() or 1)  # >= 4 logical slots: 2 train workers + Ray Data tasks
    object_store_mb: int = 1024
    timeout_s: float = 90.0

    @classmethod
    def on_free_ports(cls, state_dir: Path, **kw) -> StackSpec:
        """A stack beside the default one (tests, benchmarks): every port a free one."""
        ports = {f"{n}_port": free_port() for n in ("s3", "mlflow", "ray", "dashboard", "ray_client")}
        return cls(state_dir=Path(state_dir), **{**ports, **kw})

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"{self.host}:{self.ray_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def token_file(self) -> Path:
        return Path(self.state_dir) / "ray_auth_token"

    @property
    def credentials_file(self) -> Path:
        return Path(self.state_dir) / "mlflow_credentials"

    @property
    def store(self) -> str:
        return f"s3://{self.bucket}" if self.s3 else str(Path(self.state_dir).resolve() / "store")

    def services(self) -> tuple[str, ...]:
        return tuple(n for n in SERVICES if n != "s3" or self.s3)

    def ports(self) -> dict[str, list[int]]:
        return {
            "s3": [self.s3_port],
            "mlflow": [self.mlflow_port],
            "ray": [self.ray_port, self.dashboard_port, self.ray_client_port],
        }

    def env(self) -> dict[str, str]:
        """What a pipeline (or a Ray worker) needs to find and use this stack.  The Ray token stays in its file
        (RAY_AUTH_TOKEN_PATH); MLflow's clients read a password from the environment only, so its credential is
        here once ``up`` has made it (a process's environment is readable by its user alone; ``runtime.FORWARDED``
        keeps it out of a job's runtime env, which the dashboard shows)."""
        env = {
            "RAY_ADDRESS": self.ray_address,
            # the job CLI and SDK: this before RAY_ADDRESS, which they would otherwise take for the dashboard's
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            **SINGLE_NODE_ENV,
            "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",  # the dashboard's Train page
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_file.resolve()),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PROUIGAN_STORE": self.store,
            "PROUIGAN_STATE_DIR": str(Path(self.state_dir).resolve()),
        }
        if self.credentials_file.exists():
            env.update(mlflow_login(self))
        if self.s3:
            env.update({
                "AWS_ENDPOINT_URL": self.s3_endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                "AWS_DEFAULT_REGION": S3_REGION,
                "PROUIGAN_BUCKET": self.bucket,
            })
        return env


@dataclass
class ServiceRecord:
    name: str
    pid: int
    create_time: float
    ports: list[int]
    log: str
    cmd: list[str] = field(default_factory=list)


def _state_file(spec: StackSpec) -> Path:
    return spec.state_dir / "stack.json"


def load_state(state_dir: Path) -> tuple[StackSpec | None, dict[str, ServiceRecord]]:
    path = Path(state_dir) / "stack.json"
    if not path.exists():
        return None, {}
    try:
        raw = json.loads(path.read_text())
        spec_d = raw["spec"]
        spec_d["state_dir"] = Path(spec_d["state_dir"])
        spec_d.setdefault("s3", True)  # a record from before the S3 server became optional: it always ran one
        spec, services = StackSpec(**spec_d), {k: ServiceRecord(**v) for k, v in raw["services"].items()}
        _check_types(spec, services)
        return spec, services
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StackCorrupt(f"{path} is not a stack record this version can read ({type(e).__name__}: {e}); "
                           f"stop any stack processes by hand (ps aux | grep -E 'ray|mlflow|moto'), then move the "
                           f"file away and run `prouigan platform up`") from None


def _check_types(spec: StackSpec, services: dict[str, ServiceRecord]) -> None:
    """Every field of the record has its declared type (a hand-edited or foreign file fails here, not later)."""
    scalar = {"str": str, "int": int, "bool": bool, "float": (int, float), "Path": Path}
    items = {"list[int]": int, "list[str]": str}
    for obj in (spec, *services.values()):
        for f in fields(obj):
            v, t = getattr(obj, f.name), str(f.type)
            if t in scalar:
                ok = isinstance(v, scalar[t]) and (t == "bool" or not isinstance(v, bool))
            else:
                ok = isinstance(v, list) and all(isinstance(x, items[t]) and not isinstance(x, bool) for x in v)
            if not ok:
                raise TypeError(f"{type(obj).__name__}.{f.name} is {v!r}, not {t}")
    if spec.host not in LOOPBACK_HOSTS:
        raise ValueError(f"host {spec.host!r} is not a loopback address")


def _save_state(spec: StackSpec, services: dict[str, ServiceRecord]) -> None:
    spec_d = asdict(spec)
    spec_d["state_dir"] = str(spec.state_dir)
    # each written whole and on disk before this returns (fsync, rename): a crash leaves the old or the new record
    write_local_atomic(_state_file(spec), json.dumps(
        {"spec": spec_d, "services": {k: asdict(v) for k, v in services.items()}}, indent=2).encode())
    env_lines = [f"export {k}={v}" for k, v in spec.env().items()]
    write_local_atomic(spec.state_dir / "env.sh", ("\n".join(env_lines) + "\n").encode())


def alive(rec: ServiceRecord) -> psutil.Process | None:
    """The recorded process, if it still runs (same PID *and* start time, so a reused PID is not ours)."""
    try:
        p = psutil.Process(rec.pid)
        if abs(p.create_time() - rec.create_time) < 1.0 and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except psutil.Error:
        pass
    return None


def leftovers(rec: ServiceRecord) -> list[psutil.Process]:
    """Processes a dead service left behind: ``up`` starts each service as the leader of a new session, so whatever
    it spawned keeps its session id after the leader dies (MLflow's uvicorn worker keeps serving the port when the
    ``mlflow`` process alone is killed, e.g. by the OOM killer).  Linux keeps a PID unused while a session still
    bears it, so a live process of that PID but another start time means the session is someone else's."""
    try:
        if abs(psutil.Process(rec.pid).create_time() - rec.create_time) >= 1.0:
            return []
    except psutil.Error:
        pass
    found = []
    for p in psutil.process_iter(["create_time"]):
        try:
            if p.pid != rec.pid and os.getsid(p.pid) == rec.pid and p.info["create_time"] >= rec.create_time - 1.0:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def _stop_leftovers(rec: ServiceRecord, log) -> None:
    """Stop a dead service's leftovers (SIGTERM, then SIGKILL) and wait until its ports are free again."""
    procs = leftovers(rec)
    if procs:
        log(f"{rec.name}: its main process is gone but {len(procs)} of its processes were left running "
            f"(pids {', '.join(str(p.pid) for p in procs)}); stopping them")
        _terminate(procs)
        deadline = time.monotonic() + 10
        while any(port_in_use(port) for port in rec.ports) and time.monotonic() < deadline:
            time.sleep(0.05)  # a killed process's sockets close a moment after it dies


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie; False, not an error, for one that dies while asked (leftovers often are dying)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate(procs: list[psutil.Process], timeout_s: float = 10.0) -> int:
    """SIGTERM, wait, SIGKILL whatever is left; the number that had to be killed."""
    procs = [p for p in procs if _running(p)]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=timeout_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return len(left)


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _http_ok(url: str, timeout: float = 2.0, token: str = "") -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception:
        return False


def _bin(name: str) -> str:
    """An executable of this interpreter's environment (.venv/bin/NAME), else from PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise StackError(f"'{name}' is not installed in this environment (pip install -e '.[dev]')")
    return found


def _s3_command(spec: StackSpec) -> list[str]:
    return [_bin("moto_server"), "-H", spec.host, "-p", str(spec.s3_port)]


def _mlflow_command(spec: StackSpec) -> list[str]:
    state = spec.state_dir.resolve()
    artifacts = f"s3://{spec.bucket}/mlflow-artifacts" if spec.s3 else str(Path(spec.store) / "mlflow-artifacts")
    return [
        _bin("mlflow"), "server", "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
        "--artifacts-destination", artifacts,
        "--host", spec.host, "--port", str(spec.mlflow_port), "--workers", "1",
    ]


MLFLOW_USER = "prouigan"


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """The secret in ``path``, made once (created 0600, never readable by another user, even for a moment)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make())
            f.flush()
            os.fsync(f.fileno())
    os.chmod(path, 0o600)
    return path.read_text()


def _mlflow_credentials(spec: StackSpec, log) -> None:
    """The MLflow login, made once: in the INI layout MLflow's clients read from ``~/.mlflow/credentials`` (a user
    may copy it there).  Made again where its file was deleted: the auth app's users (made with the lost password)
    are moved aside, so that the new login works; the registry itself is not touched."""
    users = spec.state_dir / "mlflow" / "basic_auth.db"
    if not spec.credentials_file.exists() and users.exists():
        aside = users.with_name(f"basic_auth.db.lost-login-{time.strftime('%Y%m%d-%H%M%S')}")
        users.rename(aside)
        log(f"mlflow: {spec.credentials_file} is gone: a new login is made; the old users database is kept as {aside}")
    _secret_file(spec.credentials_file, lambda: (
        f"[mlflow]\nmlflow_tracking_username = {MLFLOW_USER}\n"
        f"mlflow_tracking_password = {secrets.token_urlsafe(24)}\n"))


def mlflow_login(spec: StackSpec) -> dict[str, str]:
    """MLFLOW_TRACKING_USERNAME / _PASSWORD of this stack's MLflow (from its credentials file)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read_string(spec.credentials_file.read_text())
    return {"MLFLOW_TRACKING_USERNAME": cfg["mlflow"]["mlflow_tracking_username"],
            "MLFLOW_TRACKING_PASSWORD": cfg["mlflow"]["mlflow_tracking_password"]}


def _mlflow_env(spec: StackSpec) -> dict[str, str]:
    """What the MLflow server alone gets: its auth app's settings (users in their own sqlite database beside the
    registry's; no permission for a user not granted one; the admin is the platform's user) and the app's CSRF key."""
    folder = spec.state_dir.resolve() / "mlflow"
    ini = folder / "basic_auth.ini"
    write_local_atomic(ini, (
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        f"admin_username = {MLFLOW_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n").encode())
    key = _secret_file(folder / "flask_secret_key", lambda: secrets.token_hex(32))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_login(spec)["MLFLOW_TRACKING_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key.strip()}


def _ray_command(spec: StackSpec) -> list[str]:
    return [
        _bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={spec.host}", f"--port={spec.ray_port}",
        "--include-dashboard=true", f"--dashboard-host={spec.host}", f"--dashboard-port={spec.dashboard_port}",
        f"--ray-client-server-port={spec.ray_client_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={spec.ray_num_cpus}", f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
    ]


# how long `ray job stop` lets a job's driver unwind (end its MLflow run KILLED, free its locks) before SIGKILL; Ray's
# own 3 s is too short once every MLflow request checks a password
JOB_STOP_GRACE_S = 30


def _ray_env(spec: StackSpec) -> dict[str, str]:
    return {"RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_GRACE_S)}


def _ray_token(spec: StackSpec) -> str:
    """The stack's Ray token, made once (0600) in the state folder."""
    return _secret_file(spec.token_file, lambda: secrets.token_hex(32)).strip()


def _ray_healthy(spec: StackSpec) -> bool:
    token = spec.token_file.read_text().strip() if spec.token_file.exists() else ""
    return _http_ok(f"{spec.dashboard_url}/api/gcs_healthz", token=token)


def _urls(spec: StackSpec) -> dict[str, str]:
    """What `up` and `status` print for each service, in the order `up` prints them, and the store."""
    urls = {name: SERVICE_TABLE[name].url(spec) for name in ("ray", "mlflow")}
    urls["store"] = spec.store
    if spec.s3:
        urls["s3"] = SERVICE_TABLE["s3"].url(spec)
    return urls


def _s3_client(spec: StackSpec):
    import boto3  # the optional S3 test server only

    return boto3.client(
        "s3", endpoint_url=spec.s3_endpoint, aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY, region_name=S3_REGION,
    )


def _snapshot_dir(state_dir: Path) -> Path:
    """The S3 snapshot to restore: ``s3/``, or, after a crash between the swap's two renames, the complete new one
    (``s3.partial/`` with its ``.snapshot.json``, written last) or else the old one (``s3.old/``)."""
    snap, partial, old = state_dir / "s3", state_dir / "s3.partial", state_dir / "s3.old"
    if snap.exists():
        return snap
    if (partial / ".snapshot.json").exists():
        return partial
    return old if old.exists() else snap


def _s3_restore(spec: StackSpec, log) -> None:
    """Create the bucket and upload the snapshot that the last ``down`` left."""
    client = _s3_client(spec)
    snap = _snapshot_dir(spec.state_dir)
    buckets = {spec.bucket} | ({p.name for p in snap.iterdir() if p.is_dir()} if snap.exists() else set())
    n = 0
    for b in sorted(buckets):
        client.create_bucket(Bucket=b)
        root = snap / b
        if (root / SNAPSHOT_INDEX).exists():
            for entry in json.loads((root / SNAPSHOT_INDEX).read_text()):
                client.upload_file(str(root / "objects" / entry["file"]), b, entry["key"])
                n += 1
        elif root.exists():  # a snapshot from before the index: keys were paths
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    client.upload_file(str(f), b, f.relative_to(root).as_posix())
                    n += 1
    if n:
        log(f"s3: restored {n} objects from {snap}")


def _s3_snapshot(spec: StackSpec, log) -> None:
    """Copy every object of every bucket to ``<state>/s3/`` (written aside, then swapped in)."""
    client = _s3_client(spec)
    snap, tmp = spec.state_dir / "s3", spec.state_dir / "s3.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    for b in client.list_buckets().get("Buckets", []):
        objects = tmp / b["Name"] / "objects"
        objects.mkdir(parents=True)
        index = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # a "folder" marker some clients write; not data
                    continue
                # a key is any string ("../x", "/x", both "a" and "a/b"): never a path; its file is named by its hash
                name = hashlib.sha256(obj["Key"].encode()).hexdigest()
                client.download_file(b["Name"], obj["Key"], str(objects / name))
                index.append({"key": obj["Key"], "file": name})
                n += 1
        (tmp / b["Name"] / SNAPSHOT_INDEX).write_text(json.dumps(index))
    old = spec.state_dir / "s3.old"
    shutil.rmtree(old, ignore_errors=True)
    (tmp / ".snapshot.json").write_text(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "objects": n}))
    os.sync()  # the new snapshot is on disk before the old one is moved aside
    if snap.exists():
        snap.rename(old)
    tmp.rename(snap)  # a crash between the two renames: `_snapshot_dir` finds s3.partial (complete) or s3.old
    fsync_dir(spec.state_dir)
    shutil.rmtree(old, ignore_errors=True)
    log(f"s3: saved {n} objects to {snap}")


def _report_unclean_stop(spec: StackSpec, dead: list[str], log) -> None:
    """Say what an up after a crash, a kill or a reboot finds; nothing is rolled back without saying so."""
    log(f"stack: found {', '.join(dead)} not stopped by `down` (recorded as running, but gone: a crash, a kill or a "
        "reboot)")
    db = spec.state_dir / "mlflow" / "mlflow.db"
    if "mlflow" in dead and db.exists():
        with sqlite3.connect(db) as con:
            check = con.execute("PRAGMA integrity_check").fetchone()[0]
        log(f"mlflow: its database {db}: integrity check {check}; every committed run and model version is kept")
    if not spec.s3:
        log(f"store: local disk ({spec.store}): every write that returned is on disk; nothing to restore")
    if "s3" in dead:
        snap = _snapshot_dir(spec.state_dir)
        stamp = snap / ".snapshot.json"
        when = json.loads(stamp.read_text())["time"] if stamp.exists() else "never"
        log(f"s3: WARNING the in-memory S3 test server was not stopped by `down`: objects written to it after its "
            f"last snapshot ({when}) are LOST; restoring that snapshot")


def check_host(host: str) -> None:
    """The embedded stack is single-user: MLflow and the S3 test server take writes from whoever reaches them.  On
    any address but loopback they (and Ray, which then listens on every interface) would be open to the network."""
    if host not in LOOPBACK_HOSTS:
        raise StackError(f"--host {host}: the embedded stack listens on loopback only (127.0.0.1): its S3 test "
                         "server has no authentication and Ray would listen on every interface. For a shared "
                         "deployment use infra/ (MLflow behind basic auth, Ray with a token, NetworkPolicies)",
                         code=Exit.BAD_INPUT)


def private(root: Path) -> None:
    """The state folder and all it holds (the registry database, the store's shards and checkpoints, logs, the
    token) readable by this user only: folders 0700, files 0600 (a state folder from before this rule is
    tightened at the next ``up``).  Other local users could otherwise rewrite a registered model's files."""
    root = Path(root)
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o700)
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode & 0o700)


def up(spec: StackSpec, log=print) -> dict[str, ServiceRecord]:
    """Start whatever of the stack is not running; wait until all of it is healthy."""
    check_host(spec.host)
    spec.state_dir = Path(spec.state_dir).resolve()
    old_spec, services = load_state(spec.state_dir)
    if old_spec is not None and any(alive(r) for r in services.values()):
        if asdict(old_spec) != asdict(spec):
            log(f"stack in {spec.state_dir} is already running with its recorded settings; using those")
        spec = old_spec
    dead = [n for n, r in services.items() if alive(r) is None]
    os.umask(0o077)  # what this process and the services it starts write: this user's alone
    for sub in ("logs", "mlflow"):
        (spec.state_dir / sub).mkdir(parents=True, exist_ok=True)
    if not spec.s3:
        Path(spec.store).mkdir(parents=True, exist_ok=True)
    private(spec.state_dir)
    if dead:
        _report_unclean_stop(spec, dead, log)
    _ray_token(spec)
    _mlflow_credentials(spec, log)
    env = {**os.environ, **spec.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1",
           # `python` in a job's entrypoint (`ray job submit -- python pipelines/train.py`) is this environment's
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    for name in spec.services():
        rec = services.get(name)
        if rec is not None and alive(rec):
            try:
                _wait_healthy(name, spec, rec)
                log(f"{name}: already running (pid {rec.pid})")
                continue
            except StackError:
                if alive(rec):
                    raise
                log(f"{name}: its process (pid {rec.pid}) died as it was checked; starting it again")
        if rec is not None:
            _stop_leftovers(rec, log)
        busy = [p for p in spec.ports()[name] if port_in_use(p, spec.host)]
        if busy:
            raise StackError(
                f"{name}: port {busy[0]} on {spec.host} is already in use by another program; "
                f"free it or choose another port (prouigan platform up --{name}-port N)"
            )
        cmd = SERVICE_TABLE[name].command(spec)
        log_path = spec.state_dir / "logs" / f"{name}.log"
        own_env = SERVICE_TABLE[name].env(spec) if SERVICE_TABLE[name].env else {}
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**env, **own_env},
                cwd=spec.state_dir, start_new_session=True,
            )
        rec = ServiceRecord(name, proc.pid, psutil.Process(proc.pid).create_time(), spec.ports()[name],
                            str(log_path), cmd)
        services[name] = rec
        _save_state(spec, services)
        log(f"{name}: starting (pid {proc.pid}, log {log_path})")
        _wait_healthy(name, spec, rec)
        if SERVICE_TABLE[name].after_start is not None:
            SERVICE_TABLE[name].after_start(spec, log)
        log(f"{name}: healthy")
    _save_state(spec, services)
    for name, url in _urls(spec).items():
        log(f"  {name:7s} {url}")
    log(f"  env     source {spec.state_dir / 'env.sh'}  (or: eval $(prouigan platform env))")
    return services


@dataclass(frozen=True)
class Service:
    """One embedded service: how it starts, when it is healthy, what its address is, what happens after it
    started and before it stops.  ``SERVICES`` gives the start order (stop: the reverse); ``spec.ports()`` its
    ports, checked free before it starts; its log is ``logs/<name>.log`` in the state folder."""

    name: str
    command: Callable[[StackSpec], list[str]]
    healthy: Callable[[StackSpec], bool]
    url: Callable[[StackSpec], str]
    after_start: Callable[[StackSpec, Callable], None] | None = None
    before_stop: Callable[[StackSpec, Callable], None] | None = None  # raising keeps the service running
    env: Callable[[StackSpec], dict[str, str]] | None = None  # what this service alone gets (its own secrets)


SERVICE_TABLE = {
    "s3": Service("s3", _s3_command,
                  lambda spec: _http_ok(f"{spec.s3_endpoint}/"),  # ListBuckets: cheap (moto-api dumps every object)
                  lambda spec: f"{spec.s3_endpoint}  (bucket s3://{spec.bucket}, in memory: snapshotted at down)",
                  after_start=lambda spec, log: _s3_restore(spec, log),
                  before_stop=lambda spec, log: _s3_snapshot(spec, log)),
    "mlflow": Service("mlflow", _mlflow_command, lambda spec: _http_ok(f"{spec.mlflow_uri}/health"),  # open: no login
                      lambda spec: f"{spec.mlflow_uri}  (user {MLFLOW_USER}, password in {spec.credentials_file})",
                      env=_mlflow_env),
    "ray": Service("ray", _ray_command, _ray_healthy,
                   lambda spec: f"{spec.dashboard_url}  (RAY_ADDRESS={spec.ray_address}; token in {spec.token_file})",
                   env=_ray_env),
}
assert tuple(SERVICE_TABLE) == SERVICES


def _wait_healthy(name: str, spec: StackSpec, rec: ServiceRecord) -> None:
    deadline = time.monotonic() + spec.timeout_s
    while time.monotonic() < deadline:
        if SERVICE_TABLE[name].healthy(spec):
            return
        if alive(rec) is None:
            tail = Path(rec.log).read_text(errors="replace").strip().splitlines()[-5:]
            raise StackError(f"{name}: exited during start-up; last log lines:\n  " + "\n  ".join(tail))
        time.sleep(0.5)
    raise StackError(f"{name}: not healthy after {spec.timeout_s:.0f}s; see {rec.log}")


def status(state_dir: Path) -> list[dict]:
    spec, services = load_state(Path(state_dir))
    rows = []
    for name in (spec.services() if spec else SERVICES):
        rec = services.get(name)
        running = rec is not None and alive(rec) is not None
        rows.append({
            "service": name,
            "pid": rec.pid if rec else None,
            "running": running,
            "healthy": bool(running and spec is not None and SERVICE_TABLE[name].healthy(spec)),
            "url": _urls(spec)[name] if spec else "",
        })
    return rows


def stack_pids(state_dir: Path) -> set[int]:
    """Every live PID in the process trees the stack started."""
    _, services = load_state(Path(state_dir))
    pids: set[int] = set()
    for rec in services.values():
        p = alive(rec)
        if p is not None:
            pids.add(p.pid)
            pids.update(c.pid for c in p.children(recursive=True))
    return pids


def down(state_dir: Path, log=print, timeout_s: float = 30.0, force: bool = False) -> None:
    """Stop exactly the processes ``up`` started (and their children); keep all data on disk."""
    spec, services = load_state(Path(state_dir))
    if spec is None:
        log(f"no stack recorded in {state_dir}")
        return
    for name in reversed([n for n in SERVICES if n in services or n in spec.services()]):
        rec = services.get(name)
        proc = alive(rec) if rec else None
        if proc is None:
            if rec is not None:
                _stop_leftovers(rec, log)
            log(f"{name}: not running")
            continue
        if SERVICE_TABLE[name].before_stop is not None:
            try:
                SERVICE_TABLE[name].before_stop(spec, log)
            except Exception as e:
                if not force:
                    raise StackError(f"{name}: could not save what it holds ({type(e).__name__}: {e}); it is left "
                                     "running so nothing is lost. Fix the cause, or `prouigan platform down "
                                     "--force` to stop it and lose what it did not save") from e
                log(f"{name}: WARNING could not save what it holds ({e}); --force: what it did not save is lost")
        # SIGTERM the service's main process first so it can stop its own children (ray start --block
        # tears down GCS, raylet and workers); then whatever of the tree is left gets SIGTERM, then SIGKILL.
        tree = [proc, *proc.children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        psutil.wait_procs([proc], timeout=timeout_s)
        killed = _terminate(list({*tree, *leftovers(rec)}))
        log(f"{name}: stopped (pid {rec.pid}{', killed ' + str(killed) + ' stragglers' if killed else ''})")
    _save_state(spec, {})
