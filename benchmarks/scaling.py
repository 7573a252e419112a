"""The numbers of docs/scaling.md: gradient volume per step (counted from the models) and the projection for
8, 32 and 64 GPUs from the measured single-H100 step (BENCHMARKS.md, benchmarks/step.py).

    .venv/bin/python benchmarks/scaling.py

Assumptions (also in docs/scaling.md): DDP hides the all-reduce behind backward (2/3 of the step); ring
all-reduce time 2(N-1)/N x bytes / bus bandwidth; the measured 1-GPU DDP overhead applies at every size.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEP_S = 0.0711  # gpu-paper, batch 16, one H100, TF32 (BENCHMARKS.md, "One training step on a GPU")
BATCH = 16
DDP_OVERHEAD = 176.1 / 161.8  # same table: bf16 without / with the DDP wrap
SETUPS = [(8, 300e9, "NVLink, 1 node"), (32, 40e9, "400 Gb/s per GPU, 4 nodes"),
          (64, 40e9, "400 Gb/s per GPU, 8 nodes"), (32, 10e9, "100 Gb/s per node"), (64, 10e9, "100 Gb/s per node")]
PRICES = (4.0, 7.0)  # $ per GPU-hour, round assumptions


def main() -> None:
    from prouigan import ProUIGANGenerator, build_discriminators, generator_config

    grad_bytes = {}
    for preset in ("cpu-small", "gpu-paper"):
        g = ProUIGANGenerator(generator_config(preset))
        mods = (g, *build_discriminators(preset))
        n = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in mods]
        grad_bytes[preset] = sum(n) * 4
        print(f"{preset}: G {n[0]:,}  global D {n[1]:,}  local D {n[2]:,}  total {sum(n):,}  "
              f"fp32 all-reduce {sum(n) * 4 / 1e6:.1f} MB/step")
    size = grad_bytes["gpu-paper"]
    single = BATCH / STEP_S
    print(f"\ngpu-paper, one H100: {single:.0f} samples/s; per-GPU step with DDP {STEP_S * DDP_OVERHEAD * 1e3:.1f} ms")
    print(f"{'GPUs':>4}  {'interconnect':28s} {'allreduce':>9} {'exposed':>8} {'step':>7} {'samples/s':>9} "
          f"{'eff.':>5} {'h/10M':>6} {'GPU-h/10M':>9}  cost/10M")
    for n, bw, label in SETUPS:
        t = 2 * (n - 1) / n * size / bw
        exposed = max(0.0, t - 2 / 3 * STEP_S)
        step = STEP_S * DDP_OVERHEAD + exposed
        sps = n * BATCH / step
        gpu_h = n * 1e7 / sps / 3600
        print(f"{n:4d}  {label:28s} {t * 1e3:7.1f}ms {exposed * 1e3:6.1f}ms {step * 1e3:5.1f}ms {sps:9.0f} "
              f"{sps / (n * single):5.2f} {1e7 / sps / 3600:6.2f} {gpu_h:9.1f}  "
              + " / ".join(f"${gpu_h * p:.0f}" for p in PRICES))


if __name__ == "__main__":
    main()
