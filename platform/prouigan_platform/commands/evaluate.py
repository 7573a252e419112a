"""`prouigan evaluate --model MODEL`: score a model against bicubic on a dataset split; --promote: the gate.

    prouigan evaluate --model models:/prouigan@challenger --data …/manifests/v0001.json
    prouigan evaluate --model models:/prouigan/7 --promote
    prouigan evaluate --model /ckpts/cpu-mixed/step_0002000 --split test --source celeba

Writes metrics.json, report.md, report.html and cases.png (best and worst faces) to --output (default
outputs/evaluate/<model>/<split>[-<source>]/).  For a registered model or a run, the metrics (``eval_<split>_*``)
and the report go into the MLflow run that produced the model.  ``--promote`` moves the alias ``champion`` to a
registered version when it beats the current champion on ``eval.gate_metrics`` (scored in the same call, on the
same inputs); a partial or failed evaluation never promotes, and exits 1.
"""

from __future__ import annotations

from prouigan_platform.config import config_from_args
from prouigan_platform.errors import Exit, UserError
from prouigan_platform.paths import outputs_dir
from prouigan_platform.promotion import dataset_uri, evaluate_model, slug
from prouigan_platform.registry import resolve_device


def run(args) -> int:
    cfg = config_from_args(args)
    device = resolve_device(args.device)
    split = args.split or cfg.eval.split
    source = args.source or cfg.eval.source
    data = dataset_uri(cfg, args.data)
    out = args.output or outputs_dir("evaluate", slug(args.model), f"{split}-{source}" if source else split)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    result = evaluate_model(cfg, args.model, data, split, out, args.promote, device, source=source)
    gate_result = result.get("gate", {})
    if args.promote and gate_result.get("decision") == "refused" and not result.get("complete", True):
        return Exit.FAILED  # a partial evaluation is a failure, not just a refusal
    return Exit.OK
