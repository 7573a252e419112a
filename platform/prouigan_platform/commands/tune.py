"""`prouigan tune -c CONFIG`: search loss weights with Ray Tune + Optuna (TPE) + ASHA (``search.py``), then write
the best config.

    prouigan tune -c cpu-small tune.trials=12
    prouigan train -c outputs/tune/cpu-small/best.yaml        # or: prouigan train --from-tune RUN_ID
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import mlflow

from prouigan_platform.config import config_from_args
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.runtime import init_ray
from prouigan_platform.search import best_config, search
from prouigan_platform.tracking import git_commit, log_config


def run(args) -> int:
    cfg = config_from_args(args)
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
    init_ray()
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
