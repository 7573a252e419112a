"""Peak memory of `prouigan evaluate` against the size of the split it scores (streaming: it should not grow).

    python benchmarks/eval_memory.py --model outputs/bench/generator.pt \
        --run 'demo val faces=.platform/store/datasets/demo/manifests/v0001.json:val' \
        --run 'mixed test=.platform/store/datasets/mixed/manifests/v0001.json:test' ...

Each --run is LABEL=MANIFEST:SPLIT[:SOURCE][@LIMIT] (LIMIT: the first N faces, ``eval.limit``).  Every evaluation
runs as its own `prouigan evaluate` process (dlib off: this measures the streaming pipeline, not dlib's models);
the peak RSS of its whole process tree is sampled every 0.2 s.  Prints one row per run: faces, seconds, faces/s,
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def measure(model: str, manifest: str, split: str, source: str | None, limit: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "prouigan_platform.cli", "evaluate", "-c", "smoke", "--model", model, "--data",
               manifest, "--split", split, "--output", tmp, "eval.dlib=false", "eval.min_faces=1"]
        if source:
            cmd += ["--source", source]
        if limit:
            cmd.append(f"eval.limit={limit}")
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak = 0
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
        out = proc.stdout.read()
        seconds = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"evaluate failed ({proc.returncode}):\n{out[-3000:]}")
        faces = json.loads((Path(tmp) / "metrics.json").read_text())["faces"]
    return {"faces": faces, "seconds": seconds, "peak_rss_gib": peak / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a generator checkpoint")
    ap.add_argument("--run", action="append", required=True, help="LABEL=MANIFEST:SPLIT[:SOURCE][@LIMIT]")
    a = ap.parse_args()
    print(f"{'run':28s} {'faces':>7s} {'seconds':>8s} {'faces/s':>8s} {'peak RSS':>9s}")
    for spec in a.run:
        label, _, rest = spec.partition("=")
        rest, _, limit = rest.partition("@")
        manifest, split, *source = [*rest.split(":"), ""] if rest.count(":") == 0 else rest.split(":")
        if not (label and manifest and split and (not limit or limit.isdigit())):
            ap.error(f"--run {spec!r}: expected LABEL=MANIFEST:SPLIT[:SOURCE][@LIMIT] (no '=' in LABEL)")
        r = measure(a.model, manifest, split, source[0] if source else None, int(limit) if limit else None)
        print(f"{label:28s} {r['faces']:7,d} {r['seconds']:8.0f} {r['faces'] / r['seconds']:8.1f} "
              f"{r['peak_rss_gib']:7.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
