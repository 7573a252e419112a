"""Loss-weight search: Ray Tune over the training pipeline, Optuna (TPE) proposing, ASHA stopping early.

Each trial is a small driver function that starts the same ``TorchTrainer`` as `prouigan train` with the trial's
weights (Train V2: Tune runs functions, never a trainer object) and forwards every validation report to Tune
through ``TuneReportCallback``; ASHA compares trials on ``tune.metric`` at each report.  The Optuna study lives in
an RDB (sqlite in the state folder by default) named after the config's ``name``: running the same search again
adds trials to that study and TPE starts from everything it has already seen.

MLflow: one parent run per invocation, one child run per trial (its config, dataset, curves and grids; FINISHED
when it ran to the end, KILLED with ``stopped_early`` when ASHA cut it, FAILED with the error when it crashed), and
the best config as an artifact of the parent.  ``run_search`` is the whole search; `prouigan tune` prints it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import optuna
import ray
from ray import tune
from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from prouigan_platform import run_names as names
from prouigan_platform import tracking
from prouigan_platform.config import apply_overrides, validate
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.paths import state_dir
from prouigan_platform.training.driver import check_mix, fit, storage_args


def _key(dotted: str) -> str:
    return dotted.replace(".", "__")  # Tune treats '/' and nesting specially; keep parameter names flat


def trial_config(base: dict, params: dict, trial_id: str):
    """The resolved config of one trial: the base config with the sampled values, its own run name."""
    data = apply_overrides(base, [f"{k.replace('__', '.')}={v!r}" for k, v in params.items()])
    data["name"] = f"{base['name']}-{trial_id}"
    return validate(data, f"tune trial {trial_id}")


class ValidationToMlflow(UserCallback):
    """Logs each report's validation metrics to the trial's child run before Tune sees them.

    The workers log to MLflow in the background, and ASHA may stop a trial right after a report, before that
    thread has sent anything; the comparison the search made must still be in the child run."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        step = int(m.get(names.VAL_STEP, m.get("step", 0)))
        values = {k: float(v) for k, v in m.items() if k.startswith("val_") and k != names.VAL_STEP
                  and isinstance(v, (int, float)) and math.isfinite(v)}
        try:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=[
                mlflow.entities.Metric(k, v, int(time.time() * 1000), step) for k, v in values.items()])
        except Exception as e:  # best-effort, like all tracking: the search goes on
            print(f"[tune] could not log trial metrics to MLflow: {type(e).__name__}: {e}", file=sys.stderr)


def run_trial(params: dict, ctx: dict) -> None:
    """One Tune trial (runs in a Tune actor): start the TorchTrainer, report through TuneReportCallback."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx["config"], params, trial_id)
    run_id = None
    if ctx.get("parent_run_id"):
        run_id = tracking.open_run(cfg, "tune-trial", f"trial-{trial_id}", manifest=mf.load(ctx["manifest_uri"]),
                                   parent_run_id=ctx["parent_run_id"],
                                   tags={names.TUNE_TRIAL: trial_id, names.TUNE_STUDY: ctx["study"]})
    try:
        callbacks = ([ValidationToMlflow(run_id)] if run_id else []) + [TuneReportCallback()]
        result = fit(cfg, ctx["manifest_uri"], run_id, callbacks=callbacks, validation_logged=bool(run_id))
        if result.error is not None:
            raise result.error
    except BaseException as e:  # recorded, then re-raised so Tune marks the trial errored and goes on
        tracking.end_run(run_id, e)
        raise
    # a trial that ran to the end is closed FINISHED by ``close_trials``: Tune may stop this actor at the last report


def concurrent_trials(cfg) -> int:
    """How many trials the cluster fits at once: each takes num_workers x (CPU, GPU) plus a small driver."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    res = ray.cluster_resources()
    per_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker + 0.1
    fits = int(res.get("CPU", 1) // per_cpu)
    if cfg.train.use_gpu:
        fits = min(fits, int(res.get("GPU", 0) // cfg.train.num_workers))
    return max(1, fits)


def study_storage(cfg) -> str:
    if cfg.tune.study_storage:
        return cfg.tune.study_storage
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'optuna.db'}"


def baseline_point(cfg, storage) -> list[dict] | None:
    """The config's own values as the first trial of a new study (when they lie inside the space)."""
    if not cfg.tune.start_with_defaults:
        return None
    try:
        if optuna.load_study(study_name=cfg.name, storage=storage).trials:
            return None  # an existing study already has its baseline
    except KeyError:
        pass
    flat = cfg.to_flat_dict()
    outside = [k for k, r in cfg.tune.space.items() if not r.low <= flat[k] <= r.high]
    if outside:
        print(f"[tune] baseline trial: the config's own {', '.join(outside)} lie outside the search range; "
              "it is evaluated anyway, as the reference", file=sys.stderr)
    return [{_key(k): flat[k] for k in cfg.tune.space}]


def search(cfg, manifest: mf.Manifest, parent_run_id: str | None, experiment_id: str | None):
    """Run the Tuner; -> (ResultGrid, number of reports a full trial makes)."""
    check_mix(cfg, manifest)
    space = {_key(k): (tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high))
             for k, r in cfg.tune.space.items()}
    reports = math.ceil(cfg.train.steps / cfg.train.val_every)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(study_storage(cfg))
    searcher = OptunaSearch(metric=cfg.tune.metric, mode="max", study_name=cfg.name, storage=storage,
                            points_to_evaluate=baseline_point(cfg, storage))
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=cfg.tune.metric, mode="max", max_t=reports,
                              grace_period=min(cfg.tune.grace_period, reports),
                              reduction_factor=cfg.tune.reduction_factor)
    ctx = {"config": cfg.model_dump(mode="json"), "manifest_uri": manifest.uri, "study": cfg.name,
           "parent_run_id": parent_run_id, "experiment_id": experiment_id}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": 0.1})
    run_storage = storage_args(cfg.train.storage.rstrip("/") + "/tune")
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.tune.trials,
                                    max_concurrent_trials=concurrent_trials(cfg)),
        run_config=tune.RunConfig(name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  failure_config=tune.FailureConfig(max_failures=0), **run_storage),
    )
    return tuner.fit(), reports


def best_config(cfg, params: dict):
    data = cfg.model_dump(mode="json")
    best = trial_config(data, params, "best")
    best.name = f"{cfg.name}-best"
    return best


@dataclass
class Trial:
    trial_id: str
    status: str  # complete, stopped early, error
    reports: int
    value: float | None
    params: dict


@dataclass
class SearchOutcome:
    trials: list[Trial]
    reports: int  # reports a full trial makes
    best: Trial | None = None
    best_yaml: Path | None = None
    parent_run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def _trials(cfg, grid, reports: int) -> list[Trial]:
    out = []
    for r in grid:
        metrics = r.metrics or {}
        iters = metrics.get("training_iteration", 0)
        status = "error" if r.error else ("stopped early" if iters < reports else "complete")
        out.append(Trial(metrics.get("trial_id", "?"), status, iters, metrics.get(cfg.tune.metric),
                         {k.replace("__", "."): v for k, v in (r.config or {}).items()}))
    return out


def close_trials(experiment_id: str, trials: list[Trial]) -> None:
    """Each trial's child run ends as the trial did: KILLED (``stopped_early``) when ASHA cut it, FINISHED when it
    ran to the end (a crashed trial ended its own run FAILED)."""
    client = mlflow.MlflowClient()
    for t in trials:
        found = tracking.find_run(experiment_id, names.TUNE_TRIAL, t.trial_id)
        if found and t.status == "stopped early":
            client.set_tag(found.info.run_id, names.STOPPED_EARLY, "true")
            tracking.end_run(found.info.run_id, stopped=f"stopped early by ASHA after {t.reports} report(s)")
        elif found and t.status == "complete":
            tracking.end_run(found.info.run_id)


def run_search(cfg, manifest: mf.Manifest, out_dir: Path) -> SearchOutcome:
    """The whole search: the parent run, the trials, their runs closed, the best config written to
    ``out_dir/best.yaml`` and logged.  Ray must be initialised."""
    parent = None
    if tracking.enabled():
        parent = tracking.open_run(cfg, "tune", f"{cfg.name}-search", manifest=manifest,
                                   tags={names.TUNE_STUDY: cfg.name})
    else:
        print("[tune] MLFLOW_TRACKING_URI not set: searching without tracking", file=sys.stderr)
    with tracking.run_scope(parent):
        exp_id = mlflow.MlflowClient().get_run(parent).info.experiment_id if parent else None
        grid, reports = search(cfg, manifest, parent, exp_id)
        outcome = SearchOutcome(_trials(cfg, grid, reports), reports, parent_run_id=parent)
        if parent:
            close_trials(exp_id, outcome.trials)
        finished = [t for t in outcome.trials if t.status != "error" and t.value is not None and math.isfinite(t.value)]
        if not finished:
            raise NoTrialFinished(f"no trial finished with a finite {cfg.tune.metric}; no best config", outcome)
        outcome.best = max(finished, key=lambda t: t.value)
        out_dir.mkdir(parents=True, exist_ok=True)
        outcome.best_yaml = out_dir / "best.yaml"
        best = best_config(cfg, outcome.best.params)
        outcome.best_yaml.write_text(best.to_yaml())
        if parent:
            client = mlflow.MlflowClient()
            client.log_text(parent, best.to_yaml(redacted=True), "best.yaml")  # credentials in URLs masked
            client.log_metric(parent, f"best_{cfg.tune.metric}", outcome.best.value)
            for k, v in outcome.best.params.items():
                client.set_tag(parent, f"best.{k}", f"{v:.6g}")
    return outcome


class NoTrialFinished(RuntimeError):
    """Every trial crashed or diverged: the search has no best config (its parent run ends FAILED)."""

    def __init__(self, message: str, outcome: SearchOutcome | None = None):
        super().__init__(message)
        self.outcome = outcome
