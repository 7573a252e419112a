"""A first end-to-end check of the stack: the resolved config, a small Ray job on the cluster, an MLflow
run whose artifact lands in the S3 bucket.

    prouigan hello --config pipelines/configs/demo.yaml
    ray job submit --working-dir . -- python pipelines/hello.py --config demo
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

HELP = "smoke-test the stack: a Ray job and an MLflow run with an artifact in S3"


def add_arguments(parser) -> None:
    from prouigan_platform.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--tasks", type=int, default=8, help="number of Ray tasks to fan out")


def _square(i: int) -> tuple[int, str, int]:
    return i * i, socket.gethostname(), os.getpid()


def run(args) -> int:
    import mlflow
    import ray

    from prouigan_platform.cli import config_from_args
    from prouigan_platform.runtime import init_ray, require_env, use_embedded_stack
    from prouigan_platform.tracking import start_run

    config = config_from_args(args)
    use_embedded_stack()
    require_env("MLFLOW_TRACKING_URI")
    init_ray(log_to_driver=False)
    square = ray.remote(num_cpus=0.25)(_square)
    results = ray.get([square.remote(i) for i in range(args.tasks)])
    total = sum(r[0] for r in results)
    workers = len({(r[1], r[2]) for r in results})
    print(f"ray: {args.tasks} tasks on {workers} worker process(es), sum of squares = {total}")
    assert total == sum(i * i for i in range(args.tasks))

    with start_run(config, run_name=f"{config.name}-hello", tags={"pipeline": "hello"}) as run:
        mlflow.log_metric("sum_of_squares", total)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "hello.txt"
            p.write_text(f"config digest {config.digest()}\n")
            mlflow.log_artifact(str(p))
        artifact_uri = run.info.artifact_uri
    print(f"mlflow: run {run.info.run_id} in experiment '{config.tracking.experiment}', artifacts at {artifact_uri}")
    print(f"mlflow: {os.environ['MLFLOW_TRACKING_URI']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    bucket = os.environ.get("PROUIGAN_BUCKET")
    if bucket and os.environ.get("AWS_ENDPOINT_URL"):  # the embedded stack proxies artifacts into its bucket
        from prouigan_platform.storage import boto3_client

        prefix = f"mlflow-artifacts/{run.info.experiment_id}/{run.info.run_id}/"
        keys = [o["Key"] for o in boto3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
        print(f"s3: {len(keys)} artifact object(s) under s3://{bucket}/{prefix}: "
              f"{', '.join(k.rsplit('/', 1)[-1] for k in keys)}")
    return 0


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("hello")
