"""Equal-wall-time ablations without Ray: train several generator variants side by side, each in its own
process pinned to its own CPU cores (or on one GPU, one after the other), for the same wall time, then score
each on the same val faces with the same deterministic occlusions.

Used to choose the cpu-small recipe (learning rates, loss weights, stage widths) on a many-core machine
before the real 2-core runs: it needs only torch, numpy and Pillow, so the faces travel as one .npz.

    # 1. export a dataset version's train and val faces (HR + landmarks) to one file
    python benchmarks/equal_time.py export --manifest /path/manifests/v0001.json --out faces.npz
    # 2. run the variants of a JSON file for 8 minutes each, 2 cores each
    python benchmarks/equal_time.py run --data faces.npz --variants variants.json --minutes 8 --cores 2

A variant: {"name": ..., "preset": "cpu-small", "overrides": {...}, "loss": {...LossWeights fields},
"lr_g": 2e-4, "lr_d": 1e-4, "batch": 16, "schedule": "constant"|"cosine", "steps": N (instead of the time),
"bf16": false, "adv_start": fraction of the run before the discriminators join, "heatmap_warmup": [weight, fraction]
(the heatmap weight is ``weight`` for that first fraction of the run, then the loss's own), "ema": [decays] (each
variant is also scored with exponential moving averages of G's weights; default 0.995 and 0.999)}.
With ``--device cuda`` and step budgets taken from a CPU's measured samples/s, a GPU replays
what an hour on that CPU would train, in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COVERAGE = (0.1, 0.35)


def export(manifest_uri: str, out: str) -> None:
    from PIL import Image

    from prouigan_platform.dataset import manifest as mf

    m = mf.load(manifest_uri)
    arrays = {}
    for split in ("train", "val"):
        hr, lms, has, keys = [], [], [], []
        for uri in mf.shard_uris(m, split):
            for s in mf.read_shard(uri):
                meta = json.loads(s["json"])
                hr.append(np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")))
                lm = meta.get("landmarks68")
                lms.append(np.asarray(lm, np.float32) if lm is not None else np.zeros((68, 2), np.float32))
                has.append(lm is not None)
                keys.append(meta["key"])
        arrays.update({f"{split}_hr": np.stack(hr), f"{split}_landmarks": np.stack(lms),
                       f"{split}_has": np.asarray(has), f"{split}_keys": np.asarray(keys)})
        print(f"{split}: {len(hr)} faces")
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB)")


def make_batch(hr_u8, lms, has, idx, rng_for):
    import torch

    from prouigan.degradation import degrade
    from prouigan.occlusion import synthesize
    from prouigan.vocabulary import OCCLUSION_KINDS

    lr, hr, mask = [], [], []
    for i in idx:
        rng = rng_for(i)
        h = hr_u8[i].astype(np.float32) / 255
        occ = synthesize(rng, lms[i] if has[i] else None, OCCLUSION_KINDS, COVERAGE, size=128)
        hr.append(torch.from_numpy(h).permute(2, 0, 1))
        mask.append(torch.from_numpy(occ.mask.copy())[None])
        lr.append(degrade(torch.from_numpy(np.ascontiguousarray(occ.apply(h))).permute(2, 0, 1), rng))
    return {"lr": torch.stack(lr), "hr": torch.stack(hr), "mask": torch.stack(mask),
            "landmarks": torch.from_numpy(lms[idx]), "has_landmarks": torch.from_numpy(has[idx])}


def train_variant(args: tuple) -> dict:
    variant, data_path, seconds, cores, device = args
    import torch

    from prouigan import LossWeights, ProUIGANGenerator, build_discriminators, count_parameters, generator_config
    from prouigan.training import GANStep, cosine_factor

    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    torch.manual_seed(variant.get("seed", 0))
    d = np.load(data_path)
    tr = (d["train_hr"], d["train_landmarks"], d["train_has"])
    va = (d["val_hr"], d["val_landmarks"], d["val_has"], d["val_keys"])
    preset = variant.get("preset", "cpu-small")
    g = ProUIGANGenerator(generator_config(preset, variant.get("overrides"))).to(device)
    dg, dl = (m.to(device) for m in build_discriminators(variant.get("d_preset", "cpu-small")))
    weights = LossWeights(**variant.get("loss", {}))
    step = GANStep(g, dg, dl, weights, variant.get("lr_g", 2e-4),
                   variant.get("lr_d", 1e-4), amp_dtype=torch.bfloat16 if variant.get("bf16") else None)
    warm_weight, warm_until = variant.get("heatmap_warmup", (weights.heatmap, 0.0))
    warm = dataclasses.replace(weights, heatmap=warm_weight)
    emas = {decay: [p.detach().clone() for p in g.parameters()] for decay in variant.get("ema", (0.995, 0.999))}
    max_steps = variant.get("steps")  # a step budget instead of the wall time (emulating a slower machine)
    schedule = variant.get("schedule", "constant")
    base = [pg["lr"] for pg in step.opt_g.param_groups]
    rng = np.random.default_rng(variant.get("seed", 0))
    bs, n, t0, steps = variant.get("batch", 16), len(tr[0]), time.time(), 0
    while (steps < max_steps) if max_steps else (time.time() - t0 < seconds):
        done = steps / max_steps if max_steps else (time.time() - t0) / seconds
        if schedule == "cosine":
            for pg, b in zip(step.opt_g.param_groups, base, strict=True):
                pg["lr"] = b * cosine_factor(done)
        step.adversarial = step.weights.adversarial > 0 and done >= variant.get("adv_start", 0)
        step.weights = warm if done < warm_until else weights
        idx = rng.integers(0, n, bs)
        batch = {k: v.to(device) for k, v in make_batch(*tr, idx, lambda i: rng).items()}
        step.step(batch)
        with torch.no_grad():
            params = [p.detach() for p in g.parameters()]
            for decay, avg in emas.items():
                torch._foreach_lerp_(avg, params, 1 - decay)
        steps += 1
    g.eval()
    val = val_batches(va)  # built once: every scoring below sees the same occluded inputs
    scores = {"": score(g, val, device)}
    with torch.no_grad():
        live = [p.detach().clone() for p in g.parameters()]
        for decay, avg in emas.items():
            torch._foreach_copy_(list(g.parameters()), avg)
            scores[f"ema{decay}"] = score(g, val, device)
        torch._foreach_copy_(list(g.parameters()), live)
    out = {"name": variant["name"], "params": count_parameters(g), "steps": steps, "samples": steps * bs,
           "seconds": round(time.time() - t0, 1), **scores[""], **bicubic_scores(val)}
    for tag, sc in scores.items():
        if tag:
            out.update({f"{tag}_{k}": v for k, v in sc.items()})
    return out


def val_batches(va) -> list[dict]:
    """The val faces in batches of 32, each face occluded as validation does (seeded by its key)."""
    from prouigan.occlusion import seed_from_key

    return [make_batch(va[0], va[1], va[2], np.arange(s, min(s + 32, len(va[0]))),
                       lambda i: np.random.default_rng(seed_from_key(str(va[3][i]))))
            for s in range(0, len(va[0]), 32)]


def _means(outputs, val) -> dict:
    import torch

    from prouigan.metrics import masked_psnr, psnr, ssim

    sums, m = np.zeros(3), sum(len(b["hr"]) for b in val)
    for sr, b in zip(outputs, val, strict=True):
        sums += [psnr(sr, b["hr"]).sum().item(), ssim(sr, b["hr"]).sum().item(),
                 torch.nan_to_num(masked_psnr(sr, b["hr"], b["mask"])).sum().item()]
    return {"psnr": sums[0] / m, "ssim": sums[1] / m, "psnr_occluded": sums[2] / m}


def score(g, val, device) -> dict:
    """Mean PSNR, SSIM and occluded-region PSNR of ``g`` on the val batches."""
    import torch

    with torch.no_grad():
        return _means([g(b["lr"].to(device)).final.float().clamp(0, 1).cpu() for b in val], val)


def bicubic_scores(val) -> dict:
    from prouigan.degradation import upsample_bicubic

    sc = _means([upsample_bicubic(b["lr"]).clamp(0, 1) for b in val], val)
    return {"bicubic_psnr": sc["psnr"], "bicubic_psnr_occluded": sc["psnr_occluded"]}


def run(data: str, variants_path: str, minutes: float, cores: int, device: str, json_out: str | None = None
        ) -> list[dict]:
    variants = json.loads(Path(variants_path).read_text())
    avail = sorted(os.sched_getaffinity(0))
    if len(variants) * cores > len(avail):
        raise SystemExit(f"{len(variants)} variants x {cores} cores > {len(avail)} cores available")
    jobs = [(v, data, minutes * 60, avail[i * cores:(i + 1) * cores], device) for i, v in enumerate(variants)]
    results = []
    with mp.get_context("spawn").Pool(len(jobs)) as pool:  # on a GPU the variants share it
        for r in pool.imap_unordered(train_variant, jobs):  # each result is kept as soon as it is in
            results.append(r)
            print(f"done: {r['name']} ({r['steps']} steps, {r['seconds']} s)", flush=True)
            if json_out:
                Path(json_out).write_text(json.dumps(results, indent=1))
    order = {v["name"]: i for i, v in enumerate(variants)}
    results.sort(key=lambda r: order[r["name"]])
    print(f"\n{minutes} min (or the variant's steps) each, {cores} cores per variant on {device}, "
          f"bicubic PSNR {results[0]['bicubic_psnr']:.2f} / occluded {results[0]['bicubic_psnr_occluded']:.2f}")
    emas = sorted({k.split("_")[0] for r in results for k in r if k.startswith("ema")})
    head = "".join(f" {e + ' PSNR':>14s} {'occl':>6s}" for e in emas)
    print(f"{'variant':28s} {'params':>9s} {'steps':>6s} {'PSNR':>6s} {'SSIM':>6s} {'occl':>6s}{head}")
    for r in results:
        tail = "".join(f" {r.get(e + '_psnr', float('nan')):14.2f} {r.get(e + '_psnr_occluded', float('nan')):6.2f}"
                       for e in emas)
        print(f"{r['name']:28s} {r['params']:9d} {r['steps']:6d} {r['psnr']:6.2f} {r['ssim']:6.3f} "
              f"{r['psnr_occluded']:6.2f}{tail}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--variants", required=True)
    r.add_argument("--minutes", type=float, default=8)
    r.add_argument("--cores", type=int, default=2)
    r.add_argument("--device", default="cpu")
    r.add_argument("--json-out")
    a = ap.parse_args()
    if a.cmd == "export":
        export(a.manifest, a.out)
    else:
        run(a.data, a.variants, a.minutes, a.cores, a.device, a.json_out)


if __name__ == "__main__":
    main()
