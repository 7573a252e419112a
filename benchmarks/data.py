"""Data platform throughput, side by side in one run:
  1. sharding faces/s: the Ray Data pipeline vs a plain single-process loop doing the same work on the same
     faces (list -> decode -> validate -> align -> PNG -> tar), each into its own fresh output folder;
  2. reader samples/s (on-the-fly occlusion + degradation) vs the rate one training worker consumes.

    .venv/bin/python benchmarks/data.py [--faces ../shared/faces] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from prouigan_platform.config import SourceConfig, load_config
from prouigan_platform.dataset.build import build_version
from prouigan_platform.dataset.reader import FaceShards
from prouigan_platform.dataset.sources import list_sources

REPO = Path(__file__).resolve().parents[1]


def _shard(records, cfg, engine: str, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    r = build_version(records, cfg.data, [], str(out), engine=engine)
    return time.perf_counter() - t, sum(s["count"] for s in r.new_shards)


def _trainer_rate(cfg) -> float:
    """Samples/s one cpu-small worker consumes: a full adversarial step on a batch."""
    from prouigan import LossWeights, ProUIGANGenerator, build_discriminators, generator_config
    from prouigan.training import GANStep

    torch.manual_seed(0)
    b = cfg.train.batch_size
    g = ProUIGANGenerator(generator_config(cfg.model.preset))
    step = GANStep(g, *build_discriminators(cfg.model.preset), LossWeights())
    batch = {"lr": torch.rand(b, 3, 16, 16), "hr": torch.rand(b, 3, 128, 128),
             "landmarks": torch.rand(b, 68, 2) * 100 + 14, "has_landmarks": torch.ones(b, dtype=torch.bool)}
    step.step(batch)
    t = time.perf_counter()
    for _ in range(3):
        step.step(batch)
    return 3 * b / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", default=str(REPO.parent / "shared" / "faces"))
    ap.add_argument("--limit", type=int, default=None, help="use only the first N inputs")
    ap.add_argument("--reader-samples", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import ray

    cfg = load_config("cpu-small")
    src = SourceConfig(kind="300w", path=args.faces) if Path(args.faces).is_dir() else \
        SourceConfig(kind="synthetic", count=600)
    print(f"faces: {src.kind} {src.path if src.kind != 'synthetic' else src.count}; cores: {os.cpu_count()}")
    records = list_sources([src])[: args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        # each engine in its natural setting, best of --repeats: the plain loop with no Ray running; Ray Data
        # on a started local Ray whose worker processes were warmed once (as a running cluster has them)
        plain = [_shard(records, cfg, "plain", tmp / "plain") for _ in range(args.repeats)]
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        _shard(records[:16], cfg, "ray", tmp / "warm")
        viaray = [_shard(records, cfg, "ray", tmp / "ray") for _ in range(args.repeats)]
        (t_plain, n_plain), (t_ray, n_ray) = min(plain), min(viaray)
        assert n_plain == n_ray, (n_plain, n_ray)
        print(f"\nsharding {len(records)} inputs ({n_ray} faces accepted), best of {args.repeats}:")
        print(f"  plain single-process loop  {len(records) / t_plain:7.1f} inputs/s  ({t_plain:.1f} s; all runs "
              f"{', '.join(f'{t:.1f}' for t, _ in plain)} s)")
        print(f"  Ray Data pipeline          {len(records) / t_ray:7.1f} inputs/s  ({t_ray:.1f} s; all runs "
              f"{', '.join(f'{t:.1f}' for t, _ in viaray)} s)")
        print(f"  ratio Ray Data / plain     {t_plain / t_ray:7.2f}x")

        torch.set_num_threads(1)
        ds = FaceShards(str(tmp / "ray"), "train", cfg.data, epochs=None, limit=args.reader_samples)
        t = time.perf_counter()
        n = sum(1 for _ in ds)
        reader = n / (time.perf_counter() - t)
        torch.set_num_threads(2)
        trainer = _trainer_rate(cfg)
        print(f"\nreader (1 process, on-the-fly occlusion + degradation): {reader:7.1f} samples/s")
        print(f"trainer consumption (cpu-small, batch {cfg.train.batch_size}, 2 threads):   {trainer:7.1f} samples/s")
        print(f"ratio reader / trainer: {reader / trainer:.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
