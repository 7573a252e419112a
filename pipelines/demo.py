"""`make demo`: the whole platform on one machine, end to end.

    platform up -> resolve the demo config -> shard the faces into the S3 bucket (Ray Data) -> a Ray job and
    an MLflow run with artifacts in the bucket -> a short 2-worker training run (Ray Train) -> register the
    model (@challenger) -> hallucinate a few val faces -> outputs/demo/summary.json -> platform status

Real faces from ../shared/faces when that folder exists, procedural ones otherwise (it says which).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prouigan_platform.cli import main as prouigan

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "faces"


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: prouigan {' '.join(argv)}", flush=True)
    rc = prouigan(argv)
    if rc != 0:
        print(f"demo: step '{title}' failed (exit {rc})", file=sys.stderr)
        sys.exit(rc)


def main() -> int:
    overrides: list[str] = []
    if (SHARED_FACES / "helen_train").is_dir():
        print(f"demo: using the real faces in {SHARED_FACES}")
        overrides.append(f"data.sources=[{{kind: 300w, path: {SHARED_FACES}}}]")
    else:
        print(f"demo: {SHARED_FACES} not found -> running on SYNTHETIC procedural faces (cartoons, not real data)")
        overrides.append("data.sources=[{kind: synthetic, count: 200}]")
    _step("stack up", ["platform", "up"])
    _step("resolved config", ["config", "--config", "demo", *overrides])
    _step("shard faces into s3://prouigan/datasets/demo", ["shard", "--config", "demo", *overrides])
    _step("ray job + mlflow run", ["hello", "--config", "demo", *overrides])
    _step("train (2 Ray Train workers) and register", ["train", "--config", "demo", *overrides])
    out = REPO / "outputs" / "demo"
    _write_val_thumbnails(overrides, out / "lr", n=8)
    _step("hallucinate val faces", ["hallucinate", "--model", "models:/prouigan@challenger",
                                    "--input", str(out / "lr"), "--output", str(out / "sr")])
    summary = _summary(out)
    _step("stack status", ["platform", "status"])
    print(f"\ndemo: done.\n  MLflow UI      {summary['mlflow_ui']}\n  model          {summary['model_uri']}"
          f"\n  checkpoint     {summary['checkpoint']}\n  val metrics    "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["val_metrics"].items())
          + f"\n  faces          {out / 'lr'} -> {out / 'sr'}\n  summary        {out / 'summary.json'}"
          "\nStop the stack with `prouigan platform down` (data stays in .platform/).")
    return 0


def _write_val_thumbnails(overrides: list[str], folder: Path, n: int) -> None:
    """16x16 occluded val faces (deterministic occlusions), as a user would bring them."""
    from PIL import Image

    from prouigan_platform.config import load_config
    from prouigan_platform.dataset import manifest as mf
    from prouigan_platform.dataset.reader import FaceShards

    cfg = load_config("demo", overrides)
    folder.mkdir(parents=True, exist_ok=True)
    for ex in FaceShards(mf.load(cfg.data.output), "val", cfg.data, limit=n):
        arr = (ex["lr"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(folder / f"{ex['key']}.png")


def _summary(out: Path) -> dict:
    """outputs/demo/summary.json: the registered model, a checkpoint usable without the stack, val metrics."""
    import os
    import shutil

    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("prouigan", "challenger")
    run = client.get_run(mv.run_id)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/prouigan/{mv.version}/artifacts/generator.pt"))
    ckpt = out / "generator.pt"
    shutil.copyfile(local, ckpt)  # the registered artifact is already the generator-only file
    summary = {
        "model_uri": f"models:/prouigan/{mv.version}", "alias": "challenger", "run_id": mv.run_id,
        "checkpoint": str(ckpt), "best_checkpoint_in_bucket": run.data.tags.get("best_checkpoint"),
        "val_metrics": {k: v for k, v in run.data.metrics.items() if k.startswith("val_")},
        "mlflow_ui": f"{os.environ['MLFLOW_TRACKING_URI']}/#/experiments/{run.info.experiment_id}/runs/{mv.run_id}",
        "outputs": {"lr": str(out / "lr"), "sr": str(out / "sr")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(main())
