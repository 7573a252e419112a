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
  regions      region_psnr_{eyes,brows,nose,mouth,skin}: PSNR inside regions drawn from the ground-truth
               68 points (``prouigan.regions``) — a landmark-derived stand-in for face parsing, not parsing
The dlib metrics need the ``eval`` extra; without it they are skipped, and the reason is recorded.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from prouigan.degradation import upsample_bicubic
from prouigan.landmarks import nme as nme_fn
from prouigan.landmarks import soft_argmax
from prouigan.metrics import masked_psnr, psnr, ssim
from prouigan.regions import REGIONS, region_masks
from prouigan_platform.config import DataConfig
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.labeler import DlibMissing, describe, face_box
from prouigan_platform.dataset.reader import FaceShards
from prouigan_platform.progress import Progress

MATCH_THRESHOLD = 0.6  # dlib's documented same-person distance
# metric -> which way is better
METRICS: dict[str, str] = {
    "psnr": "max", "ssim": "max", "psnr_occluded": "max", "nme": "min", "prior_nme": "min",
    "identity_distance": "min", "match_rate": "max", **{f"region_psnr_{r}": "max" for r in REGIONS},
}
DLIB_METRICS = ("nme", "identity_distance", "match_rate")
BICUBIC = "bicubic"


@dataclass
class SplitData:
    lr: torch.Tensor  # (N, 3, 16, 16)
    hr: torch.Tensor  # (N, 3, 128, 128)
    mask: torch.Tensor  # (N, 1, 128, 128) occluded pixels
    landmarks: torch.Tensor  # (N, 68, 2)
    has_landmarks: torch.Tensor  # (N,) bool
    keys: list[str]
    manifest_uri: str
    digest: str
    split: str
    expected: int  # faces the manifest lists for the split
    bad_shards: int
    source: str | None = None  # one source's faces of the split, or all of them

    @property
    def complete(self) -> bool:
        return len(self.keys) == self.expected and self.bad_shards == 0


def load_split(manifest_uri: str, split: str, data: DataConfig, limit: int | None = None,
               source: str | None = None) -> SplitData:
    """Every face of ``split`` (of one ``source`` when given; or the first ``limit``: then the evaluation is
    partial and never gates)."""
    m = mf.load(manifest_uri)
    expected = mf.split_count(m, split, source)
    if expected == 0:
        raise ValueError(f"dataset {manifest_uri} has no '{split}' faces"
                         + (f" of source '{source}'" if source else "") + f" (counts: {m['counts']})")
    ds = FaceShards(m, split, data, limit=limit, source=source)
    batches = list(DataLoader(ds, batch_size=64))
    if not batches:
        raise ValueError(f"no '{split}' face of {manifest_uri} could be read ({ds.stats})")
    cat = lambda k: torch.cat([b[k] for b in batches])  # noqa: E731
    keys = [k for b in batches for k in b["key"]]
    return SplitData(cat("lr"), cat("hr"), cat("mask"), cat("landmarks").double(), cat("has_landmarks"), keys,
                     manifest_uri, m.get("digest", ""), split, expected, ds.stats["bad_shards"], source)


def to_u8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] -> (B, H, W, 3) uint8."""
    return (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


class DlibScorer:
    """dlib's references on the original faces, computed once: detector box and identity embedding."""

    def __init__(self, data: SplitData, progress_every: float | None = 15.0):
        self._describe = describe
        self.progress_every = progress_every
        hr = to_u8(data.hr)
        gt = data.landmarks.numpy()
        bar = self._bar("dlib on the originals", len(hr))
        self.boxes, self.refs = [], []
        for i, img in enumerate(hr):
            box = face_box(img, gt[i] if data.has_landmarks[i] else None)
            self.boxes.append(box)
            self.refs.append(describe(img, box)[1] if box else None)
            if bar:
                bar.update()
        self.gt, self.has = data.landmarks, data.has_landmarks

    def _bar(self, what: str, n: int):
        return Progress(f"evaluate: {what}", n, "faces", every=self.progress_every) if self.progress_every else None

    def score(self, out: torch.Tensor, name: str = "") -> dict[str, np.ndarray]:
        n = len(out)
        nme, dist = np.full(n, np.nan), np.full(n, np.nan)
        bar = self._bar(f"dlib on {name or 'the outputs'}", n)
        for i, img in enumerate(to_u8(out)):
            if self.boxes[i] is not None:
                pts, emb = self._describe(img, self.boxes[i])
                if self.has[i]:
                    nme[i] = float(nme_fn(torch.from_numpy(pts)[None], self.gt[i][None])[0])
                dist[i] = float(np.linalg.norm(emb - self.refs[i]))
            if bar:
                bar.update()
        return {"nme": nme, "identity_distance": dist}


def region_psnr(out: torch.Tensor, data: SplitData) -> dict[str, np.ndarray]:
    n = len(out)
    res = {f"region_psnr_{r}": np.full(n, np.nan) for r in REGIONS}
    for i in range(n):
        if not data.has_landmarks[i]:
            continue
        for r, m in region_masks(data.landmarks[i].numpy(), out.shape[-1]).items():
            if m.any():
                mt = torch.from_numpy(m)[None, None]
                res[f"region_psnr_{r}"][i] = float(masked_psnr(out[i:i + 1], data.hr[i:i + 1], mt)[0])
    return res


@dataclass
class Method:
    name: str
    stages: list[torch.Tensor]  # each stage's images; the last is the output
    per_face: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> torch.Tensor:
        return self.stages[-1]


@dataclass
class Evaluation:
    data: SplitData
    methods: dict[str, Method]
    skipped: dict[str, str]  # metric -> why it was not measured

    def problems(self, metrics: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Why this evaluation is partial (empty when it is complete for ``metrics``)."""
        d = self.data
        out = []
        if len(d.keys) != d.expected:
            out.append(f"{len(d.keys)} of {d.expected} {d.split} faces were evaluated")
        if d.bad_shards:
            out.append(f"{d.bad_shards} shard(s) of the {d.split} split could not be read")
        for name, m in self.methods.items():
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
                "methods": {k: m.summary for k, m in self.methods.items()}}


def evaluate(models: dict, data: SplitData, use_dlib: bool = True, heatmap_sigma: float = 1.5,
             batch_size: int = 64, progress=None) -> Evaluation:
    """``models``: name -> ``prouigan.inference.Hallucinator``.  Bicubic is always the first method."""
    skipped: dict[str, str] = {}
    scorer = None
    if use_dlib:
        try:
            scorer = DlibScorer(data)
        except DlibMissing as e:
            skipped.update({k: str(e) for k in DLIB_METRICS})
    else:
        skipped.update({k: "dlib metrics turned off" for k in DLIB_METRICS})
    methods = {BICUBIC: Method(BICUBIC, [upsample_bicubic(data.lr)])}
    priors = {BICUBIC: None}
    for name, h in models.items():
        out = h.run(data.lr, batch_size)
        methods[name] = Method(name, out.images)
        priors[name] = out.heatmaps[-1] if out.heatmaps else None
    for name, m in methods.items():
        out, hr = m.final, data.hr
        pf = {"psnr": psnr(out, hr).numpy(), "ssim": ssim(out, hr).numpy(),
              "psnr_occluded": masked_psnr(out, hr, data.mask).numpy()}
        pf.update(region_psnr(out, data))
        has = data.has_landmarks.numpy()
        if priors[name] is not None:
            err = nme_fn(soft_argmax(priors[name], heatmap_sigma), data.landmarks).numpy().astype(np.float64)
            pf["prior_nme"] = np.where(has, err, np.nan)
        if scorer is not None:
            pf.update(scorer.score(out, name))
        m.per_face = pf
        m.summary = _summarise(pf)
        if progress:
            progress(name)
    if not bool(data.has_landmarks.any()):
        skipped.setdefault("nme", "no face of the split has ground-truth landmarks")
    return Evaluation(data, methods, skipped)


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

def comparison_grid(lr: torch.Tensor, outputs: list[torch.Tensor], hr: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8: one row per face, columns  input (nearest x8) | each output (any size, nearest to HR's) |
    original."""
    up = lambda x: F.interpolate(x.float(), size=hr.shape[-1], mode="nearest")  # noqa: E731
    cols = [up(lr), *[up(o) for o in outputs], hr.float()]
    rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(len(hr))]
    return to_u8(torch.cat(rows, dim=1)[None])[0]


def case_grid(ev: Evaluation, model: str, cases: int = 4) -> tuple[np.ndarray, list[tuple[str, str, float]]]:
    """Best and worst ``cases`` faces by the model's PSNR: rows of input | bicubic | model stages | original."""
    d = ev.data
    p = ev.methods[model].per_face["psnr"]
    order = np.argsort(-p)
    k = min(cases, max(1, len(order) // 2))
    pick = list(order[:k]) + [i for i in order[::-1][:k] if i not in order[:k]]
    grid = comparison_grid(d.lr[pick], [ev.methods[BICUBIC].final[pick], *[s[pick] for s in ev.methods[model].stages]],
                           d.hr[pick])
    labels = [("best" if j < k else "worst", d.keys[i], float(p[i])) for j, i in enumerate(pick)]
    return grid, labels


def _fmt(v: float | None, metric: str) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.4f}" if metric in ("nme", "prior_nme", "ssim", "identity_distance") else \
        f"{v:.1%}" if metric == "match_rate" else f"{v:.2f}"


def table_rows(ev: Evaluation) -> tuple[list[str], list[list[str]]]:
    metrics = [k for k in METRICS if any(k in m.summary for m in ev.methods.values())]
    head = ["method"] + [f"{k} {'↑' if METRICS[k] == 'max' else '↓'}" for k in metrics]
    return head, [[n] + [_fmt(m.summary.get(k), k) for k in metrics] for n, m in ev.methods.items()]


def write_report(ev: Evaluation, out_dir: Path, model: str, title: str, cases: int = 4) -> dict[str, Path]:
    """metrics.json, report.md, report.html and cases.png (best and worst faces) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "markdown": out_dir / "report.md",
             "html": out_dir / "report.html", "grid": out_dir / "cases.png"}
    files["metrics"].write_text(json.dumps({"model": title, **ev.to_json()}, indent=1))
    grid, labels = case_grid(ev, model, cases)
    Image.fromarray(grid).save(files["grid"])
    head, rows = table_rows(ev)
    d = ev.data
    stages = len(ev.methods[model].stages)
    caption = (f"Rows: the {sum(lb[0] == 'best' for lb in labels)} best and {sum(lb[0] == 'worst' for lb in labels)} "
               f"worst faces by the model's PSNR. Columns: 16x16 input (nearest) | bicubic | "
               f"{' | '.join(f'stage {i + 1}' for i in range(stages))} | original.")
    notes = [f"{k}: not measured — {why}" for k, why in ev.skipped.items()]
    notes.append("region_psnr_*: PSNR inside regions drawn from the ground-truth 68 landmarks (a stand-in for "
                 "face parsing; no parsing model installs offline). Expression: not measured (no pretrained "
                 "expression model installs offline).")
    problems = ev.problems()
    md = [f"# Evaluation: {title}", "",
          f"Dataset `{d.manifest_uri}` (digest {d.digest}), split **{d.split}**"
          + (f" of source **{d.source}**" if d.source else "") + f": {len(d.keys)} of {d.expected} "
          f"faces, occlusions seeded by each face's key.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", f"![cases]({files['grid'].name})", "", caption, ""]
    md += ["Cases: " + ", ".join(f"{kind} {key} ({p:.2f} dB)" for kind, key, p in labels), ""]
    md += [f"- {n}" for n in notes]
    if problems:
        md += ["", "**Partial evaluation:** " + "; ".join(problems)]
    files["markdown"].write_text("\n".join(md) + "\n")
    esc = html.escape
    table = "<table border=1 cellpadding=4><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    files["html"].write_text(
        f"<!doctype html><meta charset=utf-8><title>{esc(title)}</title><h1>Evaluation: {esc(title)}</h1>"
        f"<p>Dataset <code>{esc(d.manifest_uri)}</code>, split <b>{esc(d.split)}</b>: {len(d.keys)} of "
        f"{d.expected} faces.</p>{table}<p><img src='{files['grid'].name}' style='image-rendering:pixelated'>"
        f"</p><p>{esc(caption)}</p><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"
        + (f"<p><b>Partial evaluation:</b> {esc('; '.join(problems))}</p>" if problems else ""))
    return files
