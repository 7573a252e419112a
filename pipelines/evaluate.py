"""Evaluate a model on a dataset split against bicubic; optionally promote it through the registry gate.

    prouigan evaluate --model models:/prouigan@challenger --data s3://prouigan/datasets/faces/manifests/v0001.json
    prouigan evaluate --model models:/prouigan/7 --data …/v0001.json --promote
    prouigan evaluate --model /ckpts/cpu-small/step_0002000 --data …/v0001.json --split val

Writes metrics.json, report.md, report.html and cases.png (best and worst faces) to --output (default
outputs/evaluate/<model>/<split>/).  For a registered model or a run, the metrics (``eval_<split>_*``) and the
report go into the MLflow run that produced the model.  ``--promote`` (a registered version only) moves the
alias ``champion`` to it when it beats the current champion on ``eval.gate_metrics`` (scored in the same call,
on the same inputs); a partial or failed evaluation never promotes.  The decision is tagged on the version.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

HELP = "evaluate a model vs bicubic (fidelity, dlib alignment/identity, landmark regions); --promote: the gate"


def add_arguments(parser) -> None:
    from prouigan_platform.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--model", required=True, help="checkpoint, runs:/ID/model, models:/NAME@ALIAS or /VERSION")
    parser.add_argument("--data", default=None,
                        help="dataset manifest URI (default: train.dataset, else the latest version in data.output)")
    parser.add_argument("--split", default=None, choices=["train", "val", "test"], help="default: eval.split")
    parser.add_argument("--source", default=None,
                        help="score only this source's faces of the split (a mixed version: e.g. celeba or faces); "
                             "default: eval.source, else every face of the split")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--promote", action="store_true", help="move 'champion' here if it beats the champion")
    parser.add_argument("--device", default="cpu")


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", model.split("://")[-1].replace("models:/", "")).strip("_")[-80:]


def _run_id(model: str, version) -> str | None:
    if version is not None:
        return version.run_id
    if model.startswith("runs:/"):
        return model[len("runs:/"):].split("/", 1)[0]
    return None


def dataset_uri(cfg, data: str | None) -> str:
    from prouigan_platform.dataset import manifest as mf

    if data:
        return data
    if cfg.train.dataset:
        return cfg.train.dataset
    root = cfg.data.output.rstrip("/")
    version = mf.latest_version(root)
    if not version:
        raise FileNotFoundError(f"no dataset version under {root}; run `prouigan shard` or pass --data")
    return mf.manifest_uri(root, version)


def evaluate_model(cfg, model: str, data_uri: str, split: str, out_dir: Path, promote: bool = False,
                   device: str = "cpu", lock=None, log=print, source: str | None = None) -> dict:
    """Evaluate (and gate) one model; returns metrics.json's content plus ``gate`` when promoting.

    Raises on a failed evaluation, after recording the failure on the version when promoting."""
    import mlflow

    from prouigan_platform import gate
    from prouigan_platform.evaluation import evaluate, load_split, write_report
    from prouigan_platform.registry import alias_version, registered_version, resolve_model

    version = registered_version(model) if model.startswith("models:/") else None
    if promote and version is None:
        raise ValueError(f"--promote needs a registered version (models:/NAME@ALIAS or models:/NAME/N), got {model}")
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
        data = load_split(data_uri, split, cfg.data, limit=cfg.eval.limit, source=source)
        log(f"evaluate: {len(data.keys)} {split} faces{f' of source {source}' if source else ''} of {data_uri} "
            f"(digest {data.digest}); methods: bicubic, "
            + ", ".join(f"{k} ({'v' + champion.version if k == 'champion' else model})" for k in models))
        ev = evaluate(models, data, use_dlib=cfg.eval.dlib, heatmap_sigma=cfg.data.heatmap_sigma,
                      batch_size=cfg.eval.batch_size,
                      progress=lambda name: log(f"  scored {name} ({time.time() - t0:.0f} s)"))
        context["gate.digest"] = data.digest
    except Exception as e:
        if promote:
            d = gate.record_failure(version.name, version.version, e, context)
            log(f"gate: refused v{version.version}: {d.reason}")
        raise
    title = model + (f" = {version.name} v{version.version}" if version else "")
    files = write_report(ev, out_dir, "model", title, cfg.eval.cases)
    result = {"model": model, **ev.to_json()}
    _print_table(ev, log)
    run_id = _run_id(model, version)
    name = f"{split}_{source}" if source else split  # metric prefix and artifact folder
    if run_id:
        _log_to_run(run_id, ev, files, name)
        log(f"evaluate: metrics eval_{name}_* and the report logged to MLflow run {run_id}")
    if promote:
        problems = ev.problems(cfg.eval.gate_metrics)
        d = gate.decide(ev.methods["model"].summary, ev.methods["champion"].summary if champion else None,
                        cfg.eval.gate_metrics, problems, champion.version if champion else None)
        if d.promote:
            from prouigan_platform.locks import registry_lock

            moved, why = gate.move_champion(version.name, version.version, champion.version if champion else None,
                                            lock=lock or registry_lock(cfg, version.name))
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
    from prouigan_platform.evaluation import table_rows

    head, rows = table_rows(ev)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        log("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for k, why in ev.skipped.items():
        log(f"  {k}: not measured — {why}")


def _log_to_run(run_id: str, ev, files: dict, split: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = []
    for name, prefix in (("model", f"eval_{split}_"), ("bicubic", f"eval_{split}_bicubic_")):
        metrics += [mlflow.entities.Metric(prefix + k, float(v), now, 0)
                    for k, v in ev.methods[name].summary.items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
    for f in files.values():
        client.log_artifact(run_id, str(f), f"evaluation/{split}")


def run(args) -> int:
    from prouigan_platform.cli import config_from_args
    from prouigan_platform.runtime import use_embedded_stack

    cfg = config_from_args(args)
    split = args.split or cfg.eval.split
    source = args.source or cfg.eval.source
    if args.model.startswith(("runs:/", "models:/")) or args.promote:
        use_embedded_stack()
    data = dataset_uri(cfg, args.data)
    out = args.output or Path("outputs/evaluate") / _slug(args.model) / (f"{split}-{source}" if source else split)
    try:
        result = evaluate_model(cfg, args.model, data, split, out, args.promote, args.device, source=source)
    except ValueError as e:
        print(f"prouigan evaluate: error: {e}", file=sys.stderr)
        return 2
    gate_result = result.get("gate", {})
    if args.promote and gate_result.get("decision") == "refused" and not result.get("complete", True):
        return 1  # a partial evaluation is a failure, not just a refusal
    return 0


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("evaluate")
