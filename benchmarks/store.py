"""The training data path on the default store (local disk) against the old default (the in-memory S3 test server),
in one run: the same faces sharded into both, then short cpu-small trainings that read their shards from and
write their checkpoints to each store, alternating (local, S3, local, S3) so that the machine's drift hits both.
Also the CPU time the S3 server spent serving them.

    .venv/bin/python benchmarks/store.py [--steps 60] [--rounds 2]

Samples/s is the last validation interval's, as rank 0 reports it (the first interval includes start-up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import psutil

from prouigan_platform import stack as st
from prouigan_platform.config import load_config
from prouigan_platform.dataset.build import build_version
from prouigan_platform.dataset.sources import list_sources
from prouigan_platform.runtime import init_ray

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    spec = st.StackSpec.on_free_ports(tmp / "state", s3=True, ray_num_cpus=4, object_store_mb=512)
    st.up(spec, log=lambda *_: None)
    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in spec.env().items() if k != "MLFLOW_TRACKING_URI"})
        # Ray reads its auth settings when first imported: only now, with this stack's token in the environment
        from prouigan_platform.training.driver import fit

        faces = REPO.parent / "shared" / "faces"
        src = f"[{{kind: 300w, path: {faces}}}]" if faces.is_dir() else "[{kind: synthetic, count: 400}]"
        stores = {"local disk (default)": str(tmp / "store"), "S3 test server (old default)": f"s3://{spec.bucket}"}
        init_ray()
        manifests = {}
        for name, store in stores.items():
            cfg = load_config("cpu-small", [f"data.sources={src}", f"data.output={store}/datasets/faces"])
            manifests[name] = build_version(list_sources(cfg.data.sources), cfg.data, cfg.data.output).manifest
        _, services = st.load_state(spec.state_dir)
        moto = st.alive(services["s3"])
        rates: dict[str, list[float]] = {n: [] for n in stores}
        short = dict(zip(stores, ("local", "s3"), strict=True))  # for run names
        moto_cpu: list[float] = []
        for r in range(args.rounds):
            for name, store in stores.items():
                cfg = load_config("cpu-small", [f"name=bench-store-{r}-{short[name]}",
                                                f"train.storage={store}/checkpoints", f"train.steps={args.steps}",
                                                "train.max_minutes=null", f"train.val_every={args.steps // 3}",
                                                f"train.checkpoint_every={args.steps // 3}", "train.val_samples=16"])
                cpu0 = sum(moto.cpu_times()[:2])
                result = fit(cfg, manifests[name].uri, None)
                if name.startswith("S3"):
                    moto_cpu.append(sum(moto.cpu_times()[:2]) - cpu0)
                rates[name].append(result.metrics["samples_per_s"])
                print(f"round {r + 1}: {name:30s} {rates[name][-1]:6.2f} samples/s", flush=True)
        print(f"\ncpu-small, 2 workers x batch 8, {args.steps} steps per run, {args.rounds} run(s) per store, "
              f"{psutil.cpu_count()} cores:")
        for name, v in rates.items():
            print(f"  {name:30s} median {statistics.median(v):6.2f} samples/s   (runs: "
                  + ", ".join(f"{x:.2f}" for x in v) + ")")
        local, s3 = (statistics.median(v) for v in rates.values())
        print(f"  ratio local / S3 server        {local / s3:6.2f}x")
        print(f"  S3 server CPU time per S3 run  {statistics.median(moto_cpu):6.1f} s")
    finally:
        import ray

        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        st.down(spec.state_dir, log=lambda *_: None)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
