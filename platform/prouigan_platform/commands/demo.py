"""`prouigan demo` (`make demo`): from raw photos to a registered model that beats bicubic, on one machine, in minutes.

    stack up -> shard the 300-W faces and 2,000 CelebA photos (dlib labels the CelebA ones inside the Ray Data
    tasks) -> train cpu-small for 4 minutes on 2 Ray Train workers -> register it (@challenger) -> score it and
    bicubic on the val faces -> outputs/demo/compare.png (16x16 input | bicubic | model | original, 8 faces)
    -> restore a crowd photo with tiny faces -> outputs/demo/crowd.png (bicubic | restored, the same upscale)

Real faces from ../shared when it exists; procedural ones otherwise (it says so: cartoons, not data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from prouigan.degradation import upsample_bicubic
from prouigan_platform import run_names as names
from prouigan_platform.config import load_config
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.errors import Exit, UserError
from prouigan_platform.evaluation import comparison_grid, load_split
from prouigan_platform.paths import outputs_dir
from prouigan_platform.registry import resolve_model
from prouigan_platform.runtime import use_embedded_stack
from prouigan_platform.tracking import experiment_id, find_run

# the research-licensed faces beside the checkout (`make demo` runs in the repository: ../shared)
SHARED = Path(os.environ.get("PROUIGAN_SHARED", Path.cwd().parent / "shared"))
OUT = outputs_dir("demo")


def _step(title: str, argv: list[str]) -> None:
    """One `prouigan` command, run as a user runs it (its own process, this console)."""
    print(f"\n=== {title}: prouigan {' '.join(argv)}", flush=True)
    rc = subprocess.call([sys.executable, "-m", "prouigan_platform.cli", *argv], env=os.environ)
    if rc != 0:
        raise UserError(f"demo: step '{title}' failed (exit {rc})", code=rc)


def data_overrides() -> tuple[list[str], str]:
    """Config overrides for the data this machine has, and a sentence saying which."""
    faces, celeba = SHARED / "faces", SHARED / "celeba" / "train"
    synthetic = ["data.sources=[{kind: synthetic, count: 300}]", "data.source_weights={}", "name=demo-synthetic",
                 "data.output=${PROUIGAN_STORE}/datasets/demo-synthetic"]  # never mixed into the real faces' runs
    if os.environ.get("PROUIGAN_DEMO_DATA") == "synthetic":  # the README's picture: no licensed faces in it
        return synthetic, "SYNTHETIC procedural faces, as asked (PROUIGAN_DEMO_DATA=synthetic)"
    if (faces / "helen_train").is_dir() and (celeba / "MANIFEST.json").is_file():
        return ([f"data.sources=[{{kind: 300w, path: {faces}}}, {{kind: celeba, path: {celeba}, limit: 2000, "
                 "val_fraction: 0.025, test_fraction: 0.025}]"],
                f"real faces: the 300-W faces of {faces} and 2,000 CelebA photos of {celeba}")
    if (faces / "helen_train").is_dir():
        return ([f"data.sources=[{{kind: 300w, path: {faces}}}]", "data.source_weights={}"],
                f"real faces: the 300-W faces of {faces} ({celeba} not found)")
    return (synthetic,
            f"{SHARED} not found -> SYNTHETIC procedural faces (cartoons, not real data): the numbers below say "
            "nothing about real faces")


def run(args=None) -> int:
    t0 = time.time()
    overrides, which = data_overrides()
    print(f"demo: {which}")
    _step("stack up", ["platform", "up"])
    use_embedded_stack(quiet=True)  # this process reads the registered model for the picture
    _step("resolved config", ["config", "-c", "demo", *overrides])
    _step("shard the photos into a dataset version (Ray Data; dlib labels the CelebA photos)",
          ["shard", "-c", "demo", *overrides])
    _step("train for 4 minutes on 2 Ray Train workers, register @challenger", ["train", "-c", "demo", *overrides])
    model = trained_version(overrides)
    _step("score the model and bicubic on the val faces", ["evaluate", "-c", "demo", "--model", model,
                                                           "--output", str(OUT / "evaluate"), *overrides])
    metrics = json.loads((OUT / "evaluate" / "metrics.json").read_text())["methods"]
    grid = compare_picture(overrides, model, OUT / "compare.png")
    crowd = crowd_photo(which)
    _step("restore a crowd photo's tiny faces, upscaled", ["restore", str(crowd), "-o", str(OUT / "restore"),
                                                           "--model", model])
    crowd_pic = before_after(crowd, OUT / "restore", OUT / "crowd.png")
    _step("stack status", ["platform", "status"])
    m, b = metrics["model"], metrics["bicubic"]
    beats = m["psnr"] > b["psnr"] and m["psnr_occluded"] > b["psnr_occluded"]
    print(f"\ndemo: done in {(time.time() - t0) / 60:.1f} min ({which.split(':')[0]})."
          f"\n  val faces      {'model':>8} {'bicubic':>8}"
          f"\n  PSNR           {m['psnr']:8.2f} {b['psnr']:8.2f}"
          f"\n  occluded PSNR  {m['psnr_occluded']:8.2f} {b['psnr_occluded']:8.2f}"
          f"\n  SSIM           {m['ssim']:8.3f} {b['ssim']:8.3f}"
          f"\n  -> the model {'beats' if beats else 'does NOT beat'} bicubic on PSNR and occluded-region PSNR"
          f"\n  picture        {grid}  (16x16 input | bicubic | model | original)"
          f"\n  crowd          {crowd_pic}  (bicubic | restored, {crowd.name} upscaled)"
          f"\n  model          {model}  (report: {OUT / 'evaluate' / 'report.md'})"
          "\nStop the stack with `prouigan platform down` (data stays in .platform/).")
    return Exit.OK if beats else Exit.FAILED


def trained_version(overrides: list[str]) -> str:
    """The version the demo's own training registered (models:/NAME/N), read from its MLflow run.  Not @challenger:
    any later training of the same registered model (a benchmark, another recipe) moves that alias."""
    cfg = load_config("demo", overrides)
    run = find_run(experiment_id(cfg.tracking.experiment), names.TRAIN_NAME, cfg.name)
    uri = run.data.tags.get(names.REGISTERED_VERSION) if run else None
    if not uri:
        raise UserError(f"demo: the training '{cfg.name}' registered no model (no {names.REGISTERED_VERSION} tag on "
                        "its MLflow run); see its output above", code=Exit.FAILED)
    return uri


def compare_picture(overrides: list[str], model: str, path: Path, n: int = 8) -> Path:
    """16x16 input | bicubic | model | original for the first ``n`` val faces (occlusions seeded by key)."""
    cfg = load_config("demo", overrides)
    data = load_split(mf.manifest_uri(cfg.data.output, mf.latest_version(cfg.data.output)), "val", cfg.data,
                      limit=n)
    out = resolve_model(model).run(data.lr).final
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(comparison_grid(data.lr, [upsample_bicubic(data.lr), out], data.hr)).save(path)
    return path


CROWD = "0_Parade_marchingband_1_60.jpg"  # WIDER FACE: ~100 faces of 10-40 px (research use: never committed)


def crowd_photo(which: str) -> Path:
    """The crowd photo to restore: a WIDER FACE one from ../shared/crowds with real faces, else procedural faces
    of 14-26 px on a background (written to outputs/demo/)."""
    real = SHARED / "crowds" / CROWD
    if real.is_file() and not which.startswith("SYNTHETIC"):
        return real
    from prouigan.synthetic import synthetic_crowd

    rng = np.random.default_rng(7)
    img, _ = synthetic_crowd([int(s) for s in rng.integers(14, 27, 30)], seed=7, width=260)
    path = OUT / "synthetic_crowd.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def before_after(photo: Path, out_dir: Path, path: Path, width: int = 720, height: int = 400) -> Path:
    """bicubic | restored, side by side: the window of the output (``width`` x ``height`` output px) that holds
    the most restored faces."""
    from prouigan_platform.restoring import upscale_photo

    record = json.loads((out_dir / f"{photo.stem}.json").read_text())
    n = record["upscale"]
    restored = np.asarray(Image.open(out_dir / record["output"]).convert("RGB"))
    with Image.open(photo) as im:
        bicubic = upscale_photo(np.asarray(im.convert("RGB")), n, record["background"])
    h, w = restored.shape[:2]
    width, height = min(width, w), min(height, h)
    centres = np.array([[(f["box"][0] + f["box"][2]) / 2 * n, (f["box"][1] + f["box"][3]) / 2 * n]
                        for f in record["faces"] if f["status"] == "restored"])
    best, corner = -1, (0, 0)
    for cx, cy in centres:
        x0 = int(np.clip(cx - width / 2, 0, w - width))
        y0 = int(np.clip(cy - height / 2, 0, h - height))
        inside = ((centres[:, 0] >= x0) & (centres[:, 0] < x0 + width) & (centres[:, 1] >= y0)
                  & (centres[:, 1] < y0 + height)).sum()
        if inside > best:
            best, corner = inside, (x0, y0)
    x0, y0 = corner
    gap = np.full((height, 8, 3), 255, np.uint8)
    pair = np.concatenate([bicubic[y0:y0 + height, x0:x0 + width], gap, restored[y0:y0 + height, x0:x0 + width]], 1)
    Image.fromarray(pair).save(path)
    return path
