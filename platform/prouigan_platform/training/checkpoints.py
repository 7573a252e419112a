"""Training checkpoints on storage, and which one a run resumes from.

A checkpoint is a folder ``<train.storage>/<name>/step_NNNNNNN/`` holding ``state.pt`` and ``complete.json``, the
latter written after the former with its size and sha256.  A folder whose record is missing or does not match
its ``state.pt`` was cut short (a crash or a full disk while writing, an upload that stopped): it is torn, and a
resume skips it, says so, and takes the newest checkpoint that is complete.  (A folder from before the record
existed counts as complete when its ``state.pt`` loads.)

What ``state.pt`` holds is a ``TrainingState``, written and read here only: its ``to_dict`` is the one layout
(flat, so that a training checkpoint is also a generator file for ``prouigan.inference``), versioned by
``training_format``; a checkpoint of a newer layout is refused in one line naming both versions.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import torch

from prouigan_platform import storage
from prouigan_platform.errors import UserError

CHECKPOINT_FILE = "state.pt"
RECORD_FILE = "complete.json"
# 1: the layout before this field existed (the same keys); 2: with it
TRAINING_FORMAT = 2


class CheckpointFormatError(UserError):
    """A checkpoint this platform cannot read (a newer layout, or not a training checkpoint): one line, exit 1."""


@dataclass
class TrainingState:
    """Everything a training run resumes from, and the generator it registers."""

    step: int
    generator: dict  # prouigan.inference.generator_state of the generator validated and registered (the EMA's, if on)
    d_global: dict
    d_local: dict
    optimizers: dict
    config: dict  # the run's resolved config (JSON-able)
    elapsed_s: float = 0.0
    shards_read: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    manifest_digest: str | None = None  # the dataset version trained on
    generator_raw: dict | None = None  # with an EMA: the weights G trains on (``generator`` holds the average)

    @property
    def generator_config(self) -> dict:
        return self.generator["generator_config"]

    @property
    def trained_weights(self) -> dict:
        """The weights the optimiser steps: G's own, whether or not an average is registered."""
        return self.generator_raw if self.generator_raw is not None else self.generator["generator"]

    def to_dict(self) -> dict:
        return {**self.generator, "training_format": TRAINING_FORMAT, "step": self.step,
                "d_global": self.d_global, "d_local": self.d_local, "optimizers": self.optimizers,
                "config": self.config, "elapsed_s": self.elapsed_s, "shards_read": list(self.shards_read),
                "shards_skipped": list(self.shards_skipped), "manifest_digest": self.manifest_digest,
                **({"generator_raw": self.generator_raw} if self.generator_raw is not None else {})}

    @classmethod
    def from_dict(cls, d: dict, where: str = "the checkpoint") -> TrainingState:
        version = d.get("training_format", 1) if isinstance(d, dict) else None
        if version is None or not {"generator", "generator_config", "step"} <= set(d):
            raise CheckpointFormatError(f"{where} is not a Pro-UIGAN training checkpoint")
        if version > TRAINING_FORMAT:
            raise CheckpointFormatError(f"{where} has training format {version}; this platform reads up to "
                                        f"{TRAINING_FORMAT}: use the platform version that wrote it")
        gen = {k: d[k] for k in ("format", "generator_config", "generator") if k in d}
        return cls(step=int(d["step"]), generator=gen,
                   d_global=d["d_global"], d_local=d["d_local"], optimizers=d["optimizers"], config=d["config"],
                   elapsed_s=float(d.get("elapsed_s", 0.0)), shards_read=list(d.get("shards_read", [])),
                   shards_skipped=list(d.get("shards_skipped", [])), manifest_digest=d.get("manifest_digest"),
                   generator_raw=d.get("generator_raw"))


def write(folder: Path, state: TrainingState) -> None:
    """``state.pt``, then the record that says it is whole: each written whole (fsync'd, then renamed into place)."""
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    data = buf.getvalue()
    storage.write_bytes_atomic(str(Path(folder) / CHECKPOINT_FILE), data)
    storage.write_bytes_atomic(str(Path(folder) / RECORD_FILE), json.dumps(
        {"file": CHECKPOINT_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
         "step": state.step}).encode())


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


def load(uri: str) -> TrainingState:
    """The training state of the checkpoint folder ``uri`` (local or on the store)."""
    state_uri = storage.join(uri, CHECKPOINT_FILE)
    return TrainingState.from_dict(torch.load(io.BytesIO(storage.read_bytes(state_uri)), map_location="cpu",
                                              weights_only=True), state_uri)


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
