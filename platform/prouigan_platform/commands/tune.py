"""`prouigan tune -c CONFIG`: search loss weights with Ray Tune + Optuna (TPE) + ASHA (``search.py``), then write
the best config.

    prouigan tune -c cpu-small tune.trials=12
    prouigan train -c outputs/tune/cpu-small/best.yaml        # or: prouigan train --from-tune RUN_ID
"""

from __future__ import annotations

import sys
from pathlib import Path

from prouigan_platform.config import config_from_args
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.errors import Exit
from prouigan_platform.paths import outputs_dir
from prouigan_platform.runtime import init_ray
from prouigan_platform.search import NoTrialFinished, run_search


def _print_trials(cfg, outcome) -> None:
    metric = cfg.tune.metric
    print(f"\n[tune] {len(outcome.trials)} trials ({metric}, higher is better; {outcome.reports} reports make a full "
          "trial)")
    for t in outcome.trials:
        v = f"{t.value:.3f}" if isinstance(t.value, float) else "-"
        print(f"  {t.trial_id:12s} {t.status:14s} reports {t.reports:3d}  {metric} {v:>8s}  "
              + "  ".join(f"{k}={p:.3g}" for k, p in t.params.items()))


def run(args) -> int:
    cfg = config_from_args(args)
    manifest = mf.load(cfg.train.dataset or cfg.data.output)
    init_ray()
    try:
        outcome = run_search(cfg, manifest, Path(args.output or outputs_dir("tune", cfg.name)))
    except NoTrialFinished as e:
        if e.outcome is not None:
            _print_trials(cfg, e.outcome)
        print(f"[tune] {e}", file=sys.stderr)
        return Exit.FAILED
    _print_trials(cfg, outcome)
    best, parent = outcome.best, outcome.parent_run_id
    print(f"[tune] best {cfg.tune.metric} {best.value:.3f} with "
          + ", ".join(f"{k}={v:.4g}" for k, v in best.params.items()))
    print(f"[tune] best config: {outcome.best_yaml}"
          + (f" (also an artifact of MLflow run {parent})" if parent else ""))
    print(f"[tune] train the final model: prouigan train --config {outcome.best_yaml}"
          + (f"   or   prouigan train --from-tune {parent}" if parent else ""))
    return Exit.OK
