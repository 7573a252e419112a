"""Evaluate generators on a split of a dataset version, against bicubic, on the same occluded inputs.

Every face gets the occlusion seeded by its key (as validation in training does), is degraded to 16x16 and
restored by bicubic upsampling and by each model.  Scores against the 128x128 original, per face, then
averaged:
  fidelity     psnr, ssim, psnr_occluded (pixels under the synthetic occluder only)
  alignment    nme: dlib's 68-point predictor on the restored face, in the box dlib's detector finds on the
               original (the same box for every method), vs the dataset's ground truth, normalised by the
               outer-eye-corner distance; prior_nme: the model's own last-stage prior (soft-argmax)
  recognition  identity_distance: distance of dlib's 128-d embeddings of restored and original face;
               match_rate: the share under dlib's same-person threshold 0.6
  parsing      parse_f1 (and parse_f1_<class>): the platform's face parser (``prouigan judges``) on the restored
               face against its parse of the original, per face class, averaged over the classes present
  expression   expression_accuracy (and _smiling, _mouth_open): the platform's expression classifier on the
               restored face against CelebA's labels (faces with labels only)
  regions      region_psnr_{eyes,brows,nose,mouth,skin}: PSNR inside regions drawn from the ground-truth
               68 points (``prouigan.regions``)
A third row, ``original``, scores the originals themselves where that means something (dlib NME, expression
accuracy): the ceiling of those columns.  The dlib metrics need the ``eval`` extra and the judges a stored parser
and classifier; what is missing is skipped, and the reason recorded.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from prouigan.degradation import upsample_bicubic
from prouigan.landmarks import nme as nme_fn
from prouigan.landmarks import soft_argmax
from prouigan.metrics import face_scores, masked_psnr
from prouigan.pictures import comparison_grid, to_u8
from prouigan.regions import REGIONS, region_masks
from prouigan.vocabulary import METRICS
from prouigan_platform.config import DataConfig
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.labeler import DlibMissing, describe, face_box
from prouigan_platform.dataset.reader import FaceShards
from prouigan_platform.progress import Progress

MATCH_THRESHOLD = 0.6  # dlib's documented same-person distance
# metric -> which way is better
DLIB_METRICS = ("nme", "identity_distance", "match_rate")
BICUBIC = "bicubic"
ORIGINAL = "original"  # the originals scored as a method: the ceiling of NME and expression accuracy


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


def release_freed_memory() -> None:
    """Give the heap memory freed by the last batch back to the OS (glibc's ``malloc_trim``; nothing elsewhere).
    Each batch frees tens of MB of tensors of many sizes, which glibc keeps in its arenas: without this the process
    grows with the split though nothing is kept (2,800 faces: 2.36 GiB without, 1.40 GiB with; BENCHMARKS.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class SplitInfo:
    """What an evaluation read: the split, how many faces it holds and how many were scored."""

    manifest_uri: str
    digest: str
    split: str
    source: str | None
    expected: int
    keys: list[str] = field(default_factory=list)
    bad_shards: int = 0

    @property
    def complete(self) -> bool:
        return len(self.keys) == self.expected and self.bad_shards == 0


@dataclass(kw_only=True)
class SplitData(SplitInfo):
    """A split held in memory (a few hundred faces: the demo's picture, tests).  ``evaluate`` streams instead."""

    lr: torch.Tensor  # (N, 3, 16, 16)
    hr: torch.Tensor  # (N, 3, 128, 128)
    mask: torch.Tensor  # (N, 1, 128, 128) occluded pixels
    landmarks: torch.Tensor  # (N, 68, 2)
    has_landmarks: torch.Tensor  # (N,) bool


def _split_reader(manifest_uri: str, split: str, data: DataConfig, limit: int | None, source: str | None):
    """(manifest, faces expected, FaceShards) of a split; an empty split is an error naming the counts."""
    m = mf.load(manifest_uri)
    expected = mf.split_count(m, split, source)
    if expected == 0:
        raise ValueError(f"dataset {manifest_uri} has no '{split}' faces"
                         + (f" of source '{source}'" if source else "") + f" (counts: {m['counts']})")
    return m, expected, FaceShards(m, split, data, limit=limit, source=source)


def load_split(manifest_uri: str, split: str, data: DataConfig, limit: int | None = None,
               source: str | None = None) -> SplitData:
    """Every face of ``split`` in memory (of one ``source`` when given; or the first ``limit``).  For small sets:
    ``evaluate`` streams any split in bounded memory."""
    m, expected, ds = _split_reader(manifest_uri, split, data, limit, source)
    batches = list(DataLoader(ds, batch_size=64))
    if not batches:
        raise ValueError(f"no '{split}' face of {manifest_uri} could be read ({ds.stats})")
    cat = lambda k: torch.cat([b[k] for b in batches])  # noqa: E731
    keys = [k for b in batches for k in b["key"]]
    return SplitData(manifest_uri=manifest_uri, digest=m.digest, split=split, source=source, expected=expected,
                     keys=keys, bad_shards=ds.stats["bad_shards"], lr=cat("lr"), hr=cat("hr"), mask=cat("mask"),
                     landmarks=cat("landmarks").double(), has_landmarks=cat("has_landmarks"))


def dlib_scores(batch: dict, outputs: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """method -> {nme, identity_distance} per face of a batch: dlib's 68 points and identity embedding of each
    output, in the box dlib finds on the original (the same box for every method), against the ground truth and
    the original's embedding."""
    hr, gt, has = to_u8(batch["hr"]), batch["landmarks"].double(), batch["has_landmarks"]
    n = len(hr)
    boxes, refs = [], []
    for i, img in enumerate(hr):
        box = face_box(img, gt[i].numpy() if has[i] else None)
        boxes.append(box)
        refs.append(describe(img, box)[1] if box else None)
    out = {}
    for name, images in outputs.items():
        nme, dist = np.full(n, np.nan), np.full(n, np.nan)
        for i, img in enumerate(to_u8(images)):
            if boxes[i] is not None:
                pts, emb = describe(img, boxes[i])
                if has[i]:
                    nme[i] = float(nme_fn(torch.from_numpy(pts)[None], gt[i][None])[0])
                dist[i] = float(np.linalg.norm(emb - refs[i]))
        out[name] = {"nme": nme, "identity_distance": dist}
    return out


def region_psnr(out: torch.Tensor, hr: torch.Tensor, landmarks: torch.Tensor,
                has_landmarks: torch.Tensor) -> dict[str, np.ndarray]:
    n = len(out)
    res = {f"region_psnr_{r}": np.full(n, np.nan) for r in REGIONS}
    for i in range(n):
        if not has_landmarks[i]:
            continue
        for r, m in region_masks(landmarks[i].numpy(), out.shape[-1]).items():
            if m.any():
                mt = torch.from_numpy(m)[None, None]
                res[f"region_psnr_{r}"][i] = float(masked_psnr(out[i:i + 1], hr[i:i + 1], mt)[0])
    return res


@dataclass
class Method:
    name: str
    per_face: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def coverage(self) -> dict[str, int]:
        """metric -> how many faces it was measured on (match_rate: the faces with an identity distance)."""
        out = {k: int(np.isfinite(v).sum()) for k, v in self.per_face.items() if np.isfinite(v).any()}
        if "identity_distance" in out:
            out["match_rate"] = out["identity_distance"]
        return out


class Cases:
    """The ``k`` best and ``k`` worst faces by one method's PSNR, with their images, kept while streaming: the
    report's picture needs those faces only, whatever the split's size."""

    def __init__(self, k: int):
        self.k = k
        self.best: list[tuple[float, int, dict]] = []  # min-heap by PSNR: the k highest
        self.worst: list[tuple[float, int, dict]] = []  # min-heap by -PSNR: the k lowest
        self.seen = 0

    def offer(self, psnrs: np.ndarray, rows: dict[str, torch.Tensor], keys: list[str]) -> None:
        for i, p in enumerate(psnrs):
            if not math.isfinite(p):
                continue
            row = {"key": keys[i], **{k: v[i:i + 1].clone() for k, v in rows.items()}}
            self.seen += 1
            for heap, score in ((self.best, p), (self.worst, -p)):
                item = (float(score), self.seen, row)
                if len(heap) < self.k:
                    heapq.heappush(heap, item)
                elif score > heap[0][0]:
                    heapq.heapreplace(heap, item)

    def rows(self) -> list[tuple[str, dict, float]]:
        """(best|worst, row, PSNR), best first then worst first; a face is listed once."""
        best = sorted(self.best, key=lambda t: -t[0])
        worst = [t for t in sorted(self.worst, key=lambda t: -t[0]) if t[1] not in {b[1] for b in best}]
        k = min(self.k, max(1, (len(best) + len(worst)) // 2))
        return [("best", r, s) for s, _, r in best[:k]] + [("worst", r, -s) for s, _, r in worst[:k]]


@dataclass
class Evaluation:
    data: SplitInfo
    methods: dict[str, Method]
    skipped: dict[str, str]  # metric -> why it was not measured
    cases: Cases | None = None
    stages: int = 0  # of the case model
    judges: dict = field(default_factory=dict)  # which parser and expression classifier judged (judging.Panel)

    def problems(self, metrics: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Why this evaluation is partial (empty when it is complete for ``metrics``)."""
        d = self.data
        out = []
        if len(d.keys) != d.expected:
            out.append(f"{len(d.keys)} of {d.expected} {d.split} faces were evaluated")
        if d.bad_shards:
            out.append(f"{d.bad_shards} shard(s) of the {d.split} split could not be read")
        for name, m in self.methods.items():
            if name == ORIGINAL:
                continue
            for k in metrics:
                v = m.summary.get(k)
                if v is None or not math.isfinite(v):
                    out.append(f"{name}: {k} not measured ({self.skipped.get(k, 'no finite value')})")
        return out

    def to_json(self) -> dict:
        d = self.data
        return {"dataset": d.manifest_uri, "digest": d.digest, "split": d.split, "source": d.source,
                "faces": len(d.keys),
                "expected_faces": d.expected, "bad_shards": d.bad_shards,
                "complete": not self.problems(), "skipped": self.skipped, "directions": METRICS,
                "methods": {k: m.summary for k, m in self.methods.items()},
                "coverage": {k: m.coverage for k, m in self.methods.items()}, "judges": self.judges}


def evaluate(models: dict, manifest_uri: str, split: str, data: DataConfig, source: str | None = None,
             limit: int | None = None, use_dlib: bool = True, heatmap_sigma: float = 1.5, batch_size: int = 64,
             case_model: str | None = "model", cases: int = 4, progress_every: float | None = 15.0,
             judges=None, log=print) -> Evaluation:
    """Score ``models`` (name -> ``prouigan.inference.Hallucinator``) and bicubic on a split, streaming it a batch at
    a time: memory holds one batch, the per-face scores (a few numbers a face) and the report's case faces,
    whatever the split's size.  Bicubic is always the first method.  ``judges``: a ``judging.Panel`` (parsing and
    expression), or None."""
    m, expected, ds = _split_reader(manifest_uri, split, data, limit, source)
    info = SplitInfo(manifest_uri, m.digest, split, source, expected)
    skipped: dict[str, str] = {}
    if not use_dlib:
        skipped.update({k: "dlib metrics turned off" for k in DLIB_METRICS})
    if judges is not None:
        skipped.update(judges.skipped)
    keep = Cases(cases) if case_model in models else None
    run = _BatchScorer(models, keep, case_model, batch_size, heatmap_sigma, use_dlib, skipped, judges)
    bar = Progress("evaluate", min(expected, limit or expected), "faces", every=progress_every) \
        if progress_every else None
    with torch.inference_mode():
        for batch in DataLoader(ds, batch_size=batch_size):
            n = len(batch["key"])
            info.keys.extend(batch["key"])
            run(batch)
            del batch  # before the trim: this batch's tensors are the memory to give back
            release_freed_memory()
            if bar:
                bar.update(n)
    info.bad_shards = ds.stats["bad_shards"]
    if not info.keys:
        raise ValueError(f"no '{split}' face of {manifest_uri} could be read ({ds.stats})")
    methods = {}
    for name, scores in run.per_face.items():
        pf = {k: np.concatenate(v) for k, v in scores.items()}
        methods[name] = Method(name, pf, _summarise(pf))
    if not run.any_landmarks:
        skipped.setdefault("nme", "no face of the split has ground-truth landmarks")
    if judges is not None and judges.expression is not None and "expression_accuracy" not in skipped and not any(
            "expression_accuracy" in m.summary for m in methods.values()):
        skipped["expression_accuracy"] = "no face of the split has expression labels (CelebA faces have them)"
    return Evaluation(info, methods, skipped, keep, run.stages, judges.describe() if judges is not None else {})


@dataclass
class _BatchScorer:
    """Scores one batch for bicubic and every model into ``per_face`` (method -> metric -> per-batch arrays) and
    offers the case model's faces to ``keep``; what a batch allocates dies when the call returns, so the caller can
    hand it back to the OS."""

    models: dict
    keep: Cases | None
    case_model: str | None
    batch_size: int
    heatmap_sigma: float
    dlib: bool
    skipped: dict[str, str]
    judges: object = None  # judging.Panel
    stages: int = 0
    any_landmarks: bool = False
    per_face: dict[str, dict[str, list]] = field(init=False)

    def __post_init__(self) -> None:
        self.per_face = {name: {} for name in (BICUBIC, *self.models)}

    def __call__(self, batch: dict) -> None:
        lr, hr, mask = batch["lr"], batch["hr"], batch["mask"]
        lms, has = batch["landmarks"].double(), batch["has_landmarks"]
        self.any_landmarks |= bool(has.any())
        finals, priors, rows = {BICUBIC: upsample_bicubic(lr)}, {BICUBIC: None}, {}
        for name, h in self.models.items():
            out = h.run(lr, self.batch_size)
            finals[name], priors[name] = out.images[-1], (out.heatmaps[-1] if out.heatmaps else None)
            if name == self.case_model:
                self.stages = len(out.images)
                rows = {"lr": lr, "bicubic": finals[BICUBIC], "hr": hr,
                        **{f"stage{i}": img for i, img in enumerate(out.images)}}
        scores = {}
        if self.dlib:
            try:
                scores = dlib_scores(batch, {**finals, ORIGINAL: hr})
                scores[ORIGINAL].pop("identity_distance")  # the original against itself
            except DlibMissing as e:
                self.dlib = False
                self.skipped.update({k: str(e) for k in DLIB_METRICS})
        if self.judges is not None:
            for name, pf in self.judges.score(list(batch["key"]), hr, finals, ORIGINAL).items():
                scores.setdefault(name, {}).update(pf)
        if scores.get(ORIGINAL):
            for k, v in scores[ORIGINAL].items():
                self.per_face.setdefault(ORIGINAL, {}).setdefault(k, []).append(np.asarray(v, np.float64))
        for name, out in finals.items():
            pf = {**{k: v.numpy() for k, v in face_scores(out, hr, mask).items()}, **region_psnr(out, hr, lms, has)}
            if priors[name] is not None:
                err = nme_fn(soft_argmax(priors[name], self.heatmap_sigma), lms).numpy().astype(np.float64)
                pf["prior_nme"] = np.where(has.numpy(), err, np.nan)
            pf.update(scores.get(name, {}))
            for k, v in pf.items():
                self.per_face[name].setdefault(k, []).append(np.asarray(v, np.float64))
            if self.keep is not None and name == self.case_model:
                self.keep.offer(pf["psnr"], rows, list(batch["key"]))


def _summarise(pf: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for k, v in pf.items():
        v = np.asarray(v, np.float64)
        if np.isfinite(v).any():
            out[k] = float(np.nanmean(v))
    if "identity_distance" in pf:
        d = pf["identity_distance"]
        if np.isfinite(d).any():
            out["match_rate"] = float(np.mean(d[np.isfinite(d)] < MATCH_THRESHOLD))
    return out


# ---------------------------------------------------------------------------------------------- reports

def case_grid(ev: Evaluation) -> tuple[np.ndarray, list[tuple[str, str, float]]]:
    """Best and worst faces by the model's PSNR: rows of input | bicubic | model stages | original."""
    picked = ev.cases.rows()
    cat = lambda k: torch.cat([r[k] for _, r, _ in picked])  # noqa: E731
    grid = comparison_grid(cat("lr"), [cat("bicubic"), *[cat(f"stage{i}") for i in range(ev.stages)]], cat("hr"))
    return grid, [(kind, r["key"], p) for kind, r, p in picked]


def _fmt(v: float | None, metric: str) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if metric in ("nme", "prior_nme", "ssim", "identity_distance") or metric.startswith("parse_f1"):
        return f"{v:.4f}"
    return f"{v:.1%}" if metric == "match_rate" or metric.startswith("expression_accuracy") else f"{v:.2f}"


def _detail(metric: str) -> bool:
    return metric.startswith(("parse_f1_", "expression_accuracy_"))


def table_rows(ev: Evaluation, detail: bool = False) -> tuple[list[str], list[list[str]]]:
    """The report's table: a row per method, a column per metric measured, and a last row with how many faces
    each metric covers (faces without landmarks, labels or a dlib detection are not in every column).
    ``detail``: the per-class parsing F1 and per-attribute expression accuracy instead."""
    metrics = [k for k in METRICS if _detail(k) == detail and any(k in m.summary for m in ev.methods.values())]
    head = ["method"] + [f"{k} {'↑' if METRICS[k] == 'max' else '↓'}" for k in metrics]
    rows = [[n] + [_fmt(m.summary.get(k), k) for k in metrics] for n, m in ev.methods.items()]
    covered = [max((m.coverage.get(k, 0) for m in ev.methods.values()), default=0) for k in metrics]
    return head, rows + [["faces"] + [f"{c:,}" for c in covered]]


def judge_notes(judges: dict) -> list[str]:
    out = []
    if "parser" in judges:
        p = judges["parser"]
        out.append(f"parse_f1*: parser v{p['version']} (held-out mean F1 {p['held_out_mean_f1']} and mIoU "
                   f"{p['held_out_miou']} against human labels on {p['held_out_faces']} CelebAMask-HQ faces); each "
                   "face's parse against the parse of its original, F1 per face class, averaged over the classes "
                   "present.")
    if "expression" in judges:
        e = judges["expression"]
        out.append(f"expression_accuracy*: classifier v{e['version']} (on {e['test_faces']} real test faces: smiling "
                   f"{e.get('test_accuracy_smiling')}, mouth open {e.get('test_accuracy_mouth_open')}) against "
                   "CelebA's Smiling and Mouth_Slightly_Open labels.")
    return out


def markdown(doc: list[tuple]) -> str:
    """A report (blocks: title, text, table, image, list) as Markdown."""
    out: list[str] = []
    for kind, *a in doc:
        if kind == "title":
            out += [f"# {a[0]}", ""]
        elif kind == "text":
            out += [a[0], ""]
        elif kind == "table":
            out += ["| " + " | ".join(a[0]) + " |", "|" + "---|" * len(a[0])]
            out += ["| " + " | ".join(r) + " |" for r in a[1]] + [""]
        elif kind == "image":
            out += [f"![cases]({a[0]})", ""]
        elif kind == "list":
            out += [f"- {n}" for n in a[0]] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def _inline_html(text: str) -> str:
    """Markdown's `code` and **bold** of a report's text, as HTML (everything else escaped)."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def html_page(title: str, doc: list[tuple]) -> str:
    """The same report as one HTML page."""
    out = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"]
    for kind, *a in doc:
        if kind == "title":
            out.append(f"<h1>{html.escape(a[0])}</h1>")
        elif kind == "text":
            out.append(f"<p>{_inline_html(a[0])}</p>")
        elif kind == "table":
            out.append("<table border=1 cellpadding=4><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in a[0])
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                           for r in a[1]) + "</table>")
        elif kind == "image":
            out.append(f"<p><img src='{html.escape(a[0])}' style='image-rendering:pixelated'></p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline_html(n)}</li>" for n in a[0]) + "</ul>")
    return "".join(out) + "\n"


def write_report(ev: Evaluation, out_dir: Path, title: str) -> dict[str, Path]:
    """metrics.json, report.md, report.html and cases.png (best and worst faces) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "markdown": out_dir / "report.md",
             "html": out_dir / "report.html", "grid": out_dir / "cases.png"}
    files["metrics"].write_text(json.dumps({"model": title, **ev.to_json()}, indent=1))
    grid, labels = case_grid(ev)
    Image.fromarray(grid).save(files["grid"])
    head, rows = table_rows(ev)
    d = ev.data
    stages = ev.stages
    caption = (f"Rows: the {sum(lb[0] == 'best' for lb in labels)} best and {sum(lb[0] == 'worst' for lb in labels)} "
               f"worst faces by the model's PSNR. Columns: 16x16 input (nearest) | bicubic | "
               f"{' | '.join(f'stage {i + 1}' for i in range(stages))} | original.")
    notes = [f"{k}: not measured — {why}" for k, why in ev.skipped.items()]
    notes += judge_notes(ev.judges)
    notes.append("original: the originals themselves, where that measures something (dlib NME against the "
                 "ground truth, expression accuracy against the labels): the ceiling of those columns.")
    notes.append("region_psnr_*: PSNR inside regions drawn from the ground-truth 68 landmarks.")
    problems = ev.problems()
    dhead, drows = table_rows(ev, detail=True)
    doc = [("title", f"Evaluation: {title}"),
           ("text", f"Dataset `{d.manifest_uri}` (digest {d.digest}), split **{d.split}**"
                    + (f" of source **{d.source}**" if d.source else "") + f": {len(d.keys)} of {d.expected} "
                    "faces, occlusions seeded by each face's key."),
           ("table", head, rows)]
    if len(dhead) > 1:
        doc += [("text", "Parsing F1 per face class and expression accuracy per attribute:"), ("table", dhead, drows)]
    doc += [("image", files["grid"].name), ("text", caption),
            ("text", "Cases: " + ", ".join(f"{kind} {key} ({p:.2f} dB)" for kind, key, p in labels)),
            ("list", notes)]
    if problems:
        doc.append(("text", "**Partial evaluation:** " + "; ".join(problems)))
    files["markdown"].write_text(markdown(doc))
    files["html"].write_text(html_page(title, doc))
    return files
