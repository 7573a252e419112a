"""The training reader: streams a dataset version's shards and makes training examples on the fly.

Each Ray Train worker (rank r of w) and each of its DataLoader processes reads a disjoint part: whole shards
when there are enough of them, else a hash of the sample key picks the reader.  Train examples get a random
occlusion (from ``prouigan.occlusion``) and degradation every time they are read, through a shuffle buffer
(or, with ``data.occlusion.on_device``, come out clean for the training device to occlude a batch at a time);
val/test examples get the occlusion seeded by their key, identical on every run and machine.  Occlusions are
never baked into the shards.  A corrupt or truncated shard is skipped with a warning and counted.

A version may hold several sources.  ``source=`` reads one of them (a per-source val or test split);
``data.source_weights`` mixes them in training: each source is its own endless, shuffled stream, and every
example comes from a source drawn with those weights (0 leaves a source out).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from prouigan.align import reframe
from prouigan.degradation import degrade
from prouigan.occlusion import seed_from_key, synthesize
from prouigan_platform import storage
from prouigan_platform.config import DataConfig
from prouigan_platform.dataset import manifest as mf

log = logging.getLogger(__name__)


def _owner(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(f"reader:{key}".encode()).digest()[:4], "big") % n


def make_example(sample: dict, rng: np.random.Generator, data: DataConfig, augment: bool = True,
                 jitter: bool = False) -> dict:
    """A shard sample (png + json bytes) -> tensors: lr (3,16,16), hr (3,128,128), mask (1,128,128),
    landmarks (68,2) face pixels (zeros when the source had none), has_landmarks, key.  ``augment=False``: the
    clean face only (lr and mask zeros), for occlusion and degradation on the training device.  ``jitter``: the
    face through a misplaced alignment square drawn from ``data.align_jitter`` (training faces)."""
    img = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    meta = json.loads(sample["json"])
    lm = meta.get("landmarks68")
    lm_arr = np.asarray(lm, np.float32) if lm is not None else None
    misplaced = data.align_jitter.draw(rng) if jitter and data.align_jitter is not None else None
    if misplaced is not None:
        img, moved = reframe(img, lm_arr, *misplaced)
        lm_arr = None if moved is None else moved.astype(np.float32)
    hr = img.astype(np.float32) / 255.0
    mask = np.zeros(hr.shape[:2], np.float32)
    if not augment:
        lr = torch.zeros(3, hr.shape[0] // 8, hr.shape[1] // 8)
    else:
        occluded = hr
        if rng.random() < data.occlusion.probability:
            occ = synthesize(rng, lm_arr, data.occlusion.kinds, tuple(data.occlusion.coverage), size=hr.shape[0])
            occluded, mask = occ.apply(hr), occ.mask
        lr = degrade(torch.from_numpy(np.ascontiguousarray(occluded)).permute(2, 0, 1), rng,
                     data.degradation.noise_std, data.degradation.jpeg_quality)
    return {
        "lr": lr,
        "hr": torch.from_numpy(hr.copy()).permute(2, 0, 1),
        "mask": torch.from_numpy(mask.copy())[None],
        "landmarks": torch.from_numpy(lm_arr if lm_arr is not None else np.zeros((68, 2), np.float32)),
        "has_landmarks": torch.tensor(lm_arr is not None),
        "key": meta["key"],
        "source": meta.get("source") or "",
    }


def mix_weights(manifest: mf.Manifest, split: str, weights: dict[str, float]) -> dict[str, float]:
    """source -> probability of the training mix; {} = by size.  Every source of the split must be named."""
    names = [n for n in mf.source_names(manifest) if mf.shard_uris(manifest, split, n)]
    if not weights:
        return {}
    unknown = sorted(set(weights) - set(names))
    missing = [n for n in names if n not in weights]
    if unknown or missing:
        raise ValueError(f"data.source_weights must name each source of the dataset ({', '.join(names)})"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + (f"; missing: {', '.join(missing)}" if missing else ""))
    total = sum(weights[n] for n in names)
    if total <= 0:
        raise ValueError(f"data.source_weights gives no weight to any source of the '{split}' split")
    return {n: weights[n] / total for n in names if weights[n] > 0}


class FaceShards(torch.utils.data.IterableDataset):
    """Examples of one split of a dataset version, for reader ``rank`` of ``world_size``.

    ``epochs=None`` loops forever (training); val/test default to one pass in a fixed order.
    """

    def __init__(self, manifest: mf.Manifest | str, split: str, data: DataConfig, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epochs: int | None = 1, shuffle: bool | None = None, limit: int | None = None,
                 source: str | None = None):
        super().__init__()
        self.manifest = mf.load(manifest) if isinstance(manifest, str) else manifest
        if split not in mf.SPLITS:
            raise ValueError(f"unknown split '{split}'; known: {', '.join(mf.SPLITS)}")
        self.split, self.data, self.rank, self.world_size = split, data, rank, world_size
        self.seed, self.epochs, self.limit = seed, epochs, limit
        self.train = split == "train"
        self.shuffle = self.train if shuffle is None else shuffle
        if source is not None:
            mf.split_count(self.manifest, split, source)  # an unknown source is an error naming the known ones
        self.source = source
        self.shards = mf.shard_uris(self.manifest, split, source)
        self.sha256 = {s["name"]: s.get("sha256") for s in self.manifest.shards}
        # weighted mixing: endless training streams only (a finite pass reads every face once)
        self.mix = mix_weights(self.manifest, split, data.source_weights) if epochs is None and source is None \
            else {}
        self.stale = {(name, k) for name, keys in self.manifest.superseded.items() for k in keys}
        self.added_by = {s["name"]: s.get("version_added") for s in self.manifest.shards}
        self.stats = {"samples": 0, "bad_shards": 0, "bad_samples": 0}
        self._skipped: list[str] = []  # shards skipped since the last example (travel with the next one)

    def _reader_id(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def _shard_samples(self, uri: str) -> Iterator[dict]:
        """The shard's samples, once its bytes match the sha256 the manifest recorded (a shard is at most a few
        tens of MB: it is read whole, hashed, then parsed).  A mismatch or an unreadable shard is skipped with a
        warning and counted in ``stats["bad_shards"]``."""
        name = uri.rsplit("/", 1)[-1]
        try:
            data = storage.read_bytes(uri)
            expected = self.sha256.get(name)
            if expected and hashlib.sha256(data).hexdigest() != expected:
                raise ValueError(f"sha256 mismatch: the shard's bytes are not the ones the manifest recorded "
                                 f"({len(data)} bytes)")
            samples = list(mf.iter_tar(io.BytesIO(data)))
        except Exception as e:
            self.stats["bad_shards"] += 1
            self._skipped.append(name)
            added = self.added_by.get(name)
            msg = (f"skipping shard {uri}" + (f" (added by dataset version {added}; every later version shares it)"
                                              if added else "") + f": {type(e).__name__}: {e}")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
            return
        for s in samples:
            if (name, s["__key__"]) not in self.stale:
                s["__shard__"] = name
                yield s

    def _samples(self, epoch: int, reader: int, readers: int, shards: list[str]) -> Iterator[dict]:
        shards = list(shards)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(shards)
        if len(shards) >= readers:
            for uri in shards[reader::readers]:
                yield from self._shard_samples(uri)
        else:  # fewer shards than readers: everyone streams every shard and keeps its own keys
            for uri in shards:
                for s in self._shard_samples(uri):
                    if _owner(s["__key__"], readers) == reader:
                        yield s

    def _shuffled(self, it: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        size = self.data.shuffle_buffer
        if not self.shuffle or size <= 1:
            yield from it
            return
        buf: list[dict] = []
        for s in it:
            if len(buf) < size:
                buf.append(s)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _stream(self, shards: list[str], reader: int, readers: int, stream: int = 0) -> Iterator[dict]:
        """Shard samples of ``shards`` for this reader, epoch after epoch, through the shuffle buffer."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = np.random.default_rng([self.seed, epoch, reader, stream])
            n = 0
            for s in self._shuffled(self._samples(epoch, reader, readers, shards), rng):
                n += 1
                yield s
            epoch += 1
            if n == 0:
                return  # nothing readable for this reader: do not spin forever

    def _mixed(self, reader: int, readers: int) -> Iterator[dict]:
        names = list(self.mix)
        p = np.array([self.mix[n] for n in names])
        streams = {n: self._stream(mf.shard_uris(self.manifest, self.split, n), reader, readers, i)
                   for i, n in enumerate(names)}
        rng = np.random.default_rng([self.seed, reader, 7])
        while names:
            i = int(rng.choice(len(names), p=p / p.sum()))
            try:
                yield next(streams[names[i]])
            except StopIteration:  # a source with nothing for this reader drops out of the mix
                del names[i]
                p = np.delete(p, i)

    def _interleaved(self, reader: int, readers: int) -> Iterator[dict]:
        """One source after the other, sample by sample: a ``limit`` (training's validation) sees every source."""
        names = [n for n in mf.source_names(self.manifest) if mf.shard_uris(self.manifest, self.split, n)]
        streams = [self._stream(mf.shard_uris(self.manifest, self.split, n), reader, readers, i)
                   for i, n in enumerate(names)]
        while streams:
            for it in list(streams):
                try:
                    yield next(it)
                except StopIteration:
                    streams.remove(it)

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self._reader_id()
        rng = np.random.default_rng([self.seed, reader, 11])  # training occlusions
        n = 0
        several = self.source is None and len(mf.source_names(self.manifest)) > 1
        samples = self._mixed(reader, readers) if self.mix else \
            self._interleaved(reader, readers) if several and self.epochs is not None else \
            self._stream(self.shards, reader, readers)
        for s in samples:
            ex_rng = rng if self.train else np.random.default_rng(seed_from_key(s["__key__"]))
            try:
                ex = make_example(s, ex_rng, self.data, augment=not (self.train and self.data.occlusion.on_device),
                                  jitter=self.train and self.epochs is None)
            except Exception as e:
                self.stats["bad_samples"] += 1
                warnings.warn(f"skipping sample {s.get('__key__')}: {type(e).__name__}: {e}", RuntimeWarning,
                              stacklevel=2)
                continue
            self.stats["samples"] += 1
            # which shard each example came from, and which were skipped on the way: the trainer records what it read
            ex["shard"], ex["skipped"] = s.get("__shard__", ""), ",".join(self._skipped)
            self._skipped.clear()
            yield ex
            n += 1
            if self.limit is not None and n >= self.limit:
                return
