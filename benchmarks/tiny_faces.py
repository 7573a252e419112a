"""Tiny faces in real photos: the 300-W photos of the project's own val and test faces (../shared/faces, split as
the dataset splits them), each rescaled so its face's alignment square is 128 px, then shrunk by 4, 6 and 8 (the
square 32, 21 and 16 px).  Faces under 128 px natively are left out (their "original" would be an upsampled one).

    python benchmarks/tiny_faces.py template             # TEMPLATE_5: the five points of the 68-point alignment
    python benchmarks/tiny_faces.py alignment            # detection recall, and where the detector's square lands
    python benchmarks/tiny_faces.py restore --model exact=CKPT --model jitter=CKPT [--dlib] [--splits test]

``alignment`` measures, at each factor, the share of faces the detector finds (a box with IoU >= 0.3 with the
box of the 68 ground-truth points) and, for each found face, how its alignment square (five points fitted to
TEMPLATE_5) sits in the ground truth's, in pixels of the 16x16 thumbnail: shift, scale, rotation; then the
normal fit of those errors over all factors, which is what ``data.align_jitter`` of the recipes holds.

``restore`` runs `prouigan restore`'s own code on each shrunk photo with ``--upscale`` equal to the factor, with
the face's own pixels (the default) and from the thumbnail alone (``--thumbnail-only``), and scores each found
face, cut from the output by the ground-truth square (128x128), against the original, beside bicubic upscaling of
the whole photo and an oracle: the model on the thumbnail of the ground-truth square, made the way training
makes it.  PSNR / SSIM over the square and PSNR inside restore's face mask; with ``--dlib`` the dlib identity
distance (and the share under its 0.6 match threshold).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prouigan.align import (  # noqa: E402
    ffhq_quad,
    five_points_from_68,
    keypoints_from_68,
    similarity_fit,
    source_to_output,
)
from prouigan_platform.restoring import FIDELITY, PHOTO_BACK_PROJECTION  # noqa: E402

FACTORS = (4, 6, 8)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "faces"


def faces(root: Path, splits: set[str], val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[dict]:
    """The 300-W faces of ``splits`` (by the dataset's own split rule) whose square is >= 128 px natively."""
    from prouigan_platform.config import SourceConfig
    from prouigan_platform.dataset.ingest import assign_split, parse_pts
    from prouigan_platform.dataset.sources import list_300w

    out = []
    for r in list_300w(SourceConfig(kind="300w", path=str(root)), "faces"):
        if not r["pts"] or assign_split(r["key"], val_fraction, test_fraction) not in splits:
            continue
        lm = parse_pts(Path(r["pts"]).read_text())
        quad = ffhq_quad(*keypoints_from_68(lm))
        side = float(np.hypot(*(quad[3] - quad[0])))
        if side >= 128:
            out.append({"key": r["key"], "image": r["image"], "landmarks": lm, "side": side})
    return out


def _resize(img: Image.Image, scale: float) -> tuple[Image.Image, np.ndarray]:
    w, h = img.size
    out = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return out, np.array([out.size[0] / w, out.size[1] / h])


def scaled(face: dict, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(photo at square 128, its 68 points, the photo shrunk by ``factor``, its 68 points); points in pixel
    centres."""
    img = Image.open(face["image"]).convert("RGB")
    big, s1 = _resize(img, 128 / face["side"])
    small, s2 = _resize(big, 1 / factor)
    lm_big = (face["landmarks"] + 0.5) * s1 - 0.5
    return np.asarray(big), lm_big, np.asarray(small), (lm_big + 0.5) * s2 - 0.5


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    from prouigan_platform.detection import iou

    return iou(box, boxes)


def match(detections: list, lm: np.ndarray):
    """The detection whose box overlaps the ground-truth points' box most (IoU >= 0.3), or None."""
    if not detections:
        return None
    box = np.r_[lm.min(0), lm.max(0)]
    ious = _box_iou(box, np.stack([d.box for d in detections]))
    i = int(np.argmax(ious))
    return detections[i] if ious[i] >= 0.3 else None


def frame_error(gt_quad: np.ndarray, quad: np.ndarray, unit: int = 16) -> tuple[float, float, float, float]:
    """Where ``quad`` sits in ``gt_quad``'s frame, in pixels of a ``unit``-px face: (shift x, shift y, scale,
    rotation in degrees), the similarity from the true square's corners to the found one's."""
    a = np.stack([gt_quad[3] - gt_quad[0], gt_quad[1] - gt_quad[0]], 1) / unit
    corners = np.linalg.solve(a, (quad - gt_quad[0]).T).T  # edge coordinates of the true unit-px square
    square = np.array([[0, 0], [0, unit], [unit, unit], [unit, 0]], np.float64)
    m, _ = similarity_fit(square, corners)
    shift = corners.mean(0) - square.mean(0)
    return float(shift[0]), float(shift[1]), float(np.hypot(m[0, 0], m[1, 0])), \
        float(np.degrees(np.arctan2(m[1, 0], m[0, 0])))


def cmd_template(args) -> int:
    train = faces(args.faces, {"train"})
    pts = []
    for f in train:
        quad = ffhq_quad(*keypoints_from_68(f["landmarks"]))
        pts.append(five_points_from_68(source_to_output(f["landmarks"], quad, 128)))
    pts = np.array(pts)
    print(f"{len(pts)} aligned 300-W train faces; the five points in a 128x128 face (mean, std):")
    for name, m, s in zip(("left eye", "right eye", "nose tip", "mouth left", "mouth right"), pts.mean(0),
                          pts.std(0), strict=True):
        print(f"  {name:12s} ({m[0]:6.2f}, {m[1]:6.2f})  std ({s[0]:.2f}, {s[1]:.2f})")
    print("TEMPLATE_5 = np.array(" + str(np.round(pts.mean(0), 2).tolist()) + ")")
    return 0


def cmd_alignment(args) -> int:
    from prouigan_platform.detection import detect
    from prouigan_platform.restoring import face_quad

    held_out = faces(args.faces, {"val", "test"})
    print(f"{len(held_out)} val/test 300-W faces (square >= 128 px natively); detector {args.detector}, landmarks "
          f"{args.landmarks}"
          + (f", upsample {args.upsample}" if args.upsample is not None else ""))
    pooled = []
    print("| factor (square) | found | recall | other faces found | shift x | shift y | scale | rotation (deg) | "
          "corner error | s/photo |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    square = np.array([[0, 0], [0, 16], [16, 16], [16, 0]], np.float64)
    for factor in args.factors:
        found, others, errs, t0 = 0, 0, [], time.perf_counter()
        for f in held_out:
            _, lm_big, small, lm = scaled(f, factor)
            dets = detect(small, args.detector, args.upsample, landmarks=args.landmarks)
            d = match(dets, lm)
            others += len(dets) - (d is not None)
            if d is None:
                continue
            found += 1
            gt = ffhq_quad(*keypoints_from_68(lm))
            quad = face_quad(d)
            corners = np.linalg.solve(np.stack([gt[3] - gt[0], gt[1] - gt[0]], 1) / 16, (quad - gt[0]).T).T
            errs.append((*frame_error(gt, quad), float(np.sqrt(((corners - square) ** 2).sum(1).mean()))))
        rate = (time.perf_counter() - t0) / len(held_out)
        head = f"| x{factor} ({128 // factor} px) | {found}/{len(held_out)} | {found / len(held_out):.1%} | {others} "
        if not errs:
            print(head + "| – | – | – | – | – | " + f"{rate:.2f} |")
            continue
        e = np.array(errs)
        pooled.append(e[:, :4])
        ms = lambda c, e=e: f"{e[:, c].mean():+.2f} ± {e[:, c].std():.2f}"  # noqa: E731
        print(head + f"| {ms(0)} | {ms(1)} | {e[:, 2].mean():.3f} ± {e[:, 2].std():.3f} | {ms(3)} | "
              f"{e[:, 4].mean():.2f} px | {rate:.2f} |")
    print("\nshift, scale, rotation: mean ± std over the found faces, in pixels of the 16x16 thumbnail; corner error: "
          "the mean distance of the found square's corners from the true ones (16-px units)")
    if pooled:
        p = np.concatenate(pooled)
        print("\nthe normal fit over all factors (data.align_jitter):")
        print(f"  align_jitter: {{shift_mean: [{p[:, 0].mean():.2f}, {p[:, 1].mean():.2f}], shift_std: "
              f"[{p[:, 0].std():.2f}, {p[:, 1].std():.2f}], scale_mean: {p[:, 2].mean():.3f}, scale_std: "
              f"{p[:, 2].std():.3f}, rotation_std: {np.sqrt((p[:, 3] ** 2).mean()):.1f}}}")
    return 0


def _tensor(images: list[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _identity(original: np.ndarray, lm128: np.ndarray, others: dict[str, np.ndarray]) -> dict[str, float]:
    """dlib's identity distance of each face to the original, in the box dlib finds on the original."""
    from prouigan_platform.dataset.labeler import describe, face_box

    box = face_box(original, lm128)
    if box is None:
        return {}
    ref = describe(original, box)[1]
    return {k: float(np.linalg.norm(describe(v, box)[1] - ref)) for k, v in others.items()}


def cmd_restore(args) -> int:
    import torch

    from prouigan.align import align_quad, face_mask
    from prouigan.degradation import downsample
    from prouigan.metrics import masked_psnr, psnr, ssim
    from prouigan_platform.detection import detect
    from prouigan_platform.registry import resolve_model
    from prouigan_platform.restoring import faces_of, restore_photo, upscale_photo

    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.model)
    nets = {name: resolve_model(uri) for name, uri in models.items()}
    held_out = faces(args.faces, set(args.splits))[: args.limit]
    print(f"{len(held_out)} 300-W faces (square >= 128 px natively); detector {args.detector}, landmarks "
          f"{args.landmarks}; models: "
          + ", ".join(f"{k}={v}" for k, v in models.items()) + f"; splits {', '.join(args.splits)}", flush=True)
    mask = torch.from_numpy(face_mask(128))[None, None]
    results = {}
    for factor in args.factors:
        scores: dict[str, list] = {}
        found, t0 = 0, time.perf_counter()
        for n, f in enumerate(held_out):
            big, lm_big, small, lm = scaled(f, factor)
            original = align_quad(big, ffhq_quad(*keypoints_from_68(lm_big))).image
            gt_out = ffhq_quad(*keypoints_from_68((lm + 0.5) * factor - 0.5))  # the true square in the output
            dets = detect(small, args.detector, landmarks=args.landmarks)
            d = match(dets, lm)
            crops = {"bicubic": align_quad(upscale_photo(small, factor), gt_out).image}
            thumb = downsample(_tensor([original]))
            for name, net in nets.items():  # the oracle: the thumbnail of the true square, made as in training
                crops[f"{name} (oracle)"] = net.to_uint8(thumb)[0]
            if d is not None:
                found += 1
                crops["bicubic (the faces found)"] = crops["bicubic"]
                for name, net in nets.items():
                    if not args.no_thumbnail_only:
                        out = restore_photo(small, net, faces_of(small, dets), factor, photo_pixels=False)
                        crops[f"{name} (restore, thumbnail only)"] = align_quad(out, gt_out).image
                    for bp in args.photo_back_projection:
                        for fid in args.fidelity:
                            out = restore_photo(small, net, faces_of(small, dets), factor, photo_back_projection=bp,
                                                fidelity=fid)
                            label = (f", photo back-projection {bp}" if len(args.photo_back_projection) > 1 else "") + (
                                f", fidelity {fid:g}" if len(args.fidelity) > 1 else "")
                            crops[f"{name} (restore{label})"] = align_quad(out, gt_out).image
            ref = _tensor([original])
            for label, img in crops.items():
                x = _tensor([img])
                row = {"psnr": float(psnr(x, ref)[0]), "psnr_face": float(masked_psnr(x, ref, mask)[0]),
                       "ssim": float(ssim(x, ref)[0])}
                scores.setdefault(label, []).append(row)
            if args.dlib:
                lm128 = source_to_output(lm_big, ffhq_quad(*keypoints_from_68(lm_big)), 128)
                for label, dist in _identity(original, lm128, crops).items():
                    scores[label][-1]["identity"] = dist
            if (n + 1) % 50 == 0:
                el = time.perf_counter() - t0
                print(f"  x{factor}: {n + 1}/{len(held_out)} faces, {(n + 1) / el:.1f}/s, ETA "
                      f"{el / (n + 1) * (len(held_out) - n - 1):.0f} s", flush=True)
        results[factor] = (found, scores)
    print("\n| factor (square) | recall | method | faces | PSNR | PSNR in the face mask | SSIM"
          + (" | identity distance | match (< 0.6)" if args.dlib else "") + " |")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.dlib else ""))
    for factor, (found, scores) in results.items():
        for i, (label, rows) in enumerate(scores.items()):
            mean = lambda k, rows=rows: np.nanmean([r.get(k, np.nan) for r in rows])  # noqa: E731
            head = f"| x{factor} ({128 // factor} px) | {found / len(held_out):.1%} |" if i == 0 else "| | |"
            line = f"{head} {label} | {len(rows)} | {mean('psnr'):.2f} | {mean('psnr_face'):.2f} | {mean('ssim'):.3f}"
            if args.dlib:
                ids = np.array([r["identity"] for r in rows if "identity" in r])
                line += f" | {ids.mean():.3f} | {(ids < 0.6).mean():.1%}" if len(ids) else " | – | –"
            print(line + " |")
    print("\nbicubic and the oracles are scored on every face; restore, and bicubic again, on the faces the detector "
          "found (the same faces for every model). PSNR / SSIM over the 128x128 true square; 'in the face mask': "
          "inside restore's feathered ellipse.")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=Path, default=SHARED, help="the 300-W folder (default ../shared/faces)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("template", help="the five-point template of the 68-point alignment")
    al = sub.add_parser("alignment", help="detection recall and alignment error at each factor")
    al.add_argument("--detector", default="yunet")
    al.add_argument("--upsample", type=int, default=None, help="the detector's (default: its own)")
    al.add_argument("--landmarks", default="yunet", choices=["yunet", "dlib"])
    al.add_argument("--factors", type=int, nargs="+", default=list(FACTORS))
    rs = sub.add_parser("restore", help="restore's faces against bicubic and the oracle")
    rs.add_argument("--model", action="append", required=True, help="NAME=MODEL (a checkpoint or models:/ URI); "
                                                                    "repeat to compare")
    rs.add_argument("--detector", default="yunet")
    rs.add_argument("--landmarks", default="yunet", choices=["yunet", "dlib"])
    rs.add_argument("--factors", type=int, nargs="+", default=list(FACTORS))
    rs.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    rs.add_argument("--dlib", action="store_true", help="also the dlib identity distance (the eval extra)")
    rs.add_argument("--photo-back-projection", type=int, nargs="+", default=[PHOTO_BACK_PROJECTION],
                    help="steps of restore's back-projection in the output photo, a row each (default: restore's)")
    rs.add_argument("--fidelity", type=float, nargs="+", default=[FIDELITY],
                    help="restore's --fidelity, a row each (default: restore's)")
    rs.add_argument("--no-thumbnail-only", action="store_true", help="leave out the thumbnail-only rows")
    rs.add_argument("--limit", type=int, default=None, help="the first N faces only")
    rs.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.faces.is_dir():
        print(f"{args.faces} is absent: this benchmark reads the 300-W faces of ../shared/faces (research-use "
              "licence, never in the repository)", file=sys.stderr)
        return 2
    return {"template": cmd_template, "alignment": cmd_alignment, "restore": cmd_restore}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
