"""Start-up time of the `prouigan` command: `prouigan --help`, `prouigan config -c cpu-small` and an argument error,
each run as a fresh process (as a user types them), median of --repeats.

    .venv/bin/python benchmarks/cli.py                       # this checkout
    .venv/bin/python benchmarks/cli.py --src /tmp/old        # another checkout of the project (e.g. an older
                                                             # commit: git worktree add /tmp/old COMMIT), same venv
Both in one run: --src /tmp/old --compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"prouigan --help": ["--help"], "prouigan config -c cpu-small": ["config", "-c", "cpu-small"],
            "prouigan train --bogus (argument error)": ["train", "--bogus"]}


def _time(src: Path, argv: list[str], repeats: int) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": f"{src / 'platform'}{os.pathsep}{src}"}
    times, where = [], ""
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prouigan_platform.cli", *argv], capture_output=True, cwd=src, env=env)
        times.append(time.perf_counter() - t)
    where = subprocess.run([sys.executable, "-c", "import prouigan_platform.cli as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd=src, env=env).stdout.strip()
    return statistics.median(times), where


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=REPO, help="the checkout to time (default: this one)")
    ap.add_argument("--compare", action="store_true", help="also time this checkout, side by side")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    srcs = [args.src.resolve()] + ([REPO] if args.compare and args.src.resolve() != REPO else [])
    print(f"median of {args.repeats} fresh processes, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    for src in srcs:
        print(f"\n{src}")
        for label, argv in COMMANDS.items():
            t, where = _time(src, argv, args.repeats)
            print(f"  {label:<42} {t:6.2f} s")
        print(f"  (prouigan_platform loaded from {where})")


if __name__ == "__main__":
    main()
