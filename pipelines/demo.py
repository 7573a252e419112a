"""`make demo`: the whole platform on one machine, end to end.

    platform up -> resolve the demo config -> shard the faces into the S3 bucket (Ray Data) -> a Ray job and
    an MLflow run with artifacts in the S3 bucket -> platform status

Real faces from ../shared/faces when that folder exists, procedural ones otherwise (it says which).
"""

from __future__ import annotations

import sys
from pathlib import Path

from prouigan_platform.cli import main as prouigan

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "faces"


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: prouigan {' '.join(argv)}", flush=True)
    rc = prouigan(argv)
    if rc != 0:
        print(f"demo: step '{title}' failed (exit {rc})", file=sys.stderr)
        sys.exit(rc)


def main() -> int:
    overrides: list[str] = []
    if (SHARED_FACES / "helen_train").is_dir():
        print(f"demo: using the real faces in {SHARED_FACES}")
        overrides.append(f"data.sources=[{{kind: 300w, path: {SHARED_FACES}}}]")
    else:
        print(f"demo: {SHARED_FACES} not found -> running on SYNTHETIC procedural faces (cartoons, not real data)")
        overrides.append("data.sources=[{kind: synthetic, count: 200}]")
    _step("stack up", ["platform", "up"])
    _step("resolved config", ["config", "--config", "demo", *overrides])
    _step("shard faces into s3://prouigan/datasets/demo", ["shard", "--config", "demo", *overrides])
    _step("ray job + mlflow run", ["hello", "--config", "demo", *overrides])
    _step("stack status", ["platform", "status"])
    print("\ndemo: done. Stop the stack with `prouigan platform down` (data stays in .platform/).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
