"""Training layouts of the CPU recipe side by side in one run: workers x threads, bf16 autocast on or off,
torch.compile on or off, reader processes per worker.  Each row is a real `prouigan train` (Ray Train, the
recipe's model, data and global batch of 16 faces a step), run alone on the machine one after the other, for
--minutes of training; its rate is read from the training's own progress lines after the first one (start-up
and the readers' first shards are left out), or with --steady N over the last N (the compiled rows: torch.compile
takes a minute or two of the run before its first compiled step).  --g-only keeps the discriminators out of the
measured window (the recipe's first 85%: G alone).

    .venv/bin/python benchmarks/layout.py --config cpu-mixed --dataset DATA/manifests/v0001.json --minutes 4

Needs the embedded stack (`prouigan platform up`) or RAY_ADDRESS.  Prints one row per layout and its ratio to the
first (the recipe as it was: 2 workers x 1 thread, fp32, eager, 1 reader each).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"\[train\] step ([\d,]+) \|")

# name -> overrides; every layout trains 16 faces a step
LAYOUTS = {
    "2w x 1t, fp32, eager": ["train.num_workers=2", "train.cpus_per_worker=1", "train.batch_size=8",
                             "train.bf16=false"],
    "2w x 1t, bf16, eager": ["train.num_workers=2", "train.cpus_per_worker=1", "train.batch_size=8",
                             "train.bf16=true"],
    "1w x 2t, fp32, eager": ["train.num_workers=1", "train.cpus_per_worker=2", "train.batch_size=16",
                             "train.bf16=false"],
    "1w x 2t, bf16, eager": ["train.num_workers=1", "train.cpus_per_worker=2", "train.batch_size=16",
                             "train.bf16=true"],
}


def run(cfg: str, dataset: str, out: Path, name: str, overrides: list[str], minutes: float, steady: int = 0,
        g_only: bool = False) -> dict:
    cmd = [sys.executable, "-m", "prouigan_platform.cli", "train", "-c", cfg, f"name={name}",
           f"train.dataset={dataset}", f"train.storage={out / 'ckpt'}", "train.steps=1000000",
           f"train.max_minutes={minutes}", "train.val_every=1000000", "train.checkpoint_every=1000000",
           "tracking.experiment=layout-bench", *(["train.adversarial_start=0.99"] if g_only else []), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # no registry entries from a bench
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    points, log = [], []
    for line in proc.stdout:
        log.append(line)
        if m := STEP_LINE.search(line):
            points.append((time.time(), int(m.group(1).replace(",", ""))))
    proc.wait()
    (out / f"{re.sub(r'[^a-z0-9]+', '-', name)}.log").write_text("".join(log))
    if proc.returncode != 0 or len(points) < 3:
        raise SystemExit(f"{name}: exit {proc.returncode}, {len(points)} progress lines:\n{''.join(log[-40:])}")
    # from the second progress line (warm-up left out), or over the last ``steady`` intervals
    (t1, s1), (t2, s2) = (points[-steady - 1] if steady else points[1]), points[-1]
    precision = next((ln.split("precision: ", 1)[1].strip() for ln in log if "precision: " in ln), "?")
    return {"rate": (s2 - s1) * 16 / (t2 - t1), "steps": s2, "wall": time.time() - t0, "precision": precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-mixed")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/layout"))
    ap.add_argument("--compile", action="store_true", help="also the fastest eager layout compiled")
    ap.add_argument("--readers", type=int, nargs="*", default=[2], help="reader processes to try on the fastest")
    ap.add_argument("--out-name", default="layout", help="log file prefix")
    ap.add_argument("--only", nargs="*", help="layout names to run (default: all)")
    ap.add_argument("--steady", type=int, default=0, help="rate over the last N progress intervals (0: all but 1st)")
    ap.add_argument("--g-only", action="store_true", help="no discriminators in the run (G's phase of the recipe)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}; {a.minutes:g} min a row", flush=True)
    rows: dict[str, dict] = {}
    layouts = {k: v for k, v in LAYOUTS.items() if not a.only or k in a.only}
    for i, (name, overrides) in enumerate(layouts.items()):
        rows[name] = run(a.config, a.dataset, a.out, f"layout-{i}", overrides + ["data.reader_processes=1"], a.minutes,
                         a.steady, a.g_only)
        print(f"  {name:34s} {rows[name]['rate']:6.1f} samples/s  ({rows[name]['precision']})", flush=True)
    best = max(rows, key=lambda k: rows[k]["rate"])
    extra = []
    if a.compile:
        extra.append((f"{best}, compiled".replace("eager, ", ""), [*layouts[best], "train.compile=default",
                                                                   "data.reader_processes=1"]))
    for r in a.readers:
        extra.append((f"{best}, {r} readers", [*layouts[best], f"data.reader_processes={r}"]))
    for j, (name, overrides) in enumerate(extra):
        rows[name] = run(a.config, a.dataset, a.out, f"layout-x{j}", overrides, a.minutes, a.steady, a.g_only)
        print(f"  {name:34s} {rows[name]['rate']:6.1f} samples/s", flush=True)
    base = next(iter(rows.values()))["rate"]
    print(f"\n{'layout (16 faces a step)':44s} {'samples/s':>9s} {'vs first':>8s} {'steps':>7s}")
    for name, r in rows.items():
        print(f"{name:44s} {r['rate']:9.1f} {r['rate'] / base:7.2f}x {r['steps']:7,d}")


if __name__ == "__main__":
    main()
