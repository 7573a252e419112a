"""Source adapters: each lists the faces of one dataset as plain records (dicts that travel as Ray Data rows).

A record names one input (an image, maybe with a landmark file or inline points) and carries:
  key          unique, stable sample key: ``{source name}_{relative path}`` with every character outside
               [A-Za-z0-9_-] replaced by '_' (WebDataset splits member names at the first dot)
  source       the source's name;  kind: 300w | celeba | photos | synthetic
  fingerprint  size and mtime of its files, so a re-run knows what it has already ingested
  group        who is in it, where the source says (CelebA identity, a photos folder's groups.csv)
Listing reads no pixels.  An unreadable source folder is an error, not an empty dataset.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

from prouigan_platform.config import SourceConfig
from prouigan_platform.dataset.labeler import DlibMissing, require_dlib

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


def _require_labeller(root: Path, kind: str) -> None:
    try:
        require_dlib()  # fail at listing time, not in a thousand Ray tasks
    except DlibMissing as e:
        raise SourceError(f"the '{kind}' source ({root}) is labelled by dlib: {e}") from None


def list_celeba(src: SourceConfig, name: str) -> list[dict]:
    """CelebA in either of two layouts.
    official: img_align_celeba/ + list_landmarks_align_celeba.txt (5 points) [+ list_eval_partition.txt,
              identity_CelebA.txt];
    folder:   the aligned JPEGs directly in the folder [+ MANIFEST.json: [{"name", "identity"}, ...]], no
              landmarks: dlib finds the one face and its 68 points (the ``eval`` extra).
    Either way the identity number, where known, is the sample's group: a person is in one split only."""
    root = Path(src.path).expanduser().resolve()  # absolute: Ray workers run elsewhere
    _check_folder(root, "celeba")
    if not (root / "img_align_celeba").is_dir():
        return _list_celeba_folder(root, name)
    img_dir, lm_file, part_file = root / "img_align_celeba", root / "list_landmarks_align_celeba.txt", \
        root / "list_eval_partition.txt"
    if not lm_file.exists():
        raise SourceError(f"celeba source {root} has img_align_celeba/ but no {lm_file.name} (expected "
                          "img_align_celeba/ + list_landmarks_align_celeba.txt [+ list_eval_partition.txt])")
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
    ident_file = root / "identity_CelebA.txt"
    identity = dict(line.split()[:2] for line in ident_file.read_text().splitlines() if len(line.split()) >= 2) \
        if ident_file.exists() else {}
    records = []
    for f in _walk(img_dir):
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        p = points.get(f.name)
        records.append({"key": make_key(name, f.stem), "source": name, "kind": "celeba", "image": str(f),
                        "pts": None, "points5": p if isinstance(p, list) else None,
                        "problem": None if isinstance(p, list) else (p or "no landmarks listed for this image"),
                        "split": splits.get(f.name), "group": identity.get(f.name), "fingerprint": _fingerprint(f)})
    return records


def _list_celeba_folder(root: Path, name: str) -> list[dict]:
    files = [f for f in sorted(root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise SourceError(f"celeba source {root} holds no images (expected the aligned JPEGs, or "
                          "img_align_celeba/ + list_landmarks_align_celeba.txt)")
    _require_labeller(root, "celeba")
    identity: dict[str, str] = {}
    manifest = root / "MANIFEST.json"
    if manifest.exists():
        try:
            entries = json.loads(manifest.read_text())
            identity = {str(e["name"]): str(e["identity"]) for e in entries if e.get("identity") is not None}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SourceError(f"{manifest}: expected a JSON list of {{'name', 'identity'}} entries "
                              f"({type(e).__name__}: {e})") from None
    return [{"key": make_key(name, f.stem), "source": name, "kind": "celeba", "image": str(f), "label": "one",
             "group": identity.get(f.stem), "fingerprint": _fingerprint(f)} for f in files]


def _read_groups(root: Path, sidecar: str | None) -> dict[str, str]:
    """A CSV sidecar `file,group` (file relative to the folder, with or without its extension)."""
    path = Path(sidecar).expanduser() if sidecar else root / "groups.csv"
    if not path.is_absolute():
        path = root / path
    if not path.exists():
        if sidecar:
            raise SourceError(f"photos source {root}: groups file not found: {path}")
        return {}
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: unreadable groups file ({type(e).__name__}: {e})") from None
    if rows and not {"file", "group"} <= set(rows[0]):
        raise SourceError(f"{path}: expected a header with the columns 'file' and 'group', got {list(rows[0])}")
    return {r["file"].strip(): r["group"].strip() for r in rows if r.get("file") and r.get("group")}


def list_photos(src: SourceConfig, name: str) -> list[dict]:
    """A plain folder of photos; dlib finds every face.  With a groups sidecar a photo is one person: exactly one
    face is expected there, and that person's photos stay in one split."""
    root = Path(src.path).expanduser().resolve()  # absolute: Ray workers run elsewhere
    _check_folder(root, "photos")
    groups = _read_groups(root, src.groups)
    _require_labeller(root, "photos")
    records = []
    for f in _walk(root):
        if f.suffix.lower() not in PHOTO_EXTS:
            continue
        rel = f.relative_to(root).as_posix()
        group = groups.get(rel) or groups.get(rel.rsplit(".", 1)[0])
        records.append({"key": make_key(name, f.relative_to(root).with_suffix("").as_posix()), "source": name,
                        "kind": "photos", "image": str(f), "label": "one" if group else "all", "group": group,
                        "fingerprint": _fingerprint(f)})
    return records


def list_synthetic(src: SourceConfig, name: str) -> list[dict]:
    return [{"key": make_key(name, f"{i:06d}"), "source": name, "kind": "synthetic", "image": None, "pts": None,
             "points5": None, "split": None, "seed": i, "fingerprint": f"synthetic:{i}"} for i in range(src.count)]


ADAPTERS = {"300w": list_300w, "celeba": list_celeba, "photos": list_photos, "synthetic": list_synthetic}


def source_name(src: SourceConfig) -> str:
    if src.name:
        return src.name
    if src.kind in ("synthetic", "celeba"):
        return src.kind
    return Path(src.path).expanduser().resolve().name or src.kind


# every record carries every field (Ray Data rows of one dataset share one schema)
#   group   who is in the photo, where the source knows (splits keep a group together)
#   label   "one" | "all": dlib finds the face (exactly one) or every face; None: the source has landmarks
#   labels  dlib's result for this input from an earlier run (JSON), attached by the build so nothing is
#           labelled twice
RECORD_FIELDS = {"key": None, "source": None, "kind": None, "image": None, "pts": None, "points5": None,
                 "split": None, "seed": None, "problem": None, "fingerprint": None, "group": None, "label": None,
                 "labels": None}


def list_sources(sources: list[SourceConfig]) -> list[dict]:
    records: list[dict] = []
    for src in sources:
        listed = ADAPTERS[src.kind](src, source_name(src))
        records.extend({**RECORD_FIELDS, **r} for r in listed[: src.limit])
    return records
