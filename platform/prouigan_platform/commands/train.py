"""`prouigan train -c CONFIG`: distributed training of Pro-UIGAN with Ray Train, then registration.

The driver resolves the config, finds the dataset version, opens (or re-opens) the MLflow run and starts a
``TorchTrainer`` (``prouigan_platform.training``).  Re-running with the same ``name`` resumes from the latest
checkpoint; ``train.max_failures`` restarts lost workers from it.  The best checkpoint is registered as a new
version of ``tracking.registered_model`` with alias ``challenger``.

    prouigan train -c cpu-small
    ray job submit --working-dir . -- python pipelines/train.py -c gpu-paper
"""

from __future__ import annotations

import sys

import ray.exceptions
import ray.train

from prouigan_platform.config import config_from_args
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.errors import BadInput, Exit
from prouigan_platform.runtime import init_ray
from prouigan_platform.training.driver import config_from_tune, tracking_off, train_and_register


def run(args) -> int:
    if args.from_tune:
        if args.config:
            raise BadInput("give --config or --from-tune, not both")
        cfg = config_from_tune(args.from_tune, args.overrides)
    else:
        cfg = config_from_args(args)
    manifest = mf.load(cfg.train.dataset or cfg.data.output)
    init_ray()
    try:
        out = train_and_register(cfg, manifest)
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as e:  # failed more often than max_failures
        print(f"prouigan train: error: training failed: {' '.join(str(e).split())[:600]}"
              + ("" if tracking_off() else "; its MLflow run is marked FAILED"), file=sys.stderr)
        return Exit.FAILED
    return Exit.OK if out["checkpoint"] and (out["version"] or tracking_off()) else Exit.FAILED
