"""`prouigan demo` scores and draws the model its own training registered, not whatever @challenger points at."""

from __future__ import annotations

import mlflow
import pytest

from prouigan_platform import run_names as names
from prouigan_platform.commands.demo import trained_version
from prouigan_platform.config import load_config
from prouigan_platform.errors import UserError
from prouigan_platform.tracking import experiment_id

pytestmark = pytest.mark.stack


def test_the_demo_uses_the_version_its_training_registered(stack):
    overrides = ["name=demo-version-test"]
    cfg = load_config("demo", overrides)
    client = mlflow.MlflowClient()
    exp = experiment_id(cfg.tracking.experiment)
    with pytest.raises(UserError, match="registered no model"):
        trained_version(overrides)
    # the demo's run, then a later training of another recipe (a benchmark arm) that registered after it
    client.create_run(exp, run_name=cfg.name, tags={names.TRAIN_NAME: cfg.name,
                                                    names.REGISTERED_VERSION: "models:/prouigan/3"})
    client.create_run(exp, run_name="cpu-mixed-sbs", tags={names.TRAIN_NAME: "cpu-mixed-sbs",
                                                           names.REGISTERED_VERSION: "models:/prouigan/4"})
    assert trained_version(overrides) == "models:/prouigan/3"
