"""Hallucinate 128x128 faces from a folder of 16x16 thumbnails.

    prouigan hallucinate --model models:/prouigan@challenger --input thumbs/ --output faces/
    prouigan hallucinate --model /path/to/checkpoint/step_0002000 --input thumbs/ --output faces/ --resize

MODEL is a checkpoint (file or folder), a ``runs:/<id>/model`` or a ``models:/name@alias`` URI.  Every PNG/JPEG
in --input becomes a same-named PNG in --output.  A file that is not 16x16 is an error naming it, unless
--resize is given (then it is resized with antialiased bicubic first).
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "16x16 thumbnails in a folder -> 128x128 faces (checkpoint, runs:/ or models:/ URI)"
EXTS = {".png", ".jpg", ".jpeg"}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--resize", action="store_true", help="resize other sizes to 16x16 instead of failing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def run(args) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from prouigan_platform.registry import resolve_model
    from prouigan_platform.runtime import use_embedded_stack

    if not args.input.is_dir():
        print(f"prouigan hallucinate: error: input folder not found: {args.input}", file=sys.stderr)
        return 1
    files = sorted(p for p in args.input.iterdir() if p.suffix.lower() in EXTS)
    if not files:
        print(f"prouigan hallucinate: error: no PNG/JPEG files in {args.input}", file=sys.stderr)
        return 1
    thumbs, bad = [], []
    for f in files:
        try:
            im = Image.open(f).convert("RGB")
        except Exception as e:
            bad.append(f"{f.name}: not a readable image ({type(e).__name__})")
            continue
        if im.size != (16, 16):
            if not args.resize:
                bad.append(f"{f.name}: {im.size[0]}x{im.size[1]} pixels, expected 16x16 (or pass --resize)")
                continue
            im = im.resize((16, 16), Image.BICUBIC, reducing_gap=None)
        thumbs.append((f, np.asarray(im)))
    if bad:
        print("prouigan hallucinate: error: " + "; ".join(bad), file=sys.stderr)
        return 2
    if args.model.startswith(("runs:/", "models:/")):
        use_embedded_stack()
    model = resolve_model(args.model, args.device)
    args.output.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(thumbs), desc="hallucinating", unit="face") as bar:
        for i in range(0, len(thumbs), args.batch_size):
            chunk = thumbs[i:i + args.batch_size]
            out = model.to_uint8(np.stack([t for _, t in chunk]))
            for (f, _), img in zip(chunk, out, strict=True):
                Image.fromarray(img).save(args.output / (f.stem + ".png"))
            bar.update(len(chunk))
    print(f"wrote {len(thumbs)} faces (128x128 PNG) to {args.output}")
    return 0


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("hallucinate")
