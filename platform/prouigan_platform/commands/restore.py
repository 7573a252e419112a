"""`prouigan restore PHOTO... -o DIR`: find the faces of real photos, tiny ones included, hallucinate them, and
give the photo back larger.

    prouigan restore crowd.jpg -o restored/                        # YuNet; the upscale chosen from the faces
    prouigan restore cctv.png -o restored/ --upscale 6 --background lanczos --faces
    prouigan restore group.jpg -o restored/ --detector dlib --model ckpt/step_0002000

Each face the detector finds (YuNet by default: faces from about 10 px wide; dlib's HOG with ``--detector dlib``)
is aligned by its points, reduced to the 16x16 thumbnail the model was trained on (or, with --thumbnail, the first
face uses the thumbnail you give), hallucinated to 128x128 and pasted back with a feathered mask into the photo
upscaled ``--upscale`` times (``auto``: the median face's square brought near 128 px, up to x8).  The background
is upscaled by ``--background`` (bicubic by default); a face not found keeps it.

Output per photo: DIR/<name>.png (the restored photo; PNG, so nothing is re-encoded), DIR/<name>.json (every face
found: box, five points, score, detector, size in px, restored or skipped and why; the upscale and why), and with
--faces DIR/<name>_faces.png (thumbnail | result per face).  Every file is written whole or not at all, the
image before its record; photos whose outputs would share a name are refused before anything is written, as is
an output over --max-megapixels.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from prouigan_platform.dataset.labeler import DlibMissing, model_dir, require_dlib
from prouigan_platform.detection import DEFAULT_THRESHOLD, DEFAULT_UPSAMPLE, DetectorMissing, detect
from prouigan_platform.errors import BadInput, Exit, UserError
from prouigan_platform.progress import Progress
from prouigan_platform.storage import write_bytes_atomic, write_png
from prouigan_platform.user_files import MAX_IMAGE_PIXELS, open_image, regular_file

REACH = {"yunet": "faces under about 10 px wide (5 px between the eyes)",
         "dlib": "faces under about 40 px wide (80 px with --upsample 1 ... 20 px with --upsample 2)"}


def _thumbnail(path) -> np.ndarray:
    im = open_image(path, "--thumbnail")
    if im.size != (16, 16):
        raise BadInput(f"--thumbnail {path} is {im.size[0]}x{im.size[1]}, expected 16x16")
    return np.asarray(im.convert("RGB"))


def outputs(path: Path, faces: bool) -> list[str]:
    """The file names a photo's restoration writes."""
    return [f"{path.stem}.png", f"{path.stem}.json"] + ([f"{path.stem}_faces.png"] if faces else [])


def _check_outputs(args) -> None:
    """Every output name is written by one photo only (a.jpg and a.png; a.jpg --faces and a_faces.jpg), and no
    output overwrites an input: refused, naming them, before anything is written."""
    writers = defaultdict(list)
    for p in args.photos:
        for name in outputs(p, args.faces):
            writers[name].append(str(p))
    clash = {n: w for n, w in writers.items() if len(w) > 1}
    if clash:
        raise BadInput("two photos would write the same output: " + "; ".join(
            f"{' and '.join(w)} -> {n}" for n, w in sorted(clash.items())) + " (rename one)")
    out = args.output.resolve()
    hit = [str(p) for p in args.photos if p.resolve().parent == out and p.name in writers]
    if hit:
        raise BadInput(f"--output {args.output} holds {', '.join(hit)}, which the results would overwrite; choose "
                       "another folder")


def _sizes(args) -> dict[Path, tuple[int, int] | None]:
    """Each photo's size from its header (nothing decoded yet); None for an unreadable one.  With a fixed
    --upscale, an output over the cap is refused here, before any photo is worked on."""
    sizes = {}
    for path in args.photos:
        try:
            with warnings.catch_warnings():  # the size is checked below, against our own limit
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
            with im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w  # EXIF-rotated a quarter turn: the photo as shown
            sizes[path] = (w, h)
        except Exception:
            sizes[path] = None
    cap = args.max_megapixels * 1e6
    for path, size in sizes.items():
        if size is None:
            continue
        if size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise BadInput(f"photo {path} is {size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} MP); the "
                           f"limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP: refused before decoding; nothing written")
        n = 1 if args.upscale == "auto" else args.upscale
        if size[0] * size[1] * n * n > cap:
            what = f"x{n} makes it {size[0] * n}x{size[1] * n}" if n > 1 else "it is"
            raise BadInput(f"{path}: {size[0]}x{size[1]} px; {what}, {size[0] * size[1] * n * n / 1e6:.0f} "
                           f"megapixels, over the {args.max_megapixels:g}-megapixel cap (--max-megapixels); "
                           "nothing written")
    return sizes


def _record(path: Path, args, rgb: np.ndarray, faces, upscale: int, why: str) -> dict:
    restored = sum(f.status == "restored" for f in faces)
    h, w = rgb.shape[:2]
    return {
        "photo": str(path), "output": f"{path.stem}.png", "model": args.model,
        "input_size": [w, h], "output_size": [w * upscale, h * upscale],
        "upscale": upscale, "upscale_why": why, "background": args.background,
        "from": "the 16x16 thumbnail alone" if args.thumbnail_only else
                "the 16x16 thumbnail, and a face's own pixels (model stage where it is larger, back-projection onto "
                "the photo)",
        "fidelity": None if args.thumbnail_only else args.fidelity,
        "detector": {"name": args.detector, "upsample": args.upsample, "threshold": args.threshold,
                     "landmarks": "dlib-68" if args.detector == "dlib" or args.landmarks == "dlib" else "yunet-5",
                     "not_found": f"{REACH[args.detector]} are beyond its reach: not found, they keep the upscaled "
                                  "background"},
        "faces_found": len(faces), "faces_restored": restored, "faces_skipped": len(faces) - restored,
        "faces": [{"index": i, **f.to_json(upscale)} for i, f in enumerate(faces)],
    }


def _load(path: Path) -> np.ndarray:
    with open_image(path, "photo") as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def run(args) -> int:
    for p in args.photos:
        regular_file(p, "photo")
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} is a file, not a folder")
    _check_outputs(args)
    if args.fidelity is not None and args.thumbnail_only:
        raise BadInput("--fidelity blends the photo's own pixels back into each face; --thumbnail-only uses none")
    if args.threshold is not None and args.detector != "yunet":
        raise BadInput("--threshold is YuNet's least score; dlib's detector takes none")
    args.upsample = DEFAULT_UPSAMPLE[args.detector] if args.upsample is None else args.upsample
    args.threshold = DEFAULT_THRESHOLD if args.threshold is None and args.detector == "yunet" else args.threshold
    sizes = _sizes(args)
    # the model's code (torch, MLflow) only now: a bad request above is answered at once
    from prouigan_platform.registry import resolve_device, resolve_model
    from prouigan_platform.restoring import FIDELITY, auto_upscale, faces_grid, faces_of, restore_photo

    args.fidelity = FIDELITY if args.fidelity is None else args.fidelity

    device = resolve_device(args.device)
    thumb = _thumbnail(args.thumbnail) if args.thumbnail is not None else None
    try:  # the detector's packages are there (or one line)
        detect(np.zeros((32, 32, 3), np.uint8), args.detector)
        if args.landmarks == "dlib":
            require_dlib(), model_dir()
    except (DetectorMissing, DlibMissing) as e:
        raise UserError(str(e)) from None
    model = resolve_model(args.model, device)
    args.output.mkdir(parents=True, exist_ok=True)
    done, no_face, unreadable = 0, [], []
    progress = Progress("restore", len(args.photos), "photos", every=10)
    for path in args.photos:
        try:
            if sizes[path] is None:
                raise ValueError("its header is not an image's")
            rgb = _load(path)
        except Exception as e:
            unreadable.append(path)
            print(f"prouigan restore: {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
            progress.update()
            continue
        faces = faces_of(rgb, detect(rgb, args.detector, args.upsample, args.threshold, args.landmarks))
        if not faces:
            no_face.append(path)
            print(f"prouigan restore: {path}: no face found by {args.detector} ({REACH[args.detector]} are beyond "
                  "its reach); nothing written", file=sys.stderr)
            progress.update()
            continue
        h, w = rgb.shape[:2]
        if args.upscale == "auto":
            upscale, why = auto_upscale(faces, args.max_megapixels * 1e6, w, h)
        else:
            upscale, why = args.upscale, "--upscale"
        photo = restore_photo(rgb, model, faces, upscale, args.background, thumb if done == 0 else None,
                              photo_pixels=not args.thumbnail_only, fidelity=args.fidelity)
        names = outputs(path, args.faces)
        write_png(args.output / names[0], photo)
        if args.faces and any(f.output is not None for f in faces):
            write_png(args.output / names[2], faces_grid(faces))
        record = _record(path, args, rgb, faces, upscale, why)
        write_bytes_atomic(str(args.output / names[1]), (json.dumps(record, indent=1) + "\n").encode())
        done += 1
        skipped = record["faces_skipped"]
        print(f"restore: {path} -> {args.output / names[0]} ({w}x{h} -> {w * upscale}x{h * upscale}, x{upscale}: "
              f"{why}); {record['faces_restored']} face(s) restored" + (f", {skipped} skipped" if skipped else "")
              + f" (sizes {_size_range(faces)}); record {names[1]}")
        progress.update()
    extra = (f"; no face in {len(no_face)}" if no_face else "") + (
        f"; {len(unreadable)} unreadable" if unreadable else "")
    print(f"restored {done} of {len(args.photos)} photo(s) into {args.output}{extra}")
    return Exit.OK if done else Exit.FAILED


def _size_range(faces) -> str:
    s = sorted(f.square for f in faces)
    return f"{s[0]:.0f} px" if len(s) == 1 else f"{s[0]:.0f}-{s[-1]:.0f} px squares"
