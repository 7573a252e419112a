"""`prouigan hallucinate --model MODEL --input DIR --output DIR`: 128x128 faces from a folder of 16x16 thumbnails.

MODEL is a checkpoint (file or folder), a ``runs:/<id>/model`` or a ``models:/name@alias`` URI.  Every PNG/JPEG
in --input becomes a same-named PNG in --output.  A file that is not 16x16 is an error naming it, unless
--resize is given (then it is resized with antialiased bicubic first).  Nothing is written unless every input is
usable; an output name that two inputs would share is an error (photo.png and photo.jpg), never an overwrite.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

from prouigan_platform.errors import BadInput, Exit, UserError
from prouigan_platform.progress import Progress
from prouigan_platform.registry import resolve_device, resolve_model
from prouigan_platform.storage import write_png
from prouigan_platform.user_files import open_image

EXTS = {".png", ".jpg", ".jpeg"}


def run(args) -> int:
    if not args.input.is_dir():
        raise UserError(f"input folder not found: {args.input}")
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} is a file, not a folder")
    if args.output.resolve() == args.input.resolve():
        raise UserError(f"--output is the input folder {args.input}: choose another folder (inputs are never "
                        "overwritten)")
    device = resolve_device(args.device)
    files = sorted(p for p in args.input.iterdir() if p.suffix.lower() in EXTS)
    if not files:
        raise UserError(f"no PNG/JPEG files in {args.input}")
    by_stem = defaultdict(list)
    for f in files:
        by_stem[f.stem].append(f.name)
    clash = {s: n for s, n in by_stem.items() if len(n) > 1}
    if clash:
        raise BadInput("two inputs would write the same output: " + "; ".join(
            f"{' and '.join(n)} -> {s}.png" for s, n in sorted(clash.items())) + " (rename one)")
    thumbs, bad = [], []
    for f in files:
        try:
            im = open_image(f, "input").convert("RGB")
        except UserError as e:
            bad.append(str(e))  # names the file and why
            continue
        if im.size != (16, 16):
            if not args.resize:
                bad.append(f"{f.name}: {im.size[0]}x{im.size[1]} pixels, expected 16x16 (or pass --resize)")
                continue
            im = im.resize((16, 16), Image.BICUBIC, reducing_gap=None)
        thumbs.append((f, np.asarray(im)))
    if bad:
        raise BadInput("; ".join(bad))
    model = resolve_model(args.model, device)
    args.output.mkdir(parents=True, exist_ok=True)
    progress = Progress("hallucinate", len(thumbs), "faces", every=10)
    for i in range(0, len(thumbs), args.batch_size):
        chunk = thumbs[i:i + args.batch_size]
        out = model.to_uint8(np.stack([t for _, t in chunk]))
        for (f, _), img in zip(chunk, out, strict=True):
            write_png(args.output / (f.stem + ".png"), img)
        progress.update(len(chunk))
    print(f"wrote {len(thumbs)} faces (128x128 PNG) to {args.output}")
    return Exit.OK
