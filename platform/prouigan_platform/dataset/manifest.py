"""Dataset versions: WebDataset shards + one JSON manifest per version, under a root (local or s3://).

    ROOT/shards/{split}-{index:06d}.tar     immutable; written as ROOT/shards/_tmp/..., then moved into place
    ROOT/manifests/v{version:04d}.json      written last: a version exists once its manifest does

Each tar holds ``{key}.png`` (the aligned 128x128 HR face, lossless) and ``{key}.json`` (landmarks, source,
native size, split).  A manifest lists its sources, the data-config hash, per-split counts (overall and per
source), every shard (source, split, sample count, sha256, bytes, the version that added it), every sample
(fingerprint, split, shard), every quarantined input with its reason, and the dlib label parts it used.
Versions are incremental: a new one keeps its parent's shards and adds shards for new or changed inputs; the
samples of changed inputs are listed as superseded in their old shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import webdataset as wds

from prouigan_platform import storage
from prouigan_platform.errors import UserError

FORMAT = "prouigan-dataset/1"
SPLITS = ("train", "val", "test")
_VERSION = re.compile(r"^v(\d{4,})\.json$")
_SHARD = re.compile(r"^(train|val|test)-(\d{6,})\.tar$")


def shards_dir(root: str) -> str:
    return storage.join(root, "shards")


def manifests_dir(root: str) -> str:
    return storage.join(root, "manifests")


def manifest_uri(root: str, version: int) -> str:
    return storage.join(manifests_dir(root), f"v{version:04d}.json")


def latest_version(root: str) -> int:
    versions = [int(m.group(1)) for u in storage.list_files(manifests_dir(root), ".json")
                if (m := _VERSION.match(u.rsplit("/", 1)[-1]))]
    return max(versions, default=0)


class Sample(NamedTuple):
    """One accepted face of a version, as the manifest's ``samples`` holds it under its key (a JSON list, in this
    order): its input's fingerprint, its split, the shard that holds it (empty while a build writes it), its input."""

    fingerprint: str
    split: str
    shard: str
    input: str


class Manifest(dict):
    """One dataset version: the JSON document ``manifests/vNNNN.json`` with typed fields, and where it was read from.

    It stays the JSON it is stored as (``json.dumps`` works, ``m["counts"]`` reads a field by the file's name) and
    reads as typed attributes (``m.version``, ``m.shards``, ...; ``m.uri``, ``m.base``: this file's URI and the
    folder its shards are found in, beside the manifest wherever the dataset moved).  ``shards`` (name, source,
    split, count, sha256, bytes, version_added), ``samples`` (key -> ``Sample``: fingerprint, split, shard, input) and
    ``quarantine`` rows are JSON records.  ``Manifest.of`` checks a document's fields and their types."""

    REQUIRED = {"format": str, "version": int, "root": str, "shards": list, "counts": dict}
    OPTIONAL = {"parent": (int, type(None)), "created": str, "config": dict, "config_hash": str, "sources": list,
                "counts_by_source": dict, "accepted": int, "quarantined": int, "quarantine_by_reason": dict,
                "quarantine_by_source": dict, "labels": list, "superseded": dict, "samples": dict, "quarantine": list,
                "digest": str}

    @classmethod
    def of(cls, data: dict, uri: str = "", base: str | None = None) -> Manifest:
        """A manifest from its JSON fields; TypeError naming the first field that is missing or of the wrong type."""
        for k, t in cls.REQUIRED.items():
            if not isinstance(data.get(k), t) or isinstance(data.get(k), bool):
                raise TypeError(f"field '{k}' is {data.get(k)!r}, expected {t.__name__}")
        for k, t in cls.OPTIONAL.items():
            if k in data and not isinstance(data[k], t):
                raise TypeError(f"field '{k}' is {type(data[k]).__name__}, expected {t}")
        base = base if base is not None else (uri.rsplit("/manifests/", 1)[0] if uri else data["root"])
        return cls({**data, "_uri": uri, "_root": base})

    def to_json(self) -> dict:
        """The file's content, in the file's order (small fields first, the long lists last)."""
        return {k: self[k] for k in FILE_ORDER if k in self}

    uri = property(lambda self: self.get("_uri", ""), doc="this file's URI")
    base = property(lambda self: self.get("_root") or self["root"], doc="the folder its shards are found in")
    version = property(lambda self: int(self["version"]))
    root = property(lambda self: self["root"], doc="where the version was built")
    parent = property(lambda self: self.get("parent"))
    digest = property(lambda self: self.get("digest", ""), doc="names exactly this version's content")
    shards = property(lambda self: self["shards"])
    samples = property(lambda self: {k: Sample(*v) for k, v in self.get("samples", {}).items()},
                       doc="key -> Sample of every accepted face")
    counts = property(lambda self: self["counts"])
    counts_by_source = property(lambda self: self.get("counts_by_source", {}))
    accepted = property(lambda self: int(self.get("accepted", 0)))
    quarantined = property(lambda self: int(self.get("quarantined", 0)))
    quarantine = property(lambda self: self.get("quarantine", []))
    quarantine_by_source = property(lambda self: self.get("quarantine_by_source", {}))
    superseded = property(lambda self: self.get("superseded", {}))
    sources = property(lambda self: self.get("sources", []))
    labels = property(lambda self: self.get("labels", []))
    config = property(lambda self: self.get("config", {}))
    config_hash = property(lambda self: self.get("config_hash", ""))


FILE_ORDER = ("format", "version", "parent", "created", "root", "config", "config_hash", "sources", "counts",
              "counts_by_source", "accepted", "quarantined", "quarantine_by_reason", "quarantine_by_source", "labels",
              "shards", "superseded", "samples", "quarantine", "digest")


def load(uri: str) -> Manifest:
    """A manifest from its URI, or the latest version under a dataset root.  A local path is made absolute: the
    manifest's URI travels to Ray workers, whose working folder is not this one."""
    uri = str(uri) if storage.is_s3(uri) else str(Path(str(uri)).expanduser().resolve())
    if not uri.endswith(".json"):
        version = latest_version(uri)
        if not version:
            raise FileNotFoundError(f"no dataset version under {uri} (run `prouigan shard` first)")
        uri = manifest_uri(uri, version)
    if not storage.exists(uri):
        raise FileNotFoundError(f"dataset manifest not found: {uri}")
    try:
        data = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{uri} is not a dataset manifest: not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{uri} is not a {FORMAT} manifest (a manifest's 'format' is {FORMAT!r})")
    try:
        return Manifest.of(data, uri)
    except TypeError as e:  # a field missing or of the wrong shape
        raise UserError(f"{uri} is not a {FORMAT} manifest this version can read ({e})") from None


def save(root: str, manifest: Manifest) -> str:
    """Write a new version's manifest: the commit point.  Never replaces one (FileExistsError)."""
    uri = manifest_uri(root, manifest.version)
    storage.create_exclusive(uri, json.dumps(manifest.to_json(), indent=1, sort_keys=False).encode())
    return uri


def digest(manifest: Manifest) -> str:
    """A short hash that names exactly this dataset version's content (its shards' sha256s)."""
    h = hashlib.sha256()
    for s in sorted(manifest.shards, key=lambda s: s["name"]):
        h.update(f"{s['name']}:{s['sha256']}\n".encode())
    for shard, keys in sorted(manifest.superseded.items()):
        h.update(f"-{shard}:{','.join(sorted(keys))}\n".encode())
    return h.hexdigest()[:16]


def next_shard_index(root: str, manifest: Manifest | None) -> int:
    """One past every index in use: in the manifest *and* on storage (a crashed run may have left shards)."""
    names = [s["name"] for s in (manifest.shards if manifest else [])]
    names += [u.rsplit("/", 1)[-1] for u in storage.list_files(shards_dir(root), ".tar")]
    idx = [int(m.group(2)) for n in names if (m := _SHARD.match(n))]
    return max(idx, default=-1) + 1


def encode_tar(samples: list[tuple[str, bytes, bytes]]) -> bytes:
    """[(key, png, json)] -> one WebDataset tar in memory."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as w:
        for key, png, meta in samples:
            w.write({"__key__": key, "png": png, "json": meta})
    return buf.getvalue()


def iter_tar(stream) -> Iterator[dict]:
    """Samples ``{"__key__", "png", "json"}`` of a tar stream, grouped with webdataset's tar iterator.
    A sample is yielded only when complete; a broken stream raises (callers decide to skip)."""
    current: dict | None = None
    for member in wds.tariterators.tar_file_iterator(stream):
        key, ext = wds.tariterators.base_plus_ext(member["fname"])
        if key is None:
            continue
        if current is not None and current["__key__"] != key:
            if "png" in current and "json" in current:
                yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext.lower()] = member["data"]
    if current is not None and "png" in current and "json" in current:
        yield current


def read_shard(uri: str) -> Iterator[dict]:
    """Stream one shard (local or s3) sample by sample."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        yield from iter_tar(f)


def verify_shard(uri: str, sha256: str) -> bool:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest() == sha256


def shard_uris(manifest: Manifest, split: str, source: str | None = None) -> list[str]:
    """The shards of one split (of one source when given), in manifest order."""
    return [storage.join(shards_dir(manifest.base), s["name"]) for s in manifest.shards
            if s["split"] == split and (source is None or s.get("source") == source)]


def source_names(manifest: Manifest) -> list[str]:
    """The sources whose faces this version holds (by their shards), in the order they were added."""
    return list(dict.fromkeys(s["source"] for s in manifest.shards if s.get("source")))


def split_count(manifest: Manifest, split: str, source: str | None = None) -> int:
    if source is None:
        return int(manifest.counts.get(split, 0))
    by_source = manifest.counts_by_source
    if source not in by_source:
        raise ValueError(f"dataset {manifest.uri} has no source '{source}'; it has: "
                         f"{', '.join(by_source) or 'no per-source counts (built before sources were recorded)'}")
    return int(by_source[source].get(split, 0))


__all__ = ["FORMAT", "SPLITS", "Manifest", "digest", "encode_tar", "iter_tar", "latest_version", "load", "manifest_uri",
           "next_shard_index", "read_shard", "save", "shard_uris", "source_names", "split_count", "verify_shard"]
