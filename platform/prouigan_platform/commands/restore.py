"""`prouigan restore PHOTO... -o DIR`: restore the faces in real photos.

    prouigan restore photo1.jpg photo2.png -o restored/ --model models:/prouigan@champion
    prouigan restore group.jpg -o restored/ --model ckpt/step_0002000 --thumbnail my_16x16_face.png

Each face dlib's detector finds (the ``eval`` extra) is aligned to 128x128 by the dataset's FFHQ recipe, reduced
to the 16x16 thumbnail the model was trained on (or, with --thumbnail, the first face uses the thumbnail you
give), hallucinated, and pasted back through the inverse alignment with a feathered face mask; the rest of the
photo is unchanged.  Output: DIR/<name>.png, the same size as the photo (PNG, so nothing outside the faces is
re-encoded), and with --faces DIR/<name>_faces.png (thumbnail | result per face).  Photos whose outputs would
share a name (a.jpg and a.png; a.jpg with --faces and a_faces.jpg) are refused rather than one overwriting the
other.  Every file is written whole or not at all.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
from PIL import Image, ImageOps

from prouigan_platform.dataset.labeler import DlibMissing, require_dlib
from prouigan_platform.errors import UserError
from prouigan_platform.progress import Progress
from prouigan_platform.registry import resolve_device, resolve_model
from prouigan_platform.restoring import restore_photo
from prouigan_platform.storage import write_png


def _thumbnail(path) -> np.ndarray:
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:
        raise UserError(f"--thumbnail {path} is not a readable image ({type(e).__name__})", code=2) from None
    if im.size != (16, 16):
        raise UserError(f"--thumbnail {path} is {im.size[0]}x{im.size[1]}, expected 16x16", code=2)
    return np.asarray(im.convert("RGB"))


def outputs(path, faces: bool) -> list[str]:
    """The file names a photo's restoration writes."""
    return [f"{path.stem}.png"] + ([f"{path.stem}_faces.png"] if faces else [])


def _check_outputs(args) -> None:
    """Every output name is written by one photo only (a.jpg and a.png; a.jpg --faces and a_faces.jpg), and no
    output overwrites an input: refused, naming them, before anything is written."""
    writers = defaultdict(list)
    for p in args.photos:
        for name in outputs(p, args.faces):
            writers[name].append(str(p))
    clash = {n: w for n, w in writers.items() if len(w) > 1}
    if clash:
        raise UserError("two photos would write the same output: " + "; ".join(
            f"{' and '.join(w)} -> {n}" for n, w in sorted(clash.items())) + " (rename one)", code=2)
    out = args.output.resolve()
    hit = [str(p) for p in args.photos if p.resolve().parent == out and p.name in writers]
    if hit:
        raise UserError(f"--output {args.output} holds {', '.join(hit)}, which the results would overwrite; choose "
                        "another folder", code=2)


def run(args) -> int:
    missing = [str(p) for p in args.photos if not p.is_file()]
    if missing:
        raise UserError(f"not found: {', '.join(missing)}")
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} is a file, not a folder")
    _check_outputs(args)
    device = resolve_device(args.device)
    thumb = _thumbnail(args.thumbnail) if args.thumbnail is not None else None
    try:
        require_dlib()
    except DlibMissing as e:
        raise UserError(str(e)) from None
    model = resolve_model(args.model, device)
    args.output.mkdir(parents=True, exist_ok=True)
    done, no_face, unreadable = 0, [], []
    progress = Progress("restore", len(args.photos), "photos", every=10)
    for path in args.photos:
        try:
            rgb = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        except Exception as e:
            unreadable.append(path)
            print(f"prouigan restore: {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
            progress.update()
            continue
        photo, faces = restore_photo(rgb, model, thumb if done == 0 else None, args.upsample)
        if not faces:
            no_face.append(path)
            print(f"prouigan restore: {path}: no face found by dlib's detector (try --upsample 2 for small faces); "
                  "nothing written", file=sys.stderr)
            progress.update()
            continue
        names = outputs(path, args.faces)
        write_png(args.output / names[0], photo)
        if args.faces:
            strip = np.concatenate([np.concatenate([np.asarray(Image.fromarray(t).resize((128, 128), Image.NEAREST)),
                                                    f], 1) for t, f in faces], 0)
            write_png(args.output / names[1], strip)
        done += 1
        print(f"restore: {path} -> {args.output / (path.stem + '.png')} ({len(faces)} face(s))")
        progress.update()
    extra = (f"; no face in {len(no_face)}" if no_face else "") + (
        f"; {len(unreadable)} unreadable" if unreadable else "")
    print(f"restored {done} of {len(args.photos)} photo(s) into {args.output}{extra}")
    return 0 if done else 1
