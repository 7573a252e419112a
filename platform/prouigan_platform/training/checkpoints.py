"""Training checkpoints on storage, and which one a run resumes from.

A checkpoint is a folder ``<train.storage>/<name>/step_NNNNNNN/`` holding ``state.pt`` and ``complete.json``, the
latter written after the former with its size and sha256.  A folder whose record is missing or does not match
its ``state.pt`` was cut short (a crash or a full disk while writing, an upload that stopped): it is torn, and a
resume skips it, says so, and takes the newest checkpoint that is complete.  (A folder from before the record
existed counts as complete when its ``state.pt`` loads.)
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.fs as pafs
import torch

from prouigan_platform import storage

CHECKPOINT_FILE = "state.pt"
RECORD_FILE = "complete.json"


def write(folder: Path, state: dict) -> None:
    """``state.pt``, then the record that says it is whole: each written whole (fsync'd, then renamed into place)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    storage.write_bytes_atomic(str(Path(folder) / CHECKPOINT_FILE), data)
    storage.write_bytes_atomic(str(Path(folder) / RECORD_FILE), json.dumps(
        {"file": CHECKPOINT_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
         "step": state.get("step")}).encode())


def torn(uri: str) -> str | None:
    """Why the checkpoint folder ``uri`` cannot be resumed from, or None when it is complete."""
    state_uri = storage.join(uri, CHECKPOINT_FILE)
    if not storage.exists(state_uri):
        return f"no {CHECKPOINT_FILE}"
    data = storage.read_bytes(state_uri)
    record_uri = storage.join(uri, RECORD_FILE)
    if storage.exists(record_uri):
        try:
            record = json.loads(storage.read_bytes(record_uri))
        except ValueError:
            return f"{RECORD_FILE} is not JSON"
        if record.get("bytes") != len(data) or record.get("sha256") != hashlib.sha256(data).hexdigest():
            return f"{CHECKPOINT_FILE} holds {len(data):,} bytes that do not match its record ({record.get('bytes')})"
        return None
    try:  # a checkpoint from before the record: complete if it loads
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        return f"{CHECKPOINT_FILE} does not load ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    return None


def load(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, CHECKPOINT_FILE))), map_location="cpu",
                      weights_only=True)


def step_folders(run_dir: str) -> list[str]:
    """The ``step_*`` checkpoint folders of a run, oldest first (as URIs)."""
    fs, path = storage.filesystem(run_dir)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("step_"))
    return [storage.join(run_dir, n) for n in names]


def newest_complete(run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint folder or None, [(newer torn folder, why)])."""
    skipped = []
    for uri in reversed(step_folders(run_dir)):
        why = torn(uri)
        if why is None:
            return uri, skipped
        skipped.append((uri, why))
    return None, skipped
