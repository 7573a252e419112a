"""Training throughput of the real Ray Train pipeline: samples/s with 1 worker (2 threads) and 2 workers
(1 thread each, DDP over gloo) on this machine, side by side in one run; on a GPU machine also bf16 on/off.

    .venv/bin/python benchmarks/train.py [--preset cpu-small] [--steps 16]

Throughput is the second validation interval's samples/s (the first includes start-up), as reported by rank 0.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from prouigan_platform.config import load_config
from prouigan_platform.dataset.build import build_version
from prouigan_platform.dataset.sources import list_sources
from prouigan_platform.training.driver import fit

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    faces = REPO.parent / "shared" / "faces"
    src = f"[{{kind: 300w, path: {faces}}}]" if faces.is_dir() else "[{kind: synthetic, count: 200}]"
    base = load_config("smoke", [f"data.sources={src}", f"data.output={tmp / 'ds'}", f"train.storage={tmp / 'ck'}",
                                 f"model.preset={args.preset}", f"train.steps={args.steps}",
                                 f"train.val_every={args.steps // 2}", "train.val_samples=8",
                                 f"train.batch_size={args.batch}"])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        m = build_version(list_sources(base.data.sources), base.data, base.data.output, engine="ray").manifest
        gpu = torch.cuda.is_available()
        setups = [("1 worker x 2 threads", 1, 2.0, False, False), ("2 workers x 1 thread", 2, 1.0, False, False)]
        if gpu:
            setups = [("1 GPU fp32", 1, 4.0, True, False), ("1 GPU bf16", 1, 4.0, True, True)]
        rows = []
        for name, workers, cpus, use_gpu, bf16 in setups:
            cfg = base.model_copy(deep=True)
            cfg.name = f"bench-{workers}-{bf16}"
            cfg.train.num_workers, cfg.train.cpus_per_worker = workers, cpus
            cfg.train.use_gpu, cfg.train.bf16 = use_gpu, bf16
            result = fit(cfg, m.uri, None)
            rows.append((name, result.metrics["samples_per_s"]))
        print(f"\npreset {args.preset}, batch {args.batch} per worker, {args.steps} steps; samples/s (global):")
        for name, sps in rows:
            print(f"  {name:24s} {sps:8.2f}")
        print(f"  ratio second / first     {rows[1][1] / rows[0][1]:8.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
