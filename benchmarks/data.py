"""Data platform throughput, side by side in one run:
  1. sharding: the Ray Data pipeline vs a plain single-process loop doing the same work on the same inputs
     (list -> decode -> [dlib: find the face and its 68 points] -> validate -> align -> PNG -> tar), each into
     its own fresh output folder (so both label every photo);
  2. reader samples/s (on-the-fly occlusion + degradation) vs the rate one training worker consumes.
``--full`` instead times one Ray Data run over every input (the whole CelebA folder), as `prouigan shard` does it.

    .venv/bin/python benchmarks/data.py                                          # ../shared/faces (300-W)
    .venv/bin/python benchmarks/data.py --celeba ../shared/celeba/train --limit 2000
    .venv/bin/python benchmarks/data.py --celeba ../shared/celeba/train --full
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


def _shard(records, data, engine: str, out: Path, progress: float | None = None) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    r = build_version([dict(x) for x in records], data, str(out), engine=engine, progress_every=progress)
    return time.perf_counter() - t, sum(s["count"] for s in r.new_shards), r.labelled


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
    ap.add_argument("--faces", default=str(REPO.parent / "shared" / "faces"), help="a 300-W folder")
    ap.add_argument("--celeba", default=None, help="a CelebA folder (labelled by dlib) instead of --faces")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N inputs")
    ap.add_argument("--full", action="store_true", help="one Ray Data run over every input, with progress")
    ap.add_argument("--reader-samples", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=4, help="Ray's logical CPUs (the embedded stack offers 4)")
    args = ap.parse_args()
    import ray

    cfg = load_config("cpu-small")
    if args.celeba:
        src = SourceConfig(kind="celeba", path=args.celeba, limit=args.limit)
    elif Path(args.faces).is_dir():
        src = SourceConfig(kind="300w", path=args.faces, limit=args.limit)
    else:
        src = SourceConfig(kind="synthetic", count=args.limit or 600)
    data = cfg.data.model_copy(update={"sources": [src]})
    records = list_sources(data.sources)
    print(f"inputs: {len(records)} ({src.kind} {src.path if src.kind != 'synthetic' else ''}); cores: {os.cpu_count()}"
          f"; Ray logical CPUs: {args.num_cpus}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        if args.full:
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
            t, n, labelled = _shard(records, data, "ray", tmp / "full", progress=30)
            print(f"\nRay Data, every input: {len(records)} inputs in {t:.0f} s ({t / 60:.1f} min), "
                  f"{len(records) / t:.1f} inputs/s, {n} faces accepted, {labelled} labelled by dlib")
            return
        # each engine in its natural setting, best of --repeats: the plain loop with no Ray running; Ray Data
        # on a started local Ray whose worker processes were warmed once (as a running cluster has them)
        plain = [_shard(records, data, "plain", tmp / "plain") for _ in range(args.repeats)]
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        _shard(records[:16], data, "ray", tmp / "warm")
        viaray = [_shard(records, data, "ray", tmp / "ray") for _ in range(args.repeats)]
        (t_plain, n_plain, l_plain), (t_ray, n_ray, l_ray) = min(plain), min(viaray)
        assert (n_plain, l_plain) == (n_ray, l_ray), (n_plain, l_plain, n_ray, l_ray)
        print(f"\nsharding {len(records)} inputs ({n_ray} faces accepted, {l_ray} labelled by dlib), best of "
              f"{args.repeats}:")
        print(f"  plain single-process loop  {len(records) / t_plain:7.1f} inputs/s  {n_plain / t_plain:7.1f} faces/s"
              f"  ({t_plain:.1f} s; all runs {', '.join(f'{t:.1f}' for t, _, _ in plain)} s)")
        print(f"  Ray Data pipeline          {len(records) / t_ray:7.1f} inputs/s  {n_ray / t_ray:7.1f} faces/s"
              f"  ({t_ray:.1f} s; all runs {', '.join(f'{t:.1f}' for t, _, _ in viaray)} s)")
        print(f"  ratio Ray Data / plain     {t_plain / t_ray:7.2f}x")

        torch.set_num_threads(1)
        ds = FaceShards(str(tmp / "ray"), "train", data, epochs=None, limit=args.reader_samples)
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
