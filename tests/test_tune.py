"""Loss-weight search on the real stack: Ray Tune trials that each start a TorchTrainer, Optuna (TPE) with a
persistent study, ASHA cutting bad trials, MLflow parent + child runs, the best config feeding `train`."""

from __future__ import annotations

import mlflow
import optuna
import pytest
import yaml

from prouigan_platform.config import load_config
from tests.conftest import run_cli

pytestmark = [pytest.mark.stack, pytest.mark.slow]  # trials of real trainings: ~4 minutes in all


def _cli(stack, *args: str, timeout: int = 900):
    return run_cli(stack, *args, timeout=timeout)


@pytest.fixture(scope="module")
def searched(stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    db = f"sqlite:///{tmp / 'optuna.db'}"
    # lr_g from 3 to 30 makes every sampled trial diverge; the first trial is the baseline (the config's own
    # lr 2e-3), and trials run one at a time, so ASHA must cut sampled ones at the first report
    common = ["-c", "smoke", f"data.output={tmp / 'ds'}", f"train.storage={tmp / 'ck'}", "name=tune-test",
              "tracking.experiment=tune-test", "train.num_workers=1", "train.steps=12", "train.val_every=3",
              "train.val_samples=8", "train.lr_g=0.002", "tune.trials=4", "tune.max_concurrent_trials=1",
              f"tune.study_storage={db}",
              "tune.space={train.lr_g: {low: 3, high: 30}}", "tune.reduction_factor=2"]
    assert _cli(stack, "shard", *common).returncode == 0
    out = _cli(stack, "tune", *common, "--output", str(tmp / "out"))
    return stack, common, tmp, db, out


def test_a_search_completes_asha_cuts_bad_trials_and_every_trial_has_a_child_run(searched):
    stack, common, tmp, db, out = searched
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "stopped early" in out.stdout, out.stdout[-3000:]
    mlflow.set_tracking_uri(stack.mlflow_uri)
    exp = mlflow.get_experiment_by_name("tune-test")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    parents = [r for r in runs if r.data.tags.get("pipeline") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    assert any(r.data.tags.get("stopped_early") == "true" for r in children)
    assert all("val_psnr" in r.data.metrics for r in children)
    # every trial's run is closed: KILLED when ASHA cut it, FINISHED when it ran to the end
    assert all(r.info.status == ("KILLED" if r.data.tags.get("stopped_early") else "FINISHED") for r in children)
    assert "best.yaml" in [a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id)]


def test_the_best_config_loads_into_train_and_keeps_the_baseline(searched):
    _, _, tmp, _, out = searched
    best = load_config(tmp / "out" / "best.yaml")
    assert best.name == "tune-test-best"
    assert best.train.lr_g == pytest.approx(2e-3)  # the baseline trial wins: every other lr diverges
    assert yaml.safe_load((tmp / "out" / "best.yaml").read_text())["train"]["steps"] == 12


def test_running_the_search_again_adds_trials_to_the_same_study(searched):
    stack, common, tmp, db, _ = searched
    before = len(optuna.load_study(study_name="tune-test", storage=db).trials)
    out = _cli(stack, "tune", *[c for c in common if not c.startswith("tune.trials")], "tune.trials=1",
               "--output", str(tmp / "out2"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    study = optuna.load_study(study_name="tune-test", storage=db)
    assert before == 4 and len(study.trials) == 5
    assert study.trials[-1].params["train__lr_g"] != pytest.approx(2e-3)  # no second baseline


def test_a_crashing_trial_is_recorded_as_failed_and_the_search_goes_on(stack, tmp_path):
    # a perceptual weight with a VGG file that does not exist: every trial's workers raise at start-up
    common = ["-c", "smoke", f"data.output={tmp_path / 'ds'}", f"train.storage={tmp_path / 'ck'}", "name=tune-crash",
              "tracking.experiment=tune-crash", "train.num_workers=1", "train.steps=3", "train.val_every=3",
              "train.max_failures=0", "tune.trials=2", "tune.max_concurrent_trials=1",
              f"tune.study_storage=sqlite:///{tmp_path / 'optuna.db'}", "loss.vgg_weights=/nonexistent/vgg19.pth",
              "tune.space={loss.perceptual: {low: 0.001, high: 0.01}}", "tune.start_with_defaults=false"]
    assert _cli(stack, "shard", *common).returncode == 0
    out = _cli(stack, "tune", *common, "--output", str(tmp_path / "out"))
    assert out.returncode == 1, (out.stdout + out.stderr)[-4000:]
    assert "no trial finished" in out.stderr
    mlflow.set_tracking_uri(stack.mlflow_uri)
    exp = mlflow.get_experiment_by_name("tune-crash")
    children = [r for r in mlflow.search_runs([exp.experiment_id], output_format="list")
                if r.data.tags.get("pipeline") == "tune-trial"]
    assert len(children) == 2  # the first crash did not end the search
    assert all(r.info.status == "FAILED" and "vgg19" in r.data.tags.get("error", "") for r in children)
