"""Loss-weight search: Ray Tune over the training pipeline, Optuna (TPE) proposing, ASHA stopping early.

Each trial is a small driver function that starts the same ``TorchTrainer`` as ``prouigan train`` with the
trial's weights (Train V2: Tune runs functions, never a trainer object) and forwards every validation report to
Tune through ``TuneReportCallback``; ASHA compares trials on ``tune.metric`` at each report.  The Optuna study
lives in an RDB (sqlite in the state folder by default) named after the config's ``name``: running the same
search again adds trials to that study and TPE starts from everything it has already seen.

MLflow: one parent run per invocation, one child run per trial (its config, curves and grids, status FAILED
with the error for a crashed trial, ``stopped_early`` for one ASHA cut), and the best config as an artifact.

    prouigan tune -c cpu-small tune.trials=12
    prouigan train -c outputs/tune/cpu-small/best.yaml        # or: prouigan train --from-tune RUN_ID
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

HELP = "search loss weights with Ray Tune + Optuna (TPE) + ASHA; every trial tracked in MLflow"


def add_arguments(parser) -> None:
    from prouigan_platform.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--output", type=Path, default=None,
                        help="where best.yaml goes (default outputs/tune/NAME/)")


def _key(dotted: str) -> str:
    return dotted.replace(".", "__")  # Tune treats '/' and nesting specially; keep parameter names flat


def trial_config(base: dict, params: dict, trial_id: str):
    """The resolved config of one trial: the base config with the sampled values, its own run name."""
    from prouigan_platform.config import apply_overrides, validate

    data = apply_overrides(base, [f"{k.replace('__', '.')}={v!r}" for k, v in params.items()])
    data["name"] = f"{base['name']}-{trial_id}"
    return validate(data, f"tune trial {trial_id}")


def run_trial(params: dict, ctx: dict) -> None:
    """One Tune trial (runs in a Tune actor): start the TorchTrainer, report through TuneReportCallback."""
    import mlflow
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train import fit

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(ctx["config"], params, trial_id)
    client, run_id = None, None
    if ctx.get("parent_run_id"):
        client = mlflow.MlflowClient()
        run = client.create_run(ctx["experiment_id"], run_name=f"trial-{trial_id}",
                                tags={"mlflow.parentRunId": ctx["parent_run_id"], "tune_trial": trial_id,
                                      "tune_study": ctx["study"], "pipeline": "tune-trial"})
        run_id = run.info.run_id
        flat = cfg.to_flat_dict()
        client.log_batch(run_id, params=[mlflow.entities.Param(k, ("" if v is None else str(v))[:6000])
                                         for k, v in flat.items()])
        client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    try:
        result = fit(cfg, ctx["manifest_uri"], run_id, callbacks=[TuneReportCallback()])
        if result.error is not None:
            raise result.error
    except BaseException as e:  # recorded, then re-raised so Tune marks the trial errored and goes on
        if client is not None:
            client.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:4000])
            client.set_terminated(run_id, "FAILED")
        raise
    # a trial that ran to the end is closed FINISHED by the driver: Tune may stop this actor at the last report


def concurrent_trials(cfg) -> int:
    """How many trials the cluster fits at once: each takes num_workers x (CPU, GPU) plus a small driver."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    res = ray.cluster_resources()
    per_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker + 0.1
    fit = int(res.get("CPU", 1) // per_cpu)
    if cfg.train.use_gpu:
        fit = min(fit, int(res.get("GPU", 0) // cfg.train.num_workers))
    return max(1, fit)


def study_storage(cfg) -> str:
    if cfg.tune.study_storage:
        return cfg.tune.study_storage
    from prouigan_platform.runtime import default_state_dir

    d = default_state_dir().resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'optuna.db'}"


def baseline_point(cfg, storage) -> list[dict] | None:
    """The config's own values as the first trial of a new study (when they lie inside the space)."""
    import optuna

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


def search(cfg, manifest: dict, parent_run_id: str | None, experiment_id: str | None):
    """Run the Tuner; -> (ResultGrid, number of reports a full trial makes)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.train import storage_args

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
    ctx = {"config": cfg.model_dump(mode="json"), "manifest_uri": manifest["_uri"], "study": cfg.name,
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


def run(args) -> int:
    import mlflow

    from prouigan_platform.cli import config_from_args
    from prouigan_platform.dataset import manifest as mf
    from prouigan_platform.runtime import init_ray, use_embedded_stack
    from prouigan_platform.tracking import git_commit, log_config

    cfg = config_from_args(args)
    use_embedded_stack()
    manifest = mf.load(cfg.train.dataset or cfg.data.output)
    tracking = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    parent_run_id = experiment_id = None
    if tracking:
        mlflow.set_experiment(cfg.tracking.experiment)
        experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        with mlflow.start_run(run_name=f"{cfg.name}-search",
                              tags={"pipeline": "tune", "tune_study": cfg.name, "git_commit": git_commit(),
                                    "data_manifest": manifest["_uri"], "data_manifest_digest": manifest["digest"]}
                              ) as parent:
            log_config(cfg)
        parent_run_id = parent.info.run_id
    else:
        print("[tune] MLFLOW_TRACKING_URI not set: searching without tracking", file=sys.stderr)
    init_ray(log_to_driver=True)
    grid, reports = search(cfg, manifest, parent_run_id, experiment_id)

    rows, best = [], None
    for r in grid:
        params = {k.replace("__", "."): v for k, v in (r.config or {}).items()}
        iters = (r.metrics or {}).get("training_iteration", 0)
        value = (r.metrics or {}).get(cfg.tune.metric)
        status = "error" if r.error else ("stopped early" if iters < reports else "complete")
        rows.append((r.metrics.get("trial_id", "?") if r.metrics else "?", status, iters, value, params))
        if not r.error and value is not None and math.isfinite(value) and (best is None or value > best[0]):
            best = (value, params)
    print(f"\n[tune] {len(rows)} trials ({cfg.tune.metric}, higher is better; {reports} reports make a full trial)")
    for trial_id, status, iters, value, params in rows:
        v = f"{value:.3f}" if isinstance(value, float) else "-"
        print(f"  {trial_id:12s} {status:14s} reports {iters:3d}  {cfg.tune.metric} {v:>8s}  "
              + "  ".join(f"{k}={p:.3g}" for k, p in params.items()))
    client = mlflow.MlflowClient() if tracking else None
    if client is not None:
        for trial_id, status, *_ in rows:
            found = client.search_runs([experiment_id], f"tags.tune_trial = '{trial_id}'", max_results=1)
            if found and status == "stopped early":
                client.set_tag(found[0].info.run_id, "stopped_early", "true")
                client.set_terminated(found[0].info.run_id, "KILLED")
            elif found and status == "complete":
                client.set_terminated(found[0].info.run_id, "FINISHED")
    if best is None:
        print("[tune] no trial finished with a finite metric; no best config", file=sys.stderr)
        if client is not None:
            client.set_terminated(parent_run_id, "FAILED")
        return 1
    out_dir = args.output or Path("outputs/tune") / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    best_cfg = best_config(cfg, best[1])
    path = out_dir / "best.yaml"
    path.write_text(best_cfg.to_yaml())
    if client is not None:
        client.log_artifact(parent_run_id, str(path))
        client.log_metric(parent_run_id, f"best_{cfg.tune.metric}", best[0])
        for k, v in best[1].items():
            client.set_tag(parent_run_id, f"best.{k}", f"{v:.6g}")
        client.set_terminated(parent_run_id, "FINISHED")
    print(f"[tune] best {cfg.tune.metric} {best[0]:.3f} with "
          + ", ".join(f"{k}={v:.4g}" for k, v in best[1].items()))
    print(f"[tune] best config: {path}" + (f" (also an artifact of MLflow run {parent_run_id})" if client else ""))
    print(f"[tune] train the final model: prouigan train --config {path}"
          + (f"   or   prouigan train --from-tune {parent_run_id}" if client else ""))
    return 0


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("tune")
