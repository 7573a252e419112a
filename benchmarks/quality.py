"""Quality on held-out real faces: bicubic vs trained generators, on the same occluded 16x16 inputs.

Every val face of a dataset version gets the occlusion seeded by its key (the same as validation during
training), is degraded to 16x16, and is restored by bicubic upsampling and by each model.  Scores against the
128x128 original:
  PSNR, SSIM, occluded-region PSNR (pixels under the synthetic occluder only),
  NME of dlib's 68-point predictor run on the restored face (box found by dlib's detector on the original,
      the same box for every method), normalised by the original's outer-eye-corner distance, against the
      dataset's 300-W ground truth,
  identity distance: Euclidean distance between dlib's 128-d face embeddings of restored and original face
      (same-person threshold in dlib's documentation: 0.6).
The metrics are those of ``prouigan evaluate`` (``prouigan_platform.evaluation``), for several models at once.
Needs the ``eval`` extra (dlib).  Writes a table (stdout, JSON) and a picture grid.

    .venv/bin/python benchmarks/quality.py --dataset /path/manifests/v0001.json \\
        --model pro-uigan=/ckpts/cpu-small/step_0001000 --model plain-cnn=/ckpts/cpu-small-plain/step_0002000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="manifest URI of a dataset version")
    ap.add_argument("--model", action="append", default=[], help="NAME=checkpoint (file or checkpoint folder)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--grid", default="outputs/quality/grid.png")
    ap.add_argument("--grid-rows", type=int, default=6)
    ap.add_argument("--json-out", default="outputs/quality/quality.json")
    a = ap.parse_args()

    import torch
    from PIL import Image

    from prouigan.degradation import upsample_bicubic
    from prouigan_platform.config import DataConfig
    from prouigan_platform.evaluation import BICUBIC, evaluate, load_split, table_rows, to_u8
    from prouigan_platform.registry import resolve_model

    torch.set_num_threads(2)
    models = {}
    for spec in a.model:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model wants NAME=checkpoint, got {spec!r}")
        models[name] = resolve_model(path)
    ev = evaluate(models, a.dataset, a.split, DataConfig(), case_model=None)
    print(f"{len(ev.data.keys)} {a.split} faces")
    head, rows = table_rows(ev)
    print("\n" + " | ".join(head))
    for r in rows:
        print(" | ".join(r))
    Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json_out).write_text(json.dumps({"models": a.model, **ev.to_json()}, indent=1))

    # grid: occluded input (nearest x8) | bicubic | each model | original, for faces spread over the split
    data = load_split(a.dataset, a.split, DataConfig(), limit=max(a.grid_rows * 8, 64))
    n = min(a.grid_rows, len(data.keys))
    pick = np.linspace(0, len(data.keys) - 1, n).round().astype(int)
    outs = [upsample_bicubic(data.lr[pick])] + [h(data.lr[pick]) for h in models.values()]
    cols = [torch.nn.functional.interpolate(data.lr[pick], size=128, mode="nearest"), *outs, data.hr[pick]]
    grid = torch.cat([torch.cat([c[i] for c in cols], dim=2) for i in range(n)], dim=1)
    Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_u8(grid[None])[0]).save(a.grid)
    print(f"\ngrid ({' | '.join(['input', BICUBIC, *models, 'original'])}) -> {a.grid}")


if __name__ == "__main__":
    main()
