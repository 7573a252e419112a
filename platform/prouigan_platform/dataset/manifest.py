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


def load(uri: str) -> dict:
    """A manifest from its URI, or the latest version under a dataset root."""
    uri = str(uri)
    if not uri.endswith(".json"):
        version = latest_version(uri)
        if not version:
            raise FileNotFoundError(f"no dataset version under {uri} (run `prouigan shard` first)")
        uri = manifest_uri(uri, version)
    if not storage.exists(uri):
        raise FileNotFoundError(f"dataset manifest not found: {uri}")
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{uri} is not a dataset manifest: not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{uri} is not a {FORMAT} manifest (a manifest's 'format' is {FORMAT!r})")
    manifest["_uri"] = uri
    manifest["_root"] = uri.rsplit("/manifests/", 1)[0]  # shards are found beside the manifest, wherever it moved
    return manifest


def save(root: str, manifest: dict) -> str:
    """Write a new version's manifest: the commit point.  Never replaces one (FileExistsError)."""
    uri = manifest_uri(root, manifest["version"])
    data = {k: v for k, v in manifest.items() if not k.startswith("_")}
    storage.create_exclusive(uri, json.dumps(data, indent=1, sort_keys=False).encode())
    return uri


def digest(manifest: dict) -> str:
    """A short hash that names exactly this dataset version's content (its shards' sha256s)."""
    h = hashlib.sha256()
    for s in sorted(manifest["shards"], key=lambda s: s["name"]):
        h.update(f"{s['name']}:{s['sha256']}\n".encode())
    for shard, keys in sorted(manifest.get("superseded", {}).items()):
        h.update(f"-{shard}:{','.join(sorted(keys))}\n".encode())
    return h.hexdigest()[:16]


def next_shard_index(root: str, manifest: dict | None) -> int:
    """One past every index in use: in the manifest *and* on storage (a crashed run may have left shards)."""
    names = [s["name"] for s in (manifest or {}).get("shards", [])]
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


def shard_uris(manifest: dict, split: str, source: str | None = None) -> list[str]:
    """The shards of one split (of one source when given), in manifest order."""
    root = manifest.get("_root", manifest["root"])
    return [storage.join(shards_dir(root), s["name"]) for s in manifest["shards"]
            if s["split"] == split and (source is None or s.get("source") == source)]


def source_names(manifest: dict) -> list[str]:
    """The sources whose faces this version holds (by their shards), in the order they were added."""
    return list(dict.fromkeys(s["source"] for s in manifest["shards"] if s.get("source")))


def split_count(manifest: dict, split: str, source: str | None = None) -> int:
    if source is None:
        return int(manifest["counts"].get(split, 0))
    by_source = manifest.get("counts_by_source", {})
    if source not in by_source:
        raise ValueError(f"dataset {manifest.get('_uri', '')} has no source '{source}'; it has: "
                         f"{', '.join(by_source) or 'no per-source counts (built before sources were recorded)'}")
    return int(by_source[source].get(split, 0))


__all__ = ["FORMAT", "SPLITS", "digest", "encode_tar", "iter_tar", "latest_version", "load", "manifest_uri",
           "next_shard_index", "read_shard", "save", "shard_uris", "source_names", "split_count", "verify_shard"]
