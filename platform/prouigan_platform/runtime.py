"""Finding the stack: environment first (RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, ...), else the
embedded stack recorded in the state folder by ``prouigan platform up``.  Connecting to Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prouigan_platform import stack


def default_state_dir() -> Path:
    return Path(os.environ.get("PROUIGAN_STATE_DIR", ".platform"))


def use_embedded_stack(state_dir: Path | None = None, quiet: bool = False) -> bool:
    """Export the embedded stack's environment where the caller's environment names no stack.

    Variables already set win (a remote cluster stays a remote cluster).  Returns True when the
    embedded stack's variables were used.
    """
    if os.environ.get("RAY_ADDRESS") and os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    state_dir = Path(state_dir or default_state_dir())
    spec, services = stack.load_state(state_dir)
    if spec is None or not any(stack._alive(r) for r in services.values()):
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


def init_ray(**kwargs):
    """Connect to RAY_ADDRESS (or start a local Ray when it is unset), passing the stack's environment to
    every worker so they reach the same MLflow server and S3 endpoint."""
    import ray

    if ray.is_initialized():
        return ray
    env_vars = {k: os.environ[k] for k in (*stack.StackSpec().env(), "PROUIGAN_STATE_DIR") if k in os.environ}
    runtime_env = kwargs.pop("runtime_env", {}) or {}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        runtime_env.setdefault("env_vars", {}).update(env_vars)
    # else: a driver started by `ray job submit`: the job's runtime env (working_dir, env_vars) already reaches
    # every worker, and Ray refuses a driver runtime env that repeats its keys
    # without RAY_ADDRESS: a fresh local Ray, never whatever /tmp/ray says was last started here (after a
    # reboot that record points at a dead cluster and ray.init would wait on it for minutes)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", runtime_env=runtime_env,
             log_to_driver=kwargs.pop("log_to_driver", True), **kwargs)
    return ray
