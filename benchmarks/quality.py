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


def load_generator(path: str):
    from prouigan.inference import Hallucinator

    p = Path(path)
    if p.is_dir():
        p = p / "state.pt"
    return Hallucinator.load(p)


def to_u8(x) -> np.ndarray:
    """(B,3,H,W) float [0,1] -> (B,H,W,3) uint8."""
    return (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


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
    from torch.utils.data import DataLoader

    from prouigan.degradation import upsample_bicubic
    from prouigan.landmarks import nme
    from prouigan.metrics import masked_psnr, psnr, ssim
    from prouigan_platform.config import DataConfig
    from prouigan_platform.dataset.labeler import describe, face_box
    from prouigan_platform.dataset.reader import FaceShards

    torch.set_num_threads(2)
    models = {}
    for spec in a.model:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model wants NAME=checkpoint, got {spec!r}")
        models[name] = load_generator(path)
    ds = FaceShards(a.dataset, a.split, DataConfig())
    batches = list(DataLoader(ds, batch_size=32))
    lr = torch.cat([b["lr"] for b in batches])
    hr = torch.cat([b["hr"] for b in batches])
    mask = torch.cat([b["mask"] for b in batches])
    gt = torch.cat([b["landmarks"] for b in batches]).double()
    has = torch.cat([b["has_landmarks"] for b in batches])
    outputs = {"bicubic": upsample_bicubic(lr).clamp(0, 1)}
    for name, h in models.items():
        outputs[name] = h(lr)
    hr_u8 = to_u8(hr)
    boxes = [face_box(img, gt[i].numpy() if has[i] else None) for i, img in enumerate(hr_u8)]
    ref = [describe(img, box) if box else None for img, box in zip(hr_u8, boxes, strict=True)]
    print(f"{len(hr)} {a.split} faces ({int(has.sum())} with 68-point ground truth)")

    results = {}
    rows = [("original (dlib on the HR face)", hr)] + list(outputs.items())
    for name, out in rows:
        out_u8 = to_u8(out)
        nmes, ids = [], []
        for i, img in enumerate(out_u8):
            if ref[i] is None:
                continue
            pts, emb = describe(img, boxes[i])
            if has[i]:
                nmes.append(float(nme(torch.from_numpy(pts)[None], gt[i][None])[0]))
            ids.append(float(np.linalg.norm(emb - ref[i][1])))
        mp = masked_psnr(out, hr, mask)
        results[name] = {"psnr": float(psnr(out, hr).mean()), "ssim": float(ssim(out, hr).mean()),
                         "psnr_occluded": float(torch.nanmean(mp)), "nme": float(np.mean(nmes)),
                         "identity_distance": float(np.mean(ids)), "faces": len(out)}
    print(f"\n{'method':32s} {'PSNR':>6s} {'SSIM':>6s} {'occl.PSNR':>9s} {'NME':>7s} {'id.dist':>7s}")
    for name, r in results.items():
        print(f"{name:32s} {r['psnr']:6.2f} {r['ssim']:6.3f} {r['psnr_occluded']:9.2f} {r['nme']:7.4f} "
              f"{r['identity_distance']:7.3f}")
    Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json_out).write_text(json.dumps({"dataset": a.dataset, "models": a.model, "results": results}, indent=1))

    # grid: occluded input (nearest x8) | bicubic | each model | original
    n = min(a.grid_rows, len(hr))
    pick = np.linspace(0, len(hr) - 1, n).round().astype(int)
    cols = [torch.nn.functional.interpolate(lr[pick], size=128, mode="nearest")]
    cols += [o[pick] for o in outputs.values()] + [hr[pick]]
    grid = torch.cat([torch.cat([c[i] for c in cols], dim=2) for i in range(n)], dim=1)
    Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_u8(grid[None])[0]).save(a.grid)
    print(f"\ngrid ({' | '.join(['input', *outputs, 'original'])}) -> {a.grid}")


if __name__ == "__main__":
    main()
