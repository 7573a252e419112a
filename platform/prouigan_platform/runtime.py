"""Finding the stack: environment first (RAY_ADDRESS, MLFLOW_TRACKING_URI, PROUIGAN_STORE, ...), else the embedded
stack recorded in the state folder by ``prouigan platform up``.  Connecting to Ray, quietly unless --verbose."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from prouigan_platform import stack
from prouigan_platform.errors import stop_on_sigterm
from prouigan_platform.paths import state_dir as default_state_dir

# what every Ray worker needs to reach the same services and store as the driver: addresses and settings, never a
# credential.  A job's runtime env is shown by the dashboard and written to Ray's logs; workers get credentials
# from their node's own environment (the embedded stack's `ray start` has them, a cluster's nodes from Secrets).
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
             "AWS_DEFAULT_REGION", "PROUIGAN_STORE", "PROUIGAN_STATE_DIR", "PROUIGAN_VERBOSE",
             "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
TOKEN_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")  # what Ray reads its token auth from


def verbose() -> bool:
    return os.environ.get("PROUIGAN_VERBOSE") == "1"


def use_embedded_stack(state_dir: Path | None = None, quiet: bool = False) -> bool:
    """Export the embedded stack's environment where the caller's environment names no stack.

    Variables already set win (a remote cluster stays a remote cluster).  Returns True when the
    embedded stack's variables were used.
    """
    if os.environ.get("RAY_ADDRESS") and os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    state_dir = Path(state_dir or default_state_dir())
    spec, services = stack.load_state(state_dir)
    if spec is None or not any(stack.alive(r) for r in services.values()):
        return False
    for k, v in spec.env().items():
        os.environ.setdefault(k, v)
    if not quiet:
        print(f"[prouigan] using the embedded stack in {state_dir} (mlflow {spec.mlflow_uri}, ray {spec.ray_address})",
              file=sys.stderr)
    return True


def require_env(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: run `prouigan platform up` (embedded stack) or export the "
            "addresses of your cluster's services"
        )


def init_ray(local: bool = False, **kwargs):
    """Connect to RAY_ADDRESS (or start a private local Ray when it is unset or ``local``), passing the stack's
    environment to every worker so they reach the same MLflow server and store.  Ray's own INFO lines are
    silenced unless --verbose; what our code prints on workers still reaches this console."""
    import ray  # here, not at the top: commands that only find the stack (evaluate, hallucinate) never load Ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return ray
    level = "INFO" if verbose() else "WARNING"
    if not verbose():
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    env_vars = {k: os.environ[k] for k in FORWARDED if k in os.environ}
    runtime_env = kwargs.pop("runtime_env", {}) or {}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        runtime_env.setdefault("env_vars", {}).update(env_vars)
    # else: a driver started by `ray job submit`: the job's runtime env (working_dir, env_vars) already reaches
    # every worker, and Ray refuses a driver runtime env that repeats its keys
    if local or not os.environ.get("RAY_ADDRESS"):
        if ray_constants.ENABLE_RAY_CLUSTER:
            # Ray would replace 127.0.0.1 by the network address and listen there (see stack.SINGLE_NODE_ENV)
            raise RuntimeError(f"a private local Ray must be started with {stack.SINGLE_NODE_ENV} in the environment "
                               "before Ray is imported (the prouigan CLI sets it)")
        # a fresh private Ray, never whatever /tmp/ray says was last started here (after a reboot that record
        # points at a dead cluster and ray.init would wait on it for minutes); >= 4 slots, see stack.py
        kwargs = {"address": "local", "num_cpus": max(4, os.cpu_count() or 1), "include_dashboard": False,
                  "_node_ip_address": "127.0.0.1", **kwargs}
        with private_ray_token():
            _init(ray, runtime_env, level, kwargs)
    else:
        _reload_ray_auth()  # this process may have run a private Ray before: read the environment's settings now
        _init(ray, runtime_env, level, {"address": os.environ["RAY_ADDRESS"], **kwargs})
    if threading.current_thread() is threading.main_thread():
        stop_on_sigterm()  # ray.init made SIGTERM a bare sys.exit; ours unwinds as a stop (runs end KILLED)
    return ray


def _init(ray, runtime_env: dict, level: str, kwargs: dict) -> None:
    ray.init(runtime_env=runtime_env, log_to_driver=kwargs.pop("log_to_driver", True),
             logging_level=logging.INFO if verbose() else logging.WARNING,
             logging_config=ray.LoggingConfig(log_level=level), **kwargs)


def _reload_ray_auth() -> None:
    """Ray reads its auth mode into a cached config when imported and caches the token when first loaded: make it
    read the environment as it is now (what Ray itself does when it turns token auth on)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def private_ray_token():
    """Token authentication for a private local Ray, scoped to its start: a fresh token in a 0700 temporary folder
    (0600, removed when this process exits) is named in the environment while ``ray.init`` starts the node (its
    GCS, raylet and every worker it starts keep it; this process's Ray keeps it cached), and the caller's
    environment is put back after, so nothing this process starts later (a ``ray job submit`` to another
    cluster) inherits it.  Without it, any local user could run code through the private Ray's GCS and worker
    ports, loopback or not."""
    folder = Path(tempfile.mkdtemp(prefix="prouigan-ray-"))  # 0700
    path = folder / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, folder, True)
    saved = {k: os.environ.get(k) for k in TOKEN_ENV}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)})
    try:
        _reload_ray_auth()
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_local_ray(local: bool = False) -> None:
    """Before Ray is imported: a command that will start a private local Ray (no RAY_ADDRESS, or ``--local``) keeps
    it single-node, on 127.0.0.1 (stack.SINGLE_NODE_ENV)."""
    if local or not os.environ.get("RAY_ADDRESS"):
        for k, v in stack.SINGLE_NODE_ENV.items():
            os.environ.setdefault(k, v)
