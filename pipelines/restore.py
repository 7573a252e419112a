"""Restore the faces in real photos: detect, align, make the 16x16 thumbnail, hallucinate, paste back.

    prouigan restore photo1.jpg photo2.png -o restored/ --model models:/prouigan@champion
    prouigan restore group.jpg -o restored/ --model ckpt/step_0002000 --thumbnail my_16x16_face.png

Each face dlib's detector finds (the ``eval`` extra) is aligned to 128x128 by the dataset's FFHQ recipe,
reduced to the 16x16 thumbnail the model was trained on (or, with --thumbnail, the first face uses the
thumbnail you give), hallucinated, and pasted back through the inverse alignment with a feathered face mask;
the rest of the photo is unchanged.  Output: OUTDIR/<name>.png, the same size as the photo (PNG, so nothing
outside the faces is re-encoded), and with --faces OUTDIR/<name>_faces.png (thumbnail | result per face).
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "restore the faces in photos (dlib detector, align, hallucinate, paste back with a feathered mask)"


def add_arguments(parser) -> None:
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--model", default="models:/prouigan@champion",
                        help="checkpoint, runs:/ID/model or models:/NAME@ALIAS (default models:/prouigan@champion)")
    parser.add_argument("--thumbnail", type=Path, default=None,
                        help="a 16x16 face to use for the first (largest) face instead of the photo's own")
    parser.add_argument("--faces", action="store_true", help="also write each face's thumbnail and result")
    parser.add_argument("--upsample", type=int, default=1, help="detector upsampling (1: faces from ~40 px)")
    parser.add_argument("--device", default="cpu")


def restore_photo(rgb, model, thumbnail=None, upsample: int = 1):
    """(H, W, 3) uint8 -> (restored photo, [(thumbnail 16x16, face 128x128)] per face); no faces: ([], ...)."""
    import numpy as np
    import torch

    from prouigan.align import align, keypoints_from_68, paste_back
    from prouigan.degradation import downsample
    from prouigan_platform.dataset.labeler import detect_faces

    faces = detect_faces(rgb, upsample)
    if not faces:
        return rgb, []
    aligned = [align(rgb, *keypoints_from_68(lm), size=128) for lm in faces]
    hr = torch.from_numpy(np.stack([a.image for a in aligned]).copy()).permute(0, 3, 1, 2).float() / 255
    thumbs = (downsample(hr).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    if thumbnail is not None:
        thumbs[0] = thumbnail
    out = model.to_uint8(thumbs)
    photo = rgb
    for a, face in zip(aligned, out, strict=True):
        photo = paste_back(photo, face, a.quad)
    return photo, list(zip(thumbs, out, strict=True))


def run(args) -> int:
    import numpy as np
    from PIL import Image, ImageOps
    from tqdm import tqdm

    from prouigan_platform.dataset.labeler import DlibMissing, require_dlib
    from prouigan_platform.registry import resolve_model
    from prouigan_platform.runtime import use_embedded_stack

    missing = [str(p) for p in args.photos if not p.is_file()]
    if missing:
        print(f"prouigan restore: error: not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    thumb = None
    if args.thumbnail is not None:
        im = Image.open(args.thumbnail).convert("RGB")
        if im.size != (16, 16):
            print(f"prouigan restore: error: --thumbnail {args.thumbnail} is {im.size[0]}x{im.size[1]}, "
                  "expected 16x16", file=sys.stderr)
            return 2
        thumb = np.asarray(im)
    try:
        require_dlib()
    except DlibMissing as e:
        print(f"prouigan restore: error: {e}", file=sys.stderr)
        return 1
    if args.model.startswith(("runs:/", "models:/")):
        use_embedded_stack()
    model = resolve_model(args.model, args.device)
    args.output.mkdir(parents=True, exist_ok=True)
    done, no_face, unreadable = 0, [], []
    for path in tqdm(args.photos, desc="restoring", unit="photo", disable=len(args.photos) < 2):
        try:
            rgb = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        except Exception as e:
            unreadable.append(path)
            print(f"prouigan restore: {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        photo, faces = restore_photo(rgb, model, thumb if done == 0 else None, args.upsample)
        if not faces:
            no_face.append(path)
            print(f"prouigan restore: {path}: no face found by dlib's detector (try --upsample 2 for small "
                  "faces); nothing written", file=sys.stderr)
            continue
        Image.fromarray(photo).save(args.output / f"{path.stem}.png")
        if args.faces:
            strip = np.concatenate([np.concatenate([np.asarray(Image.fromarray(t).resize((128, 128), Image.NEAREST)),
                                                    f], 1) for t, f in faces], 0)
            Image.fromarray(strip).save(args.output / f"{path.stem}_faces.png")
        done += 1
        print(f"restore: {path} -> {args.output / (path.stem + '.png')} ({len(faces)} face(s))")
    extra = (f"; no face in {len(no_face)}" if no_face else "") + (
        f"; {len(unreadable)} unreadable" if unreadable else "")
    print(f"restored {done} of {len(args.photos)} photo(s) into {args.output}{extra}")
    return 0 if done else 1


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("restore")
