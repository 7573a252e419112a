"""Evaluation and promotion: score a model (and the champion) on a split, write the report, log it to the model's
MLflow run, and move the ``champion`` alias through the gate (``gate.py``) when asked.

Used by `prouigan evaluate` and by `prouigan retrain`.  A partial or failed evaluation never promotes; every
decision is tagged on the candidate version.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import mlflow

from prouigan_platform import gate, judging, tracking
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.errors import BadInput, UserError
from prouigan_platform.evaluation import ORIGINAL, evaluate, table_rows, write_report
from prouigan_platform.locks import registry_lock
from prouigan_platform.registry import alias_version, registered_version, resolve_model


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", model.split("://")[-1].replace("models:/", "")).strip("_")[-80:]


def _run_id(model: str, version) -> str | None:
    if version is not None:
        return version.run_id
    if model.startswith("runs:/"):
        return model[len("runs:/"):].split("/", 1)[0]
    return None


def dataset_uri(cfg, data: str | None) -> str:
    if data:
        return data
    if cfg.train.dataset:
        return cfg.train.dataset
    root = cfg.data.output.rstrip("/")
    version = mf.latest_version(root)
    if not version:
        raise UserError(f"no dataset version under {root}; run `prouigan shard` or pass --data")
    return mf.manifest_uri(root, version)


def evaluate_model(cfg, model: str, data_uri: str, split: str, out_dir: Path, promote: bool = False,
                   device: str = "cpu", lock=None, log=print, source: str | None = None) -> dict:
    """Evaluate (and gate) one model; returns metrics.json's content plus ``gate`` when promoting.

    Raises on a failed evaluation, after recording the failure on the version when promoting."""
    version = registered_version(model) if model.startswith("models:/") else None
    if promote and version is None:
        raise BadInput(f"--promote needs a registered version (models:/NAME@ALIAS or models:/NAME/N), got {model}")
    if promote and split == "train":
        raise BadInput("--promote judges a model on faces it never saw: the train split cannot be the gate's "
                       "evidence; use --split val or test")
    context = {"gate.split": split, "gate.dataset": data_uri, "gate.metrics": ",".join(cfg.eval.gate_metrics)}
    if source:
        context["gate.source"] = source
    champion = alias_version(version.name, gate.CHAMPION) if promote else None
    if promote and champion is not None and champion.version == version.version:
        log(f"evaluate: v{version.version} is already the champion; nothing to decide")
        return {"gate": {"decision": "unchanged", "reason": "already the champion"}}
    try:
        t0 = time.time()
        models = {"model": resolve_model(f"models:/{version.name}/{version.version}" if version else model, device)}
        if champion is not None:
            models["champion"] = resolve_model(f"models:/{champion.name}/{champion.version}", device)
        log(f"evaluate: the {split} faces{f' of source {source}' if source else ''} of {data_uri}; methods: "
            "bicubic, " + ", ".join(f"{k} ({'v' + champion.version if k == 'champion' else model})" for k in models))
        judges = judging.panel(mf.load(data_uri), cfg.eval.judges)
        if judges.parser or judges.expression:
            log("evaluate: judged by " + ", ".join(j.label for j in (judges.parser, judges.expression) if j))
        ev = evaluate(models, data_uri, split, cfg.data, source=source, limit=cfg.eval.limit, use_dlib=cfg.eval.dlib,
                      heatmap_sigma=cfg.data.heatmap_sigma, batch_size=cfg.eval.batch_size, cases=cfg.eval.cases,
                      judges=judges, log=log)
        data = ev.data
        log(f"evaluate: {len(data.keys)} faces scored in {time.time() - t0:.0f} s (dataset digest {data.digest})")
        context["gate.digest"] = data.digest
    except Exception as e:
        if promote:
            d = gate.record_failure(version.name, version.version, e, context)
            log(f"gate: refused v{version.version}: {d.reason}")
        raise
    title = model + (f" = {version.name} v{version.version}" if version else "")
    files = write_report(ev, out_dir, title)
    result = {"model": model, **ev.to_json()}
    _print_table(ev, log)
    run_id = _run_id(model, version)
    name = f"{split}_{source}" if source else split  # metric prefix and artifact folder
    if run_id:
        _log_to_run(run_id, ev, files, name)
        tracking.log_dataset(run_id, mf.load(data_uri), f"evaluation.{name}")
        log(f"evaluate: metrics eval_{name}_*, the report and the dataset logged to MLflow run {run_id}")
    if promote:
        problems = ev.problems(cfg.eval.gate_metrics)
        if len(ev.data.keys) < cfg.eval.min_faces:
            problems.append(f"{len(ev.data.keys)} faces are too few to decide (eval.min_faces is "
                            f"{cfg.eval.min_faces})")
        d = gate.decide(ev.methods["model"].summary, ev.methods["champion"].summary if champion else None,
                        cfg.eval.gate_metrics, problems, champion.version if champion else None)
        if d.promote:
            moved, why = gate.move_champion(version.name, version.version, champion.version if champion else None,
                                            lock=lock or registry_lock(version.name))
            if not moved:
                d.promote, d.reason = False, why
        gate.record(version.name, version.version, d, context)
        result["gate"] = {"decision": d.label, "reason": d.reason, "version": version.version,
                          "champion_before": d.champion_version, "candidate": d.candidate, "champion": d.champion}
        log(f"gate: {d.label} v{version.version} of {version.name}: {d.reason}")
        files["metrics"].write_text(json.dumps(result, indent=1))
        if run_id:
            mlflow.MlflowClient().log_artifact(run_id, str(files["metrics"]), f"evaluation/{name}")
    log(f"evaluate: report {files['markdown']} (also {files['html'].name}, {files['grid'].name}, metrics.json)")
    return result


def _print_table(ev, log) -> None:
    head, rows = table_rows(ev)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        log("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for k, why in ev.skipped.items():
        log(f"  {k}: not measured — {why}")


def _log_to_run(run_id: str, ev, files: dict, split: str) -> None:
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = []
    for name, prefix in (("model", f"eval_{split}_"), ("bicubic", f"eval_{split}_bicubic_"),
                         (ORIGINAL, f"eval_{split}_original_")):
        if name in ev.methods:
            metrics += [mlflow.entities.Metric(prefix + k, float(v), now, 0)
                        for k, v in ev.methods[name].summary.items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
    for f in files.values():
        client.log_artifact(run_id, str(f), f"evaluation/{split}")
