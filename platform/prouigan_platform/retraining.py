"""Scheduled retraining: new faces -> incremental dataset version -> fine-tune the champion -> evaluate -> gate.

    prouigan retrain -c cpu-small                      # from cron, a systemd timer or a Kubernetes CronJob
    ray job submit --working-dir . -- python pipelines/retrain.py -c gpu-paper

1. shard: list ``data.sources`` and shard only inputs that are new or changed since the latest dataset version
   (an incremental version that keeps its parent's shards);
2. decide: when the latest version is the one the current champion was trained on, there is nothing to do,
   and it says so (exit 0);
3. fine-tune: train ``NAME-retrain-vNNNN`` on the whole new version, the generator starting from the champion
   (a first run, with no champion, trains from scratch); registered as a new version with alias challenger;
4. evaluate the new version and the champion on ``eval.split`` and promote it through the gate.

The whole pipeline holds a retrain lock in the bucket, so a second retrain started meanwhile exits at once; the
champion alias itself only moves by the gate's compare-and-set.  Every retrain is an MLflow run (experiment
``<tracking.experiment>-retrain``) tagged with each step's outcome; a failure at any step marks it FAILED with
the step and the error, and leaves the champion where it was.
"""

from __future__ import annotations

import mlflow

from prouigan.presets import generator_config
from prouigan_platform import gate, tracking
from prouigan_platform import run_names as names
from prouigan_platform.config import ConfigError
from prouigan_platform.dataset.build import build_version
from prouigan_platform.dataset.sources import list_sources
from prouigan_platform.errors import UserError
from prouigan_platform.locks import retrain_lock
from prouigan_platform.paths import outputs_dir
from prouigan_platform.promotion import evaluate_model
from prouigan_platform.registry import alias_version, resolve_model
from prouigan_platform.training.driver import train_and_register


def _champion_digest(champion) -> str | None:
    if champion is None:
        return None
    return mlflow.MlflowClient().get_run(champion.run_id).data.tags.get(names.DATASET_DIGEST)


def _init_from_champion(cfg, champion) -> dict:
    uri = f"models:/{champion.name}/{champion.version}"
    h = resolve_model(uri)
    want = generator_config(cfg.model.preset, cfg.model.overrides).to_dict()
    have = h.generator.cfg.to_dict()
    if want != have:
        diff = {k: (have[k], want.get(k)) for k in have if have[k] != want.get(k)}
        raise ConfigError(f"config key 'model': the champion {uri} has another architecture than model.preset="
                          f"{cfg.model.preset} (champion vs config: {diff}); retrain with the champion's preset")
    return {"from": uri, "generator": {k: v.cpu() for k, v in h.generator.state_dict().items()}}


def retrain(cfg, log=print) -> dict:
    """-> {"status": "no-op" | "promoted" | "refused" | "busy", ...}; raises on failure (after recording it)."""
    name = cfg.tracking.registered_model
    root = cfg.data.output.rstrip("/")
    lock = retrain_lock(name)
    if not lock.acquire():
        log(f"retrain: another retrain holds the lock: {lock.held_by()}; exiting without doing anything")
        return {"status": "busy"}
    try:
        champion = alias_version(name, gate.CHAMPION)
        records = list_sources(cfg.data.sources)
        log(f"retrain: {len(records)} inputs listed; champion: "
            + (f"v{champion.version}" if champion else f"none yet (models:/{name} has no @{gate.CHAMPION})"))
        built = build_version(records, cfg.data, root, engine="ray", progress_every=15)
        if built.manifest is not None:
            log(built.summary())
        manifest = built.manifest or built.parent
        if manifest is None:
            raise UserError(f"no dataset under {root} and no faces accepted from data.sources")
        version_no = manifest.version
        if champion is not None and _champion_digest(champion) == manifest.digest:
            log(f"retrain: nothing to do — no new faces since dataset v{version_no:04d}, which champion "
                f"v{champion.version} was trained on")
            return {"status": "no-op", "dataset": manifest.uri, "champion": champion.version}
        client = mlflow.MlflowClient()
        run_id = tracking.open_run(cfg, "retrain", f"retrain-v{version_no:04d}", manifest=manifest,
                                   experiment=f"{cfg.tracking.experiment}-retrain",
                                   tags={"champion_before": champion.version if champion else "none"})
        step = "fine-tune"
        with tracking.run_scope(run_id):
            try:
                tcfg = cfg.model_copy(deep=True)
                tcfg.name = f"{cfg.name}-retrain-v{version_no:04d}"
                init = _init_from_champion(cfg, champion) if champion else None
                log(f"retrain: training {tcfg.name} on dataset v{version_no:04d} "
                    + (f"from champion v{champion.version}" if init else "from scratch"))
                trained = train_and_register(tcfg, manifest, init=init, tags={"retrain_run": run_id})
                if not trained["version"]:
                    raise RuntimeError("training reported no checkpoint; nothing to evaluate")
                client.set_tag(run_id, names.CANDIDATE, trained["version"])
                step = "evaluate"
                result = evaluate_model(cfg, trained["version"], manifest.uri, cfg.eval.split,
                                        outputs_dir("retrain", f"v{version_no:04d}"), promote=True, log=log,
                                        source=cfg.eval.source)
                decision = result["gate"]
                client.set_tag(run_id, names.GATE_DECISION, decision["decision"])
                client.set_tag(run_id, names.GATE_REASON, decision["reason"][:tracking.ERROR_CHARS])
                if not result.get("complete", True):
                    raise RuntimeError(f"partial evaluation: {decision['reason']}")
            except BaseException:
                client.set_tag(run_id, names.FAILED_STEP, step)
                raise
        log(f"retrain: {decision['decision']} {trained['version']}: {decision['reason']}")
        return {"status": decision["decision"], "version": trained["version"], "dataset": manifest.uri,
                "reason": decision["reason"], "run_id": run_id}
    finally:
        lock.release()
