"""`prouigan hello -c CONFIG`: a first end-to-end check of the stack: the resolved config, a small Ray job on the
cluster, an MLflow run with an artifact in the artifact store."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import mlflow
import ray

from prouigan_platform.config import config_from_args
from prouigan_platform.errors import Exit
from prouigan_platform.runtime import init_ray, require_env
from prouigan_platform.tracking import start_run


def _square(i: int) -> tuple[int, str, int]:
    return i * i, socket.gethostname(), os.getpid()


def run(args) -> int:
    config = config_from_args(args)
    require_env("MLFLOW_TRACKING_URI")
    init_ray()
    square = ray.remote(num_cpus=0.25)(_square)
    results = ray.get([square.remote(i) for i in range(args.tasks)])
    total = sum(r[0] for r in results)
    workers = len({(r[1], r[2]) for r in results})
    print(f"ray: {args.tasks} tasks on {workers} worker process(es), sum of squares = {total}")
    if total != sum(i * i for i in range(args.tasks)):
        raise RuntimeError(f"Ray returned a wrong sum of squares: {total}")
    with start_run(config, f"{config.name}-hello", "hello") as r:
        mlflow.log_metric("sum_of_squares", total)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "hello.txt"
            p.write_text(f"config digest {config.digest()}\n")
            mlflow.log_artifact(str(p))
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)]
    print(f"mlflow: run {r.info.run_id} in experiment '{config.tracking.experiment}', artifacts {artifacts} at "
          f"{r.info.artifact_uri}")
    print(f"mlflow: {os.environ['MLFLOW_TRACKING_URI']}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}")
    return Exit.OK
