"""`prouigan synth --out DIR`: procedural faces (with iBUG-68 landmarks) as a 300-W folder: sample data for demos
and tests on a machine without real faces."""

from __future__ import annotations

from prouigan.synthetic import synthetic_face, write_pts
from prouigan_platform.errors import Exit, UserError
from prouigan_platform.progress import Progress


def run(args) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    progress = Progress("synth", args.count, "faces", every=10)
    for i in range(args.count):
        img, lm = synthetic_face(args.seed * 1_000_003 + i)
        p = args.out / f"synth_{i:05d}.png"
        img.save(p)
        write_pts(p.with_suffix(".pts"), lm)
        progress.update()
    print(f"wrote {args.count} synthetic faces to {args.out}")
    return Exit.OK
