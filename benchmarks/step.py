"""Samples/s and model FLOP utilisation of one full adversarial training step (G + global D + local D) on one device.

Side by side in one run, per batch size: TF32 (fp32 on a CPU) vs bf16 autocast (on a GPU, and on a CPU with bf16
instructions), eager vs ``torch.compile``, with the batch already
on the device ("data out"); then, where ``--dataset`` is given, the fastest of those fed by the platform's reader:
occlusions and degradations made in the DataLoader processes ("in") or a batch at a time on the device ("dev",
``data.occlusion.on_device``); and the data path alone, both ways.  FLOPs per sample are
counted by ``torch.utils.flop_counter`` on one eager step; MFU is achieved FLOP/s over the device's dense peak for
the step's precision (named in the output; ``--peak-tflops`` for a device not in the table).

    python benchmarks/step.py                                   # gpu-paper, batch 16/64/128/256, on cuda
    python benchmarks/step.py --dataset /path/manifests/v0001.json --readers 12
    python benchmarks/step.py --device cpu --preset tiny --batches 4 8 --steps 2 --compile-backend eager
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from prouigan import LossWeights, ProUIGANGenerator, build_discriminators, generator_config  # noqa: E402
from prouigan.training import GANStep, channels_last, channels_last_batch  # noqa: E402

# dense (no sparsity) peak TFLOP/s by device name fragment: (TF32, bf16); NVIDIA data sheets
PEAKS = {"H200": (494.7, 989.4), "H100 PCIe": (378.0, 756.0), "H100": (494.7, 989.4), "A100": (156.0, 312.0),
         "L4": (60.0, 121.0)}


def device_peak(device: torch.device, override: float | None) -> tuple[str, tuple[float, float] | None]:
    if device.type != "cuda":
        name = f"cpu ({torch.get_num_threads()} threads)"
    else:
        name = torch.cuda.get_device_name(device)
    if override:
        return name, (override, override)
    return name, next((p for key, p in PEAKS.items() if key in name), None)


def make_batch(n: int, device, nhwc: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    lm = torch.rand(n, 68, 2, generator=g) * 60 + 34
    lr, hr = torch.rand(n, 3, 16, 16, generator=g), torch.rand(n, 3, 128, 128, generator=g)
    b = {"lr": lr.to(device), "hr": hr.to(device), "landmarks": lm.to(device),
         "has_landmarks": torch.ones(n, dtype=torch.bool, device=device)}
    return channels_last_batch(b) if nhwc else b


def build(preset: str, device, bf16: bool, compile_mode: str | None, backend: str, nhwc: bool) -> GANStep:
    torch.manual_seed(0)
    g = ProUIGANGenerator(generator_config(preset)).to(device)
    dg, dl = (m.to(device) for m in build_discriminators(preset))
    if nhwc:
        channels_last(g, dg, dl)
    return GANStep(g, dg, dl, LossWeights(), amp_dtype=torch.bfloat16 if bf16 else None,
                   compile_mode=compile_mode, compile_backend=backend)


def flops_per_sample(preset: str, device, batch: int) -> float:
    step = build(preset, device, False, None, "inductor", False)
    with FlopCounterMode(display=False) as fc:
        step.step(make_batch(batch, device, False))
    return fc.get_total_flops() / batch


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: GANStep, batches, steps: int, device) -> tuple[float, bool]:
    """(samples/s, finite) over ``steps`` steps after 3 warm-up steps (compilation, autotuning, allocator)."""
    for _ in range(3):
        logs = step.step(next(batches))
    sync(device)
    t, n = time.perf_counter(), 0
    for _ in range(steps):
        b = next(batches)
        logs = step.step(b)
        n += len(b["lr"])
    sync(device)
    finite = all(bool(torch.isfinite(v)) for v in logs.values())
    return n / (time.perf_counter() - t), finite


def reader_batches(dataset: str, batch: int, readers: int, device, nhwc: bool, on_device: bool = False):
    """Training batches from the platform's reader, as a training worker gets them (``device_batch``): occluded
    and degraded in the reader processes, or (on_device) clean from the readers and occluded a batch at a time on
    ``device`` (prouigan.batched_occlusion)."""
    from torch.utils.data import DataLoader

    from prouigan_platform.config import Config
    from prouigan_platform.dataset.reader import FaceShards
    from prouigan_platform.training.worker import device_batch

    cfg = Config.model_validate({"name": "step-bench", "data": {"occlusion": {"on_device": on_device}},
                                 "train": {"channels_last": nhwc}})
    ds = FaceShards(dataset, "train", cfg.data, epochs=None)
    loader = DataLoader(ds, batch_size=batch, num_workers=readers, persistent_workers=readers > 0,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if readers else None)
    g = torch.Generator(device=device).manual_seed(0)
    for b in loader:
        yield device_batch(b, device, cfg, g)


def reader_rate(dataset: str, batch: int, readers: int, device, on_device: bool, seconds: float = 20.0) -> float:
    it = reader_batches(dataset, batch, readers, device, False, on_device)
    next(it)
    sync(device)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        n += len(next(it)["lr"])
    sync(device)
    return n / (time.perf_counter() - t)


def forever(b: dict):
    while True:
        yield b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu-paper")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled rows")
    ap.add_argument("--compile-backend", default="inductor", help="'eager' checks the wiring without Inductor")
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--channels-last", action="store_true", help="NHWC weights and images in every row")
    ap.add_argument("--dataset", help="a dataset manifest: adds the data-in rows and the reader's own rate")
    ap.add_argument("--readers", type=int, default=8, help="DataLoader processes of the data-in rows")
    ap.add_argument("--reader-seconds", type=float, default=20.0, help="how long each data-path-alone rate runs")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense peak, where it is not in the table")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name, peak = device_peak(device, a.peak_tflops)
    fps = flops_per_sample(a.preset, device, 2)
    print(f"device: {name}; torch {torch.__version__}; preset {a.preset}; "
          f"{fps / 1e9:.1f} GFLOP per sample per step (G + 2 D, forward + backward, flop_counter)")
    print("peak (dense): " + (f"TF32 {peak[0]:.0f}, bf16 {peak[1]:.0f} TFLOP/s" if peak else "unknown: no MFU"))
    from prouigan.training import cpu_bf16_supported

    precisions = [False, True] if device.type == "cuda" or cpu_bf16_supported() else [False]
    if device.type == "cpu" and not cpu_bf16_supported():
        print("bf16: this CPU has no bf16 instructions (oneDNN finds none): fp32 rows only")
    compiles = [None] if a.no_compile else [None, a.compile_mode]
    header = f"{'batch':>5} {'precision':>9} {'compile':>16} {'data':>5} {'samples/s':>10} {'ms/step':>8} " \
             f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} finite"
    print(header)

    def row(batch, bf16, mode, data, rate, finite, step):
        tflops = rate * fps / 1e12
        mfu = f"{tflops / peak[int(bf16)]:6.1%}" if peak else f"{'n/a':>6}"
        gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        running = "eager" if mode is None else f"{mode}" + ("" if step.forwards["generator"].proven else " (fell back)")
        print(f"{batch:5d} {'bf16' if bf16 else 'tf32/fp32':>9} {running:>16} {data:>5} {rate:10.1f} "
              f"{batch / rate * 1000:8.1f} {tflops:8.2f} {mfu} {gib:8.2f} {finite}", flush=True)

    for batch in a.batches:
        best = None
        for bf16 in precisions:
            for mode in compiles:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    step = build(a.preset, device, bf16, mode, a.compile_backend, a.channels_last)
                    rate, finite = time_steps(step, forever(make_batch(batch, device, a.channels_last)), a.steps,
                                              device)
                except torch.OutOfMemoryError:
                    print(f"{batch:5d} {'bf16' if bf16 else 'tf32/fp32':>9} {str(mode or 'eager'):>16}   out "
                          f"of memory")
                    continue
                row(batch, bf16, mode, "out", rate, finite, step)
                if best is None or rate > best[0]:
                    best = (rate, bf16, mode)
                del step
        if a.dataset and best is not None:
            _, bf16, mode = best
            for on_device in (False, True):
                step = build(a.preset, device, bf16, mode, a.compile_backend, a.channels_last)
                rate, finite = time_steps(step, reader_batches(a.dataset, batch, a.readers, device, a.channels_last,
                                                               on_device), a.steps, device)
                row(batch, bf16, mode, "dev" if on_device else "in", rate, finite, step)
                del step
    if a.dataset:
        for on_device in (False, True):
            one = reader_rate(a.dataset, 64, 1, device, on_device, a.reader_seconds)
            many = reader_rate(a.dataset, 64, a.readers, device, on_device, a.reader_seconds)
            where = f"occluded on {device.type}" if on_device else "occluded in the reader processes"
            print(f"data path alone, {where}: {one:.0f} samples/s with 1 process, {many:.0f} with {a.readers} "
                  f"({many / one:.1f}x); 2,250 samples/s needs about {2250 / one:.0f} processes at 1-process speed")


if __name__ == "__main__":
    main()
