"""Recipes side by side: train several configs AT THE SAME TIME for the same wall time on the same dataset version,
then score each with `prouigan evaluate` on the test split of every source named by --source.

Running them together (not one after the other) makes the comparison fair on a machine whose speed drifts:
every run sees the same machine, minute by minute.  Each run gets one Ray Train worker and one torch thread,
so on 2 cores three runs share the cores evenly.  Needs the embedded stack (`prouigan platform up`) or
RAY_ADDRESS; nothing else should run meanwhile.  Each run registers its best checkpoint in the registered model
`prouigan-benchmarks`, so no @challenger a recipe's users rely on moves.

    .venv/bin/python benchmarks/side_by_side.py --dataset DATA/manifests/v0001.json --minutes 55 --out OUT \\
        --run cpu-mixed --run cpu-small-300w --run cpu-mixed-plain --source faces --source celeba

Prints one table per source; every command it runs is echoed, and its output kept in OUT/*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROUIGAN = [sys.executable, "-m", "prouigan_platform.cli"]
BENCH_MODEL = "prouigan-benchmarks"
METRICS = ("psnr", "ssim", "psnr_occluded", "nme", "identity_distance", "parse_f1", "expression_accuracy")


def _echo(cmd: list[str]) -> str:
    return " ".join(c if re.fullmatch(r"[\w./=:@,-]+", c) else repr(c) for c in cmd[3:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True, help="the manifest every run trains on and is scored on")
    ap.add_argument("--run", action="append", required=True, help="a config name; repeat for each recipe")
    ap.add_argument("--source", action="append", default=[], help="score the test split of this source (repeat)")
    ap.add_argument("--minutes", type=float, default=55.0)
    ap.add_argument("--steps", type=int, default=None, help="a step budget instead of minutes (noisy machines)")
    ap.add_argument("--batch-size", type=int, default=16, help="faces a step for every run (one worker each)")
    ap.add_argument("--batch", action="append", default=[], metavar="CONFIG=N",
                    help="faces a step for one run instead of --batch-size (repeat)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="sbs", help="suffix of the run names")
    ap.add_argument("--skip-train", action="store_true",
                    help="score the checkpoints of an earlier call (scores it already wrote are kept)")
    args = ap.parse_args()
    batch = {cfg: args.batch_size for cfg in args.run}
    for item in args.batch:
        cfg, _, n = item.partition("=")
        if cfg not in batch or not n.isdigit() or int(n) < 1:
            ap.error(f"--batch {item!r}: want CONFIG=N with CONFIG one of the --run configs and N >= 1")
        batch[cfg] = int(n)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}", flush=True)

    budget = [f"train.steps={args.steps}", "train.max_minutes=null"] if args.steps else \
        ["train.steps=1000000", f"train.max_minutes={args.minutes}"]
    names = {cfg: f"{cfg}-{args.tag}" for cfg in args.run}
    if not args.skip_train:
        procs = {}
        t0 = time.time()
        for cfg, name in names.items():
            # registered apart: a benchmark arm must not move the @challenger of the model a user's recipe serves
            cmd = [*PROUIGAN, "train", "-c", cfg, f"name={name}", f"tracking.registered_model={BENCH_MODEL}",
                   f"train.dataset={args.dataset}",
                   f"train.storage={args.out / 'ckpt'}", "train.num_workers=1", "train.cpus_per_worker=1",
                   f"train.batch_size={batch[cfg]}", *budget]
            print(f"$ prouigan {_echo(cmd)}", flush=True)
            log = open(args.out / f"{name}.train.log", "w")  # noqa: SIM115 (closed when the process ends)
            procs[cfg] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log)
        for cfg, (p, log) in procs.items():
            rc = p.wait()
            log.close()
            print(f"{names[cfg]}: exit {rc} after {(time.time() - t0) / 60:.1f} min", flush=True)
            if rc != 0:
                print(f"  see {log.name}", file=sys.stderr)
                return 1

    rows: dict[str, dict[str, dict]] = {}
    for cfg, name in names.items():
        text = (args.out / f"{name}.train.log").read_text()
        best = re.findall(r"\[train\] best checkpoint (\S+): val_psnr ([\d.]+) dB at step (\d+)", text)
        last = re.findall(r"step_(\d+)", text)
        if not best:
            print(f"{name}: no best checkpoint in its log", file=sys.stderr)
            return 1
        ckpt, _, step = best[-1]
        steps_done = max(int(s) for s in last)
        for source in args.source or [None]:
            out = args.out / "eval" / name / (source or "all")
            cmd = [*PROUIGAN, "evaluate", "-c", cfg, "--model", ckpt, "--data", args.dataset, "--split", "test",
                   "--output", str(out), *(["--source", source] if source else [])]
            print(f"$ prouigan {_echo(cmd)}", flush=True)
            if args.skip_train and (out / "metrics.json").exists():
                print(f"  (scored by an earlier call: {out / 'metrics.json'})", flush=True)
            else:
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                (args.out / f"{name}.eval-{source or 'all'}.log").write_text(r.stdout + r.stderr)
                if r.returncode != 0:
                    print(r.stdout[-2000:] + r.stderr[-2000:], file=sys.stderr)
                    return 1
            m = json.loads((out / "metrics.json").read_text())
            rows.setdefault(source or "all", {})[cfg] = {"step": int(step), "steps": steps_done, "faces": m["faces"],
                                                         "model": m["methods"]["model"],
                                                         "bicubic": m["methods"]["bicubic"],
                                                         "original": m["methods"].get("original", {})}
    for source, by_cfg in rows.items():
        any_row = next(iter(by_cfg.values()))
        print(f"\ntest split of source {source} ({any_row['faces']} faces):")
        print(f"  {'method':<24}{'steps':>7}{'best@':>7}" + "".join(f"{k:>19}" for k in METRICS))
        for ref in ("bicubic", "original"):
            print(f"  {ref:<24}{'':>7}{'':>7}" + "".join(f"{any_row[ref].get(k, float('nan')):>19.4f}"
                                                       for k in METRICS))
        for cfg, r in by_cfg.items():
            print(f"  {cfg:<24}{r['steps']:>7}{r['step']:>7}" + "".join(f"{r['model'].get(k, float('nan')):>19.4f}"
                                                                        for k in METRICS))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
