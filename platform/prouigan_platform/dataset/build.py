"""Building a dataset version: which inputs are new, ingest them (Ray Data, or a plain loop for comparison),
write shards under temporary names, move them into place, write the manifest last.

``commands/shard.py`` is the command around it; ``benchmarks/data.py`` times both engines on the same work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from prouigan_platform import storage
from prouigan_platform.config import DataConfig
from prouigan_platform.dataset import labels
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.ingest import process_record, quarantine_row
from prouigan_platform.dataset.labeler import LABELLER
from prouigan_platform.dataset.sources import source_name
from prouigan_platform.locks import LockLost, dataset_lock
from prouigan_platform.progress import Progress

# quarantine reasons that say more about the machine than the input: such inputs are tried again next run
RETRY_REASONS = {"unreadable_file"}


def data_settings(data_cfg: DataConfig) -> dict:
    """The data-config fields that change shard content; their hash guards incremental versions."""
    return {"image_size": data_cfg.image_size, "min_native_px": data_cfg.min_native_px,
            "val_fraction": data_cfg.val_fraction, "test_fraction": data_cfg.test_fraction, "align": "ffhq",
            "png": "rgb8"}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def dedupe(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """First listing of a key wins; later ones are quarantined as duplicate_key (input id ``key#dup:origin``)."""
    seen: dict[str, dict] = {}
    keep, dups = [], []
    for r in records:
        first = seen.setdefault(r["key"], r)
        if first is r:
            keep.append(r)
            continue
        row = quarantine_row(r, "duplicate_key", f"key '{r['key']}' is already used by "
                                                 f"{first.get('image') or first['key']} (source {first['source']})")
        row["input"] = f"{r['key']}#dup:{r.get('image')}"
        dups.append(row)
    return keep, dups


def tmp_dir(root: str, run: str = "") -> str:
    """ROOT/shards/_tmp/[RUN]: where a build writes its shards before they become part of a version; each run
    (named by its lock's token) has its own folder."""
    return storage.join(mf.shards_dir(root), "_tmp", *([run] if run else []))


def write_tmp_shard(root: str, source: str, split: str, rows: list[dict], run: str = "") -> dict:
    """Accepted rows of one source and split -> a tar in this run's temporary folder (sorted by key) -> its
    metadata."""
    rows = sorted(rows, key=lambda r: r["key"])
    data = mf.encode_tar([(r["key"], r["png"], r["meta"]) for r in rows])
    sha = hashlib.sha256(data).hexdigest()
    tmp = storage.join(tmp_dir(root, run), f"{split}-{sha[:24]}.tar")
    storage.write_bytes_atomic(tmp, data)
    samples = {r["key"]: mf.Sample(str(r["fingerprint"]), split, "", str(r["input"])) for r in rows}
    return {"tmp": tmp, "source": source, "split": split, "first_key": rows[0]["key"], "count": len(rows),
            "sha256": sha, "bytes": len(data), "samples": json.dumps(samples)}


def block_size(shard_max: int, val_fraction: float, test_fraction: float) -> int:
    """Inputs per work block: enough that the block's train faces fill about one shard."""
    return max(1, math.ceil(shard_max / max(1e-6, 1.0 - val_fraction - test_fraction)))


def _write_rows(rows: list[dict], root: str, inputs: int, run: str = "") -> list[dict]:
    """Processed rows of one block -> one tar per source and split of the accepted ones (temporary names), one
    label part for what dlib saw, the quarantined rows, and the block's counts.
    -> [{"type": "shard" | "labels" | "quarantine" | "block", ...}]"""
    out: list[dict] = [{"type": "quarantine", **{k: v for k, v in r.items() if k not in ("png", "meta", "labels")}}
                       for r in rows if r["status"] != "ok"]
    ok = [r for r in rows if r["status"] == "ok"]
    for source, split in sorted({(r["source"], r["split"]) for r in ok}):
        part = [r for r in ok if (r["source"], r["split"]) == (source, split)]
        out.append({"type": "shard", **write_tmp_shard(root, source, split, part, run)})
    fresh = [{"input": r["input"], "fingerprint": str(r["fingerprint"]), "labeller": LABELLER, "faces": r["labels"]}
             for r in rows if r["labels"]]
    if fresh:
        out.append({"type": "labels", "part": labels.write_part(root, fresh), "count": len(fresh)})
    out.append({"type": "block", "inputs": inputs, "faces": len(ok), "quarantined": len(rows) - len(ok),
                "labelled": len(fresh)})
    return out


@dataclass(frozen=True)
class IngestSettings:
    """What every block of a build needs to know (it travels to the Ray Data tasks)."""

    min_native_px: int
    fractions: dict[str, tuple[float, float]]  # source -> (val, test) fractions
    default_fractions: tuple[float, float]  # a source not named above
    run: str = ""  # the build's lock token: its temporary shards' folder

    @classmethod
    def of(cls, data_cfg: DataConfig, sources: list[dict], run: str = "") -> IngestSettings:
        return cls(data_cfg.min_native_px, {s["name"]: (s["val_fraction"], s["test_fraction"]) for s in sources},
                   (data_cfg.val_fraction, data_cfg.test_fraction), run)


def ingest_block(records: list[dict], root: str, settings: IngestSettings) -> list[dict]:
    """Process one block of inputs and write its accepted faces (the plain engine's unit of work)."""
    rows = []
    for rec in records:
        val, test = settings.fractions.get(rec["source"], settings.default_fractions)
        rows += process_record(rec, min_native_px=settings.min_native_px, val_fraction=val, test_fraction=test)
    return _write_rows(rows, root, len(records), settings.run)


def _ingest_batch(batch, root: str, settings: IngestSettings):
    """Ray Data UDF: a pyarrow batch of records -> one JSON line per shard written / input quarantined.
    Pixels go from the worker straight to storage; only metadata returns through the object store."""
    return pa.table({"result": [json.dumps(r) for r in ingest_block(batch.to_pylist(), root, settings)]})


class _Tally:
    """Results of the blocks as they finish, with a progress line every few seconds."""

    def __init__(self, total: int, progress_every: float | None):
        self.results: list[dict] = []
        self.counts = Counter()
        self.progress = Progress("shard", total, "inputs", every=progress_every) if progress_every else None

    def add(self, result: dict) -> None:
        if result["type"] != "block":
            self.results.append(result)
            return
        self.counts.update({k: result[k] for k in ("faces", "quarantined", "labelled")})
        if self.progress:
            c = self.counts
            rate = c["faces"] / max(self.progress.clock() - self.progress.start, 1e-9)
            self.progress.update(result["inputs"], f"{c['faces']:,} faces ({rate:.1f} faces/s), "
                                                   f"{c['quarantined']:,} quarantined, {c['labelled']:,} labelled")


def _blocks(records: list[dict], settings: IngestSettings, shard_max: int, slots: int) -> int:
    size = block_size(shard_max, *settings.default_fractions)
    # at least four blocks per CPU slot: every core works, and the last blocks are short, so no core idles long
    # at the end (measured on 2,000 CelebA photos: 1.68x over the plain loop with two blocks per slot, see
    # BENCHMARKS.md for four)
    return max(1, math.ceil(len(records) / max(1, min(size, math.ceil(len(records) / max(1, 4 * slots))))))


def ingest_ray(records: list[dict], settings: IngestSettings, root: str, shard_max: int, tally: _Tally) -> None:
    """Ray Data: blocks of inputs, each processed and written to its shards by one task, in parallel; results
    stream back as blocks finish.  (Measured: fusing the two steps beats a streaming process -> regroup -> write
    plan ~1.5x on 2 cores, because the PNGs never travel through the object store.)"""
    import ray  # the Ray Data engine only: the plain engine (the benchmark's baseline) runs without Ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line says inputs, faces/s and ETA
    # the cluster's CPUs, not the ones free right now: the block layout decides the shards' bytes, so the same
    # inputs on the same cluster must make the same shards whatever else happens to be running
    slots = int(ray.cluster_resources().get("CPU", 2))
    ds = (ray.data.from_items(records, override_num_blocks=_blocks(records, settings, shard_max, slots))
          .map_batches(_ingest_batch, batch_size=None, batch_format="pyarrow",
                       fn_kwargs={"root": root, "settings": settings}))
    for row in ds.iter_rows():
        tally.add(json.loads(row["result"]))


def ingest_plain(records: list[dict], settings: IngestSettings, root: str, shard_max: int, tally: _Tally) -> None:
    """The same work in one process, block after block (the benchmark's baseline)."""
    n = _blocks(records, settings, shard_max, 1)
    size = math.ceil(len(records) / n)
    for i in range(0, len(records), size):
        for r in ingest_block(records[i:i + size], root, settings):
            tally.add(r)


@dataclass
class BuildResult:
    manifest: mf.Manifest | None  # the new version (None when nothing was new)
    parent: mf.Manifest | None
    processed: int = 0  # inputs ingested this run
    duplicates: int = 0
    quarantined: list[dict] = field(default_factory=list)  # rows quarantined this run
    new_shards: list[dict] = field(default_factory=list)
    labelled: int = 0  # inputs dlib labelled in this run
    labels_reused: int = 0  # inputs whose labels an earlier run had made
    seconds: float = 0.0

    def summary(self) -> str:
        """What this run did and what the new version holds, per source and split (printed by `prouigan shard`)."""
        m = self.manifest
        accepted = sum(int(s["count"]) for s in self.new_shards)
        reasons = Counter(q["reason"] for q in self.quarantined)
        nbytes = sum(int(s["bytes"]) for s in self.new_shards)
        lines = ["", "=" * 72, f"dataset version v{m.version:04d}  ->  {m.uri}",
                 f"  inputs processed  {self.processed:>7}   (+{self.duplicates} listed twice under one key)"]
        if self.labelled or self.labels_reused:
            lines.append(f"  labelled by dlib  {self.labelled:>7}   (+{self.labels_reused} labels reused from an "
                         "earlier run)")
        lines.append(f"  faces accepted    {accepted:>7}   in {len(self.new_shards)} new shard(s), "
                     f"{nbytes / 2**20:.1f} MiB")
        lines.append(f"  quarantined       {sum(reasons.values()):>7}")
        lines += [f"      {reason:<24}{n:>6}" for reason, n in reasons.most_common()]
        lines += ["  the version, by source:",
                  f"      {'source':<16}{'train':>8}{'val':>8}{'test':>8}{'quarantined':>13}"]
        for name, counts in m.counts_by_source.items():
            q = sum(m.quarantine_by_source.get(name, {}).values())
            lines.append(f"      {name:<16}" + "".join(f"{counts.get(sp, 0):>8}" for sp in mf.SPLITS) + f"{q:>13}")
        lines.append(f"      {'all':<16}" + "".join(f"{m.counts.get(sp, 0):>8}" for sp in mf.SPLITS)
                     + f"{m.quarantined:>13}")
        lines.append(f"  digest {m.digest}")
        if self.parent:
            lines.append(f"  reused from v{self.parent.version:04d}: {len(self.parent.shards)} shard(s)")
        lines += [f"  time {self.seconds:.1f} s, {self.processed / max(self.seconds, 1e-9):.1f} inputs/s", "=" * 72]
        return "\n".join(lines)


class SettingsChanged(RuntimeError):
    pass


def sources_meta(data_cfg: DataConfig) -> list[dict]:
    """What the manifest records of each source; a source's split fractions may never change under one root."""
    return [{"name": source_name(s), "kind": s.kind, "path": s.path,
             "val_fraction": data_cfg.val_fraction if s.val_fraction is None else s.val_fraction,
             "test_fraction": data_cfg.test_fraction if s.test_fraction is None else s.test_fraction}
            for s in data_cfg.sources]


def _check_sources(root: str, parent: mf.Manifest | None, sources: list[dict]) -> list[dict]:
    """The parent's sources updated with these; raises SettingsChanged when a known source's splits would move."""
    merged = {s["name"]: s for s in (parent.sources if parent else [])}
    for s in sources:
        old = merged.get(s["name"])
        for k in ("val_fraction", "test_fraction"):
            if old is not None and old.get(k) is not None and old[k] != s[k]:
                raise SettingsChanged(f"{root}: source '{s['name']}' was split with {k}={old[k]}, this config says "
                                      f"{s[k]} (faces would change split); write to a new data.output")
        merged[s["name"]] = s
    return list(merged.values())


def build_version(records: list[dict], data_cfg: DataConfig, root: str, engine: str = "ray",
                  progress_every: float | None = None, wait_s: float = 0.0) -> BuildResult:
    """Ingest what is new or changed in ``records`` into a new dataset version under ``root``.
    One build per root at a time: another one holding ``ROOT/locks/shard.lock`` makes this wait up to ``wait_s``,
    then raise ``LockHeld`` naming the holder.
    ``progress_every``: print a progress line (inputs done / total, inputs/s, ETA) at most this often."""
    root = root.rstrip("/")
    with dataset_lock(root, wait_s) as lock:
        try:
            return _build(records, data_cfg, root, engine, progress_every, lock)
        except BaseException:  # a full disk, a stop, a lost lock: this run's temporary shards never stay behind
            fs, path = storage.filesystem(tmp_dir(root, lock.token))
            with contextlib.suppress(Exception):
                fs.delete_dir(path)
            raise


def _build(records: list[dict], data_cfg: DataConfig, root: str, engine: str, progress_every: float | None,
           lock=None) -> BuildResult:
    t0 = time.time()
    settings = data_settings(data_cfg)
    parent = mf.load(root) if mf.latest_version(root) else None
    if parent is not None and parent.config_hash != settings_hash(settings):
        raise SettingsChanged(f"{root} holds versions built with other data settings ({parent.config} != "
                              f"{settings}); write to a new data.output")
    meta = _check_sources(root, parent, sources_meta(data_cfg))
    # what the latest version holds, by input id -> fingerprint (accepted and quarantined alike)
    known = {s.input: s.fingerprint for s in (parent.samples if parent else {}).values()}
    known.update({q["input"]: q["fingerprint"] for q in (parent.quarantine if parent else [])
                  if q["reason"] not in RETRY_REASONS})
    records, duplicates = dedupe(records)
    todo = [r for r in records if known.get(r["key"]) != r["fingerprint"]]
    new_dups = [d for d in duplicates if known.get(d["input"]) != d["fingerprint"]]
    result = BuildResult(None, parent, len(todo), len(duplicates))
    if not todo and not new_dups:
        result.seconds = time.time() - t0
        return result
    # labels an earlier run made (committed or not) travel with their records: dlib never sees them again
    label_parts = set(parent.labels if parent else [])
    if any(r.get("label") for r in todo):
        cached, part_of = labels.load(root, LABELLER)
        for r in todo:
            hit = cached.get((r["key"], str(r["fingerprint"]))) if r.get("label") else None
            if hit is not None:
                r["labels"] = hit
                label_parts.add(part_of[(r["key"], str(r["fingerprint"]))])
                result.labels_reused += 1
    # a crashed run, or one whose lease ran out, may have left temporary shards: never part of any version (a run
    # that lost the lock cannot commit them: the commit is fenced)
    fs, path = storage.filesystem(tmp_dir(root))
    fs.delete_dir_contents(path, missing_dir_ok=True)
    settings_of_run = IngestSettings.of(data_cfg, meta, lock.token if lock is not None else "")
    tally = _Tally(len(todo), progress_every)
    if todo:
        (ingest_ray if engine == "ray" else ingest_plain)(todo, settings_of_run, root, data_cfg.shard_max_samples,
                                                          tally)
    quarantined = [{k: v for k, v in r.items() if k != "type"} for r in tally.results if r["type"] == "quarantine"]
    shard_meta = [{k: v for k, v in r.items() if k != "type"} for r in tally.results if r["type"] == "shard"]
    label_parts |= {r["part"] for r in tally.results if r["type"] == "labels"}
    result.labelled = int(tally.counts["labelled"])
    quarantined += new_dups
    result.manifest = commit_version(root, parent, settings, meta, todo, quarantined, shard_meta,
                                     sorted(label_parts), lock)
    if settings_of_run.run and storage.exists(tmp_dir(root, settings_of_run.run)):  # this run's folder, now empty
        fs.delete_dir(storage.filesystem(tmp_dir(root, settings_of_run.run))[1])
    result.quarantined, result.new_shards = quarantined, shard_meta
    result.seconds = time.time() - t0
    return result


def commit_version(root: str, parent: mf.Manifest | None, settings: dict, sources: list[dict], todo: list[dict],
                   quarantined: list[dict], shard_meta: list[dict], label_parts: list[str],
                   lock=None) -> mf.Manifest:
    """Move the new shards into place under stable names, then write the manifest (the commit point).  With the
    build's ``lock``: fenced, nothing moves unless the lock is still this run's."""
    if lock is not None:
        lock.check()
    version = (parent.version if parent else 0) + 1
    next_idx = mf.next_shard_index(root, parent)
    shards = list(parent.shards if parent else [])
    samples = dict(parent.samples) if parent else {}
    superseded = {k: list(v) for k, v in (parent.superseded if parent else {}).items()}
    changed = {r["key"] for r in todo}
    # samples of changed inputs leave the version (re-accepted ones come back below, in new shards)
    for key, s in list(samples.items()):
        if s.input in changed:
            superseded.setdefault(s.shard, []).append(key)
            del samples[key]
    for meta in sorted(shard_meta, key=lambda m: (mf.SPLITS.index(m["split"]), m["source"], m["first_key"])):
        name = f"{meta['split']}-{next_idx:06d}.tar"
        next_idx += 1
        storage.move_exclusive(meta["tmp"], storage.join(mf.shards_dir(root), name))
        for key, s in json.loads(meta["samples"]).items():
            samples[key] = mf.Sample(*s)._replace(shard=name)
        shards.append({"name": name, "source": meta["source"], "split": meta["split"], "count": int(meta["count"]),
                       "sha256": meta["sha256"], "bytes": int(meta["bytes"]), "version_added": version})
    new_inputs = {r["input"] for r in quarantined} | changed
    quarantine = [q for q in (parent.quarantine if parent else []) if q["input"] not in new_inputs]
    quarantine += [{"key": r["key"], "input": r["input"], "source": r["source"], "origin": r["origin"],
                    "reason": r["reason"], "detail": r["note"], "fingerprint": r["fingerprint"]} for r in quarantined]
    counts = {sp: 0 for sp in mf.SPLITS}
    counts.update(Counter(s.split for s in samples.values()))
    shard_source = {s["name"]: s.get("source") for s in shards}
    by_source: dict[str, dict[str, int]] = {}
    for s in samples.values():
        row = by_source.setdefault(shard_source.get(s.shard) or "?", {sp: 0 for sp in mf.SPLITS})
        row[s.split] += 1
    q_by_source: dict[str, dict[str, int]] = {}
    for q in quarantine:
        row = q_by_source.setdefault(q["source"], {})
        row[q["reason"]] = row.get(q["reason"], 0) + 1
    manifest = mf.Manifest.of({
        "format": mf.FORMAT, "version": version, "parent": parent.version if parent else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "root": root,
        "config": settings, "config_hash": settings_hash(settings), "sources": sources,
        "counts": counts, "counts_by_source": by_source, "accepted": len(samples), "quarantined": len(quarantine),
        "quarantine_by_reason": dict(Counter(q["reason"] for q in quarantine)),
        "quarantine_by_source": q_by_source, "labels": label_parts,
        "shards": shards, "superseded": superseded, "samples": samples, "quarantine": quarantine,
    }, base=root)
    manifest["digest"] = mf.digest(manifest)
    if lock is not None:
        lock.check()
    try:
        manifest["_uri"] = mf.save(root, manifest)
    except FileExistsError:
        raise LockLost(f"dataset version {version} of {root} was written by another run while this one worked; "
                       "nothing of this run was committed. Run it again") from None
    return manifest
