"""Samples/s of one full adversarial training step (G + global D + local D) on one device, plain PyTorch:
fp32 and bf16 autocast side by side, and the same step with the three modules wrapped in DDP (one process;
NCCL on a GPU, gloo on CPU), which is what each Ray Train worker runs.  Needs only torch.

    python benchmarks/step.py                       # every preset on cuda if there is one, else cpu
    python benchmarks/step.py --presets cpu-small --device cpu --steps 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prouigan import LossWeights, ProUIGANGenerator, build_discriminators, count_parameters, generator_config  # noqa: E402
from prouigan.training import GANStep  # noqa: E402

BATCH = {"tiny": 64, "cpu-small": 32, "gpu-paper": 16}


def make_batch(n: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    lm = torch.rand(n, 68, 2, generator=g) * 60 + 34
    lr, hr = torch.rand(n, 3, 16, 16, generator=g), torch.rand(n, 3, 128, 128, generator=g)
    return {"lr": lr.to(device), "hr": hr.to(device),
            "landmarks": lm.to(device), "has_landmarks": torch.ones(n, dtype=torch.bool, device=device)}


def measure(preset: str, device: torch.device, bf16: bool, ddp: bool, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    g = ProUIGANGenerator(generator_config(preset)).to(device)
    dg, dl = (m.to(device) for m in build_discriminators(preset))
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        g, dg, dl = (DDP(m, device_ids=ids) for m in (g, dg, dl))
    step = GANStep(g, dg, dl, LossWeights(), amp_dtype=torch.bfloat16 if bf16 else None)
    b = make_batch(batch, device)
    for _ in range(3):  # warm-up: cudnn autotune, allocator
        logs = step.step(b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        logs = step.step(b)
    sync()
    dt = time.perf_counter() - t
    finite = all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"preset": preset, "bf16": bf16, "ddp": ddp, "batch": batch, "samples_per_s": steps * batch / dt,
            "ms_per_step": dt / steps * 1000, "finite": finite, "peak_gib": peak,
            "params": count_parameters(g.module if ddp else g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["cpu-small", "gpu-paper"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    print(f"{'preset':10s} {'params':>10s} {'batch':>5s} {'bf16':>5s} {'ddp':>4s} {'samples/s':>10s} "
          f"{'ms/step':>8s} {'peak GiB':>8s} finite")
    for preset in a.presets:
        batch = BATCH.get(preset, 16)
        rows = [measure(preset, device, bf16, ddp, a.steps, batch)
                for bf16, ddp in ((False, False), (True, False), (True, True))
                if device.type == "cuda" or not bf16]
        for r in rows:
            print(f"{r['preset']:10s} {r['params']:10d} {r['batch']:5d} {str(r['bf16']):>5s} {str(r['ddp']):>4s} "
                  f"{r['samples_per_s']:10.1f} {r['ms_per_step']:8.1f} {r['peak_gib']:8.2f} {r['finite']}")
        if len(rows) > 1:
            print(f"  bf16 / fp32 speed-up: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
