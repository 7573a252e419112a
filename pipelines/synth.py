"""Write procedural faces (with iBUG-68 landmarks) as a 300-W folder: sample data for demos and tests on a
machine without real faces.

    prouigan synth --out data/synthetic --count 200
"""

from __future__ import annotations

from pathlib import Path

HELP = "write procedural sample faces (NAME.png + NAME.pts) for demos and tests"


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from tqdm import tqdm

    from prouigan.synthetic import synthetic_face, write_pts

    args.out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(args.count), desc="synthetic faces", unit="face"):
        img, lm = synthetic_face(args.seed * 1_000_003 + i)
        p = args.out / f"synth_{i:05d}.png"
        img.save(p)
        write_pts(p.with_suffix(".pts"), lm)
    print(f"wrote {args.count} synthetic faces to {args.out}")
    return 0


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("synth")
