"""MLflow helpers: one experiment per config, the whole resolved config as params + a YAML artifact,
git and data tags.  Everything here runs on the driver or on rank 0 only."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import mlflow

from prouigan_platform.config import Config


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def log_config(config: Config) -> None:
    """The whole resolved config: flat params (dotted keys) and config.yaml."""
    params = {k: ("" if v is None else str(v))[:6000] for k, v in config.to_flat_dict().items()}
    mlflow.log_params(params)
    mlflow.log_text(config.to_yaml(), "config.yaml")
    mlflow.set_tag("config_digest", config.digest())


@contextmanager
def start_run(config: Config, run_name: str, tags: dict[str, str] | None = None, nested: bool = False):
    mlflow.set_experiment(config.tracking.experiment)
    with mlflow.start_run(run_name=run_name, nested=nested,
                          tags={"git_commit": git_commit(), **(tags or {})}) as run:
        log_config(config)
        yield run
