"""Source adapters: each lists the faces of one dataset as plain records (dicts that travel as Ray Data rows).

A record names one input (an image, maybe with a landmark file or inline points) and carries:
  key          unique, stable sample key: ``{source name}_{relative path}`` with every character outside
               [A-Za-z0-9_-] replaced by '_' (WebDataset splits member names at the first dot)
  source       the source's name;  kind: 300w | celeba | photos | synthetic
  fingerprint  size and mtime of its files, so a re-run knows what it has already ingested
Listing reads no pixels.  An unreadable source folder is an error, not an empty dataset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prouigan_platform.config import SourceConfig

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
PHOTO_EXTS = IMAGE_EXTS | {".bmp", ".webp", ".tif", ".tiff"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class SourceError(RuntimeError):
    """A source cannot be listed (missing, unreadable, or not of its kind)."""


def make_key(source: str, rel: str) -> str:
    return _UNSAFE.sub("_", f"{source}_{rel}")


def _fingerprint(*paths: Path | None) -> str:
    parts = []
    for p in paths:
        if p is None or not p.exists():
            parts.append("-")
        else:
            st = p.stat()
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise SourceError(f"{what} source folder does not exist: {path}")
    if not path.is_dir():
        raise SourceError(f"{what} source is not a folder: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceError(f"{what} source folder is not readable: {path}")


def _walk(root: Path) -> list[Path]:
    """Every file under root, sorted; unreadable sub-folders are an error naming them."""
    out: list[Path] = []

    def onerror(err: OSError) -> None:
        raise SourceError(f"cannot read folder {err.filename}: {err.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def list_300w(src: SourceConfig, name: str) -> list[dict]:
    root = Path(src.path).expanduser().resolve()  # absolute: Ray workers run elsewhere
    _check_folder(root, "300w")
    records = []
    for f in _walk(root):
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        pts = f.with_suffix(".pts")
        rel = f.relative_to(root).with_suffix("").as_posix()
        records.append({"key": make_key(name, rel), "source": name, "kind": "300w", "image": str(f),
                        "pts": str(pts) if pts.exists() else None, "points5": None, "split": None,
                        "fingerprint": _fingerprint(f, pts)})
    return records


def list_celeba(src: SourceConfig, name: str) -> list[dict]:
    root = Path(src.path).expanduser().resolve()  # absolute: Ray workers run elsewhere
    _check_folder(root, "celeba")
    img_dir, lm_file, part_file = root / "img_align_celeba", root / "list_landmarks_align_celeba.txt", \
        root / "list_eval_partition.txt"
    for p in (img_dir, lm_file):
        if not p.exists():
            raise SourceError(f"celeba source {root} has no {p.name} (expected img_align_celeba/ + "
                              "list_landmarks_align_celeba.txt [+ list_eval_partition.txt])")
    lines = lm_file.read_text().splitlines()
    points: dict[str, list[float] | str] = {}
    for line in lines[2:]:  # count line, header line
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [float(v) for v in parts[1:]]
            points[parts[0]] = vals if len(vals) == 10 else f"expected 10 numbers, got {len(vals)}"
        except ValueError:
            points[parts[0]] = "non-numeric landmark values"
    splits = {}
    if part_file.exists():
        names = {"0": "train", "1": "val", "2": "test"}
        for line in part_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                splits[parts[0]] = names.get(parts[1])
    records = []
    for f in _walk(img_dir):
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        p = points.get(f.name)
        records.append({"key": make_key(name, f.stem), "source": name, "kind": "celeba", "image": str(f),
                        "pts": None, "points5": p if isinstance(p, list) else None,
                        "problem": None if isinstance(p, list) else (p or "no landmarks listed for this image"),
                        "split": splits.get(f.name), "fingerprint": _fingerprint(f)})
    return records


def list_photos(src: SourceConfig, name: str) -> list[dict]:
    root = Path(src.path).expanduser().resolve()  # absolute: Ray workers run elsewhere
    _check_folder(root, "photos")
    from prouigan_platform.dataset.labeler import DlibMissing, require_dlib

    try:
        require_dlib()  # fail at listing time, not in a thousand Ray tasks
    except DlibMissing as e:
        raise SourceError(f"the 'photos' source ({root}): {e}") from None
    return [{"key": make_key(name, f.relative_to(root).with_suffix("").as_posix()), "source": name,
             "kind": "photos", "image": str(f), "pts": None, "points5": None, "split": None,
             "fingerprint": _fingerprint(f)}
            for f in _walk(root) if f.suffix.lower() in PHOTO_EXTS]


def list_synthetic(src: SourceConfig, name: str) -> list[dict]:
    return [{"key": make_key(name, f"{i:06d}"), "source": name, "kind": "synthetic", "image": None, "pts": None,
             "points5": None, "split": None, "seed": i, "fingerprint": f"synthetic:{i}"} for i in range(src.count)]


ADAPTERS = {"300w": list_300w, "celeba": list_celeba, "photos": list_photos, "synthetic": list_synthetic}


def source_name(src: SourceConfig) -> str:
    if src.name:
        return src.name
    if src.kind == "synthetic":
        return "synthetic"
    return Path(src.path).expanduser().resolve().name or src.kind


# every record carries every field (Ray Data rows of one dataset share one schema)
RECORD_FIELDS = {"key": None, "source": None, "kind": None, "image": None, "pts": None, "points5": None,
                 "split": None, "seed": None, "problem": None, "fingerprint": None}


def list_sources(sources: list[SourceConfig]) -> list[dict]:
    records: list[dict] = []
    for src in sources:
        records.extend({**RECORD_FIELDS, **r} for r in ADAPTERS[src.kind](src, source_name(src)))
    return records
