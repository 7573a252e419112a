"""Model cost per preset: parameters, forward and forward+backward ms per image, attention sizes per stage,
and occlusion masks/s on one core.  CPU always; CUDA too when a GPU is present (bf16 autocast on/off).

    .venv/bin/python benchmarks/model.py [--presets tiny cpu-small gpu-paper] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from prouigan import PRESETS, ProUIGANGenerator, build_discriminators, count_parameters
from prouigan.occlusion import KINDS, synthesize


def _time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def bench_preset(name: str, device: str, batch: int, repeats: int, amp: bool) -> dict:
    torch.manual_seed(0)
    g = ProUIGANGenerator(PRESETS[name]).to(device)
    dg, dl = build_discriminators(name)
    x = torch.rand(batch, 3, 16, 16, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else torch.enable_grad

    def fwd():
        with torch.no_grad(), ctx():
            g(x)

    def fwd_bwd():
        with ctx():
            out = g(x)
            loss = out.final.float().mean() + sum(h.float().mean() for h in out.heatmaps)
        loss.backward()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    f = _time(fwd, repeats, sync)
    fb = _time(fwd_bwd, repeats, sync)
    row = {"preset": name, "device": device + (" bf16" if amp else ""), "batch": batch,
           "G params": count_parameters(g), "D params": count_parameters(dg) + count_parameters(dl),
           "fwd ms/img": 1000 * f / batch, "fwd+bwd ms/img": 1000 * fb / batch}
    if device == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def attention_table(name: str) -> list[dict]:
    g = ProUIGANGenerator(PRESETS[name])
    rows = []
    for res, stage in zip((16, 32, 64), g.stages, strict=True):
        att = stage.attention
        kh, kw = att.key_grid(res, res)
        n, m = res * res, kh * kw
        rows.append({"preset": name, "stage input": f"{res}x{res}", "queries": n, "keys": m,
                     "pooled map MiB/img": att.map_bytes(n, m) / 2**20,
                     "full map MiB/img": att.map_bytes(n, n) / 2**20})
    return rows


def occlusion_rate(n: int = 200) -> list[dict]:
    torch.set_num_threads(1)
    from prouigan.align import align, keypoints_from_68
    from prouigan.synthetic import synthetic_face

    img, raw = synthetic_face(0)
    lm = align(img, *keypoints_from_68(raw), landmarks=raw).landmarks
    rows = []
    for kind in KINDS:
        t = time.perf_counter()
        for s in range(n):
            synthesize(s, lm, kinds=[kind])
        rows.append({"kind": kind, "masks/s (1 core)": n / (time.perf_counter() - t)})
    return rows


def _print(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else f"{r[k]:,}" if isinstance(r[k], int)
                                 else str(r[k]) for k in keys) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, cuda: {torch.cuda.is_available()}\n")
    rows = []
    for name in args.presets:
        rows.append(bench_preset(name, "cpu", 8 if name != "gpu-paper" else 2, args.repeats, False))
        if torch.cuda.is_available():
            for amp in (False, True):
                rows.append(bench_preset(name, "cuda", 64, args.repeats + 5, amp))
    _print(rows)
    _print([r for name in args.presets for r in attention_table(name)])
    _print(occlusion_rate())


if __name__ == "__main__":
    main()
