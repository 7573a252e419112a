"""The judges of the paper's downstream table (``prouigan.judges``): trained here on the shared data, kept as
versioned artifacts in the store, found by the evaluation.

    <store>/judges/parser/SHA.pt        the weights (a plain state dict, named by its sha256; loaded with
                                        weights_only=True after the sha256 is checked)
    <store>/judges/parser/v0001.json    what it is: architecture, the weights' file and sha256, the data it learnt
                                        from and its own scores on held-out faces; written last, exclusively

The parser learns from ../shared/parsing (CelebAMask-HQ: 900 faces train, 100 held out by a hash of the name),
each face aligned as the platform aligns every face (YuNet's five points fitted to the template of the 68-point
alignment), its 19 classes merged into ``PARSE_CLASSES``.  The expression classifier learns smiling and mouth-open
from CelebA's attributes on a dataset version's train split and is scored on its identity-held-out val and test
splits.  Both learn from clean faces: they judge a restored face the way they judge a real one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prouigan.judges import CELEBAMASK_TO_PARSE, FACE_CLASSES, IGNORE, ExpressionNet, Parser, confusion, f1_iou
from prouigan.vocabulary import EXPRESSION_ATTRIBUTES, EXPRESSIONS, PARSE_CLASSES
from prouigan_platform import storage
from prouigan_platform.errors import BadInput, UserError
from prouigan_platform.paths import store_root
from prouigan_platform.progress import Progress, fmt_duration

KINDS = {"parser": Parser, "expression": ExpressionNet}
HELD_OUT = 100  # parsing faces held out of the parser's training (of ../shared/parsing's 1,000)
FORMAT = "prouigan-judge/1"


@dataclass
class Judge:
    kind: str
    version: int
    model: torch.nn.Module
    record: dict

    @property
    def label(self) -> str:
        return f"{self.kind} v{self.version}"


def judges_root(kind: str, root: str | None = None) -> str:
    if kind not in KINDS:
        raise BadInput(f"unknown judge '{kind}'; known: {', '.join(KINDS)}")
    return storage.join(root or store_root(), "judges", kind)


def versions(kind: str, root: str | None = None) -> list[int]:
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(judges_root(kind, root), ".json")]
    return sorted(int(n[1:-5]) for n in names if n.startswith("v") and n[1:-5].isdigit())


def save(kind: str, model: torch.nn.Module, record: dict, root: str | None = None) -> Judge:
    """Store a judge as the next version: weights first (written whole), then its record, claimed exclusively (two
    trainings finishing at once take two versions)."""
    base = judges_root(kind, root)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    weights = buf.getvalue()
    sha = hashlib.sha256(weights).hexdigest()
    name = f"{sha[:20]}.pt"  # named by content: two trainings finishing at once never write the same file
    storage.write_bytes_atomic(storage.join(base, name), weights)
    for _ in range(100):
        v = (versions(kind, root) or [0])[-1] + 1
        rec = {"format": FORMAT, "kind": kind, "version": v, "created": datetime.now(UTC).isoformat(
            timespec="seconds"), "architecture": model.config, "weights": name, "sha256": sha, **record}
        try:
            storage.create_exclusive(storage.join(base, f"v{v:04d}.json"), json.dumps(rec, indent=1).encode())
        except FileExistsError:
            continue  # another training took this version: the next one
        return Judge(kind, v, model.eval(), rec)
    raise RuntimeError(f"could not claim a version under {base}")


def load(kind: str, version: int | None = None, root: str | None = None) -> Judge | None:
    """The stored judge (the latest by default); None when none is stored.  Weights whose sha256 is not the one its
    record names are refused."""
    have = versions(kind, root)
    if not have:
        return None
    v = have[-1] if version is None else version
    if v not in have:
        raise BadInput(f"no {kind} v{v} under {judges_root(kind, root)} (have {', '.join(map(str, have))})")
    base = judges_root(kind, root)
    rec = json.loads(storage.read_bytes(storage.join(base, f"v{v:04d}.json")))
    if rec.get("format") != FORMAT:
        raise UserError(f"{kind} v{v}: record format {rec.get('format')!r}, this platform reads {FORMAT}")
    data = storage.read_bytes(storage.join(base, rec["weights"]))
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise UserError(f"{kind} v{v}: its weights' sha256 is not the one recorded (changed or torn); retrain it "
                        f"with `prouigan judges train {kind}`")
    model = KINDS[kind](**rec["architecture"])
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return Judge(kind, v, model.eval(), rec)


# ------------------------------------------------------------------------------------------------ training

def _cosine(base: float, done: float) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _augment(x: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator,
             max_shift: float = 0.05, max_scale: float = 0.08, max_rot: float = 8.0):
    """A random flip, a small similarity (the alignment a detector gives) and a colour change, for a batch;
    label maps follow the geometry (nearest)."""
    b = len(x)
    u = torch.rand(b, 5, generator=gen)
    flip = u[:, 0] < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if labels is not None:
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
    ang = (u[:, 1] * 2 - 1) * math.radians(max_rot)
    s = 1 + (u[:, 2] * 2 - 1) * max_scale
    t = (u[:, 3:5] * 2 - 1) * max_shift * 2
    theta = torch.stack([torch.stack([torch.cos(ang) / s, -torch.sin(ang) / s, t[:, 0]], 1),
                         torch.stack([torch.sin(ang) / s, torch.cos(ang) / s, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if labels is not None:
        labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].round().long()
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.2
    bias = (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * 0.05
    return (x * gain + bias).clamp(0, 1), labels


def _eta(elapsed: float, done: float) -> str:
    return fmt_duration(elapsed / done - elapsed) if done >= 0.01 else "-"


def _budget(minutes: float | None, steps: int | None) -> tuple[float, int]:
    if minutes is None and steps is None:
        raise BadInput("give the judge's training a budget: --minutes or --steps")
    return (minutes * 60 if minutes else math.inf), (steps or 10 ** 9)


def _fit(name: str, model, opt, batches, loss_fn, lr: float, budget_s: float, budget_steps: int, batch_size: int,
         log) -> tuple[int, float]:
    """The judges' one training loop: (x, y) batches until the time or step budget is spent, a cosine learning rate
    over the budget, bf16 autocast where the CPU has it (as training G does), a progress line every 15 s.  ->
    (steps, minutes)."""
    from prouigan.training import autocast_dtype

    dtype, _ = autocast_dtype(torch.device("cpu"), True)  # once: not a check per step
    t0, step, last = time.monotonic(), 0, 0.0
    model.train()
    for x, y in batches:
        done = max(step / budget_steps, (time.monotonic() - t0) / budget_s)
        if done >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = _cosine(lr, done)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if time.monotonic() - last > 15:
            last = time.monotonic()
            el = last - t0
            log(f"judges: {name} step {step} | {el / 60:.1f} min ({done:.0%}) | {step * batch_size / el:.1f} faces/s | "
                f"loss {loss.item():.4f} | ETA {_eta(el, done)}")
    return step, round((time.monotonic() - t0) / 60, 2)


def _set_threads() -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1))


def align_parsing_face(rgb: np.ndarray, mask: np.ndarray, size: int = 128) -> tuple[np.ndarray, np.ndarray] | str:
    """A CelebAMask-HQ face and its label map aligned as the platform aligns faces, labels merged into
    PARSE_CLASSES (pixels outside the photo: IGNORE); or why not (no face found)."""
    from prouigan.align import align_quad, quad_from_points
    from prouigan_platform.detection import detect

    found = detect(rgb, upsample=1)  # the faces fill the photo: no enlarged pass for tiny ones
    if not found:
        return "no face found by yunet"
    d = max(found, key=lambda d: d.width)
    quad = quad_from_points(d.points5)
    face = align_quad(rgb, quad, size=size).image
    m = Image.fromarray(mask).transform((size, size), Image.QUAD, tuple(quad.flatten()), Image.NEAREST,
                                        fillcolor=IGNORE)
    return face, CELEBAMASK_TO_PARSE[np.asarray(m)]


def parsing_split(names: list[str], held_out: int = HELD_OUT) -> set[str]:
    """The held-out names: the first ``held_out`` by a hash of the name (stable whatever the folder's order)."""
    return set(sorted(names, key=lambda n: hashlib.sha256(f"parsing:{n}".encode()).hexdigest())[:held_out])


def load_parsing(folder: Path, limit: int | None = None, log=print) -> dict:
    """../shared/parsing's faces aligned, with merged labels: {names, images (N,128,128,3) u8, labels (N,128,128)
    u8, quarantined [(name, why)]}."""
    folder = Path(folder)
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise BadInput(f"{folder} is not a parsing folder (images/NAME.jpg + masks/NAME.png): is ../shared/parsing "
                       "beside the checkout? Pass --parsing PATH")
    names = sorted(p.stem for p in (folder / "images").glob("*.jpg"))[:limit]
    out = {"names": [], "images": [], "labels": [], "quarantined": []}
    bar = Progress("align parsing faces", len(names), "faces", every=15)
    for n in names:
        mask_path = folder / "masks" / f"{n}.png"
        if not mask_path.is_file():
            out["quarantined"].append((n, "no mask"))
        else:
            with Image.open(folder / "images" / f"{n}.jpg") as im, Image.open(mask_path) as mk:
                rgb, mask = np.asarray(im.convert("RGB")), np.asarray(mk)
            if mask.ndim != 2 or mask.shape != rgb.shape[:2]:
                out["quarantined"].append((n, f"mask {mask.shape} does not match the image {rgb.shape[:2]}"))
            else:
                got = align_parsing_face(rgb, mask)
                if isinstance(got, str):
                    out["quarantined"].append((n, got))
                else:
                    out["names"].append(n)
                    out["images"].append(got[0])
                    out["labels"].append(got[1])
        bar.update(1, extra=f"{len(out['quarantined'])} quarantined")
    for n, why in out["quarantined"]:
        log(f"judges: parsing face {n} left out: {why}")
    if not out["names"]:
        raise UserError(f"no usable parsing face in {folder}")
    out["images"], out["labels"] = np.stack(out["images"]), np.stack(out["labels"])
    return out


def parser_scores(model: Parser, images: np.ndarray, labels: np.ndarray) -> dict:
    """Pixel F1 and IoU per class over a set of faces, against their labels; means over the face classes."""
    conf = np.zeros((len(PARSE_CLASSES),) * 2, np.int64)
    model.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pred = model.parse(x).numpy()
    for p, r in zip(pred, labels, strict=True):
        conf += confusion(p.ravel(), r.ravel())
    f1, iou = f1_iou(conf)
    face = [PARSE_CLASSES.index(c) for c in FACE_CLASSES]
    return {"faces": len(images), "f1": {c: round(float(f1[i]), 4) for i, c in enumerate(PARSE_CLASSES)},
            "iou": {c: round(float(iou[i]), 4) for i, c in enumerate(PARSE_CLASSES)},
            "mean_f1": round(float(np.nanmean(f1[face])), 4), "miou": round(float(np.nanmean(iou)), 4),
            "pixel_accuracy": round(float(np.trace(conf) / max(conf.sum(), 1)), 4)}


def parse_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus a soft Dice term over the classes present in the batch: without it, eyes and lips (a few
    percent of the pixels) are the last to be learnt, after a few thousand steps on this CPU."""
    keep = labels != IGNORE
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    prob = logits.softmax(1) * keep[:, None]
    onehot = F.one_hot(labels.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2) * keep[:, None]
    inter, total = (prob * onehot).sum((0, 2, 3)), (prob + onehot).sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = 1 - (2 * inter[present] + 1) / (total[present] + 1)
    return ce + dice.mean()


def train_parser(folder: Path, minutes: float | None = 10.0, steps: int | None = None, batch_size: int = 16,
                 lr: float = 2e-3, width: int = 24, seed: int = 0, limit: int | None = None, root: str | None = None,
                 log=print) -> Judge:
    """Train a parser on ../shared/parsing's faces (all but the held-out 100) and store it with its held-out scores."""
    _set_threads()
    budget_s, budget_steps = _budget(minutes, steps)
    data = load_parsing(folder, limit, log)
    held = parsing_split(data["names"], min(HELD_OUT, len(data["names"]) // 10 or 1))
    is_test = np.array([n in held for n in data["names"]])
    x_all = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(data["labels"].astype(np.int64))
    x_tr, y_tr = x_all[~is_test], y_all[~is_test]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Parser(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    log(f"judges: training the parser on {len(x_tr)} faces ({int(is_test.sum())} held out), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, batch {batch_size}, budget "
        + (f"{minutes:g} min" if minutes else f"{steps} steps"))
    def batches():
        while True:
            idx = torch.randint(len(x_tr), (batch_size,), generator=gen)
            yield _augment(x_tr[idx].float() / 255, y_tr[idx], gen)

    step, minutes_spent = _fit("parser", model, opt, batches(), parse_loss, lr, budget_s, budget_steps, batch_size,
                               log)
    scores = parser_scores(model, data["images"][is_test], data["labels"][is_test])
    log(f"judges: parser after {step} steps: held-out mean F1 {scores['mean_f1']:.3f}, mIoU {scores['miou']:.3f} "
        f"over {scores['faces']} faces")
    record = {"data": {"folder": str(Path(folder).resolve()), "train_faces": int(len(x_tr)),
                       "held_out_faces": int(is_test.sum()), "quarantined": data["quarantined"],
                       "classes": list(PARSE_CLASSES), "merge": "CelebAMask-HQ 19 -> HELEN 11 with left/right merged:"
                       " ears -> skin, hat -> hair, neck, earring, necklace, cloth -> background, eyeglasses ignored"},
              "training": {"steps": step, "minutes": minutes_spent, "batch_size": batch_size, "lr": lr, "seed": seed},
              "held_out": scores}
    return save("parser", model, record, root)


def read_attributes(path: Path) -> dict[str, np.ndarray]:
    """CelebA's attribute table (a header of names, then ``NAME v1 v2 …`` with ±1) -> stem -> EXPRESSIONS as 0/1."""
    lines = Path(path).read_text().split("\n")
    head = lines[0].split()
    if head and head[0].isdigit():  # the original list_attr_celeba.txt: a count line first
        lines, head = lines[1:], lines[1].split()
    cols = head[1:] if head[0] == "name" else head
    try:
        idx = [cols.index(EXPRESSION_ATTRIBUTES[e]) for e in EXPRESSIONS]
    except ValueError:
        raise UserError(f"{path} names no {', '.join(EXPRESSION_ATTRIBUTES.values())} column") from None
    out = {}
    for line in lines[1:]:
        f = line.split()
        if len(f) == len(cols) + 1:
            out[Path(f[0]).stem] = np.array([f[1 + i] == "1" for i in idx], np.float32)
    return out


def expression_labels(manifest, attributes: Path | None = None) -> tuple[dict[str, np.ndarray], list[str], str | None]:
    """sample key -> the EXPRESSIONS labels (0/1) of a dataset version's faces, from the attribute table beside each
    source (``ATTRIBUTES.txt`` in its folder: CelebA's) or ``attributes`` for a CelebA source; the sources labelled;
    and why there are no labels, when there are none."""
    labels, named, missing = {}, [], []
    for s in manifest.sources:
        if not s.get("path"):
            continue
        path = Path(attributes) if attributes and s.get("kind") == "celeba" else Path(s["path"]) / "ATTRIBUTES.txt"
        if not path.is_file():
            if s.get("kind") == "celeba":
                missing.append(str(path))
            continue
        table = read_attributes(path)
        labels.update({f"{s['name']}_{stem}": v for stem, v in table.items()})
        named.append(s["name"])
    why = None
    if not labels:
        why = (f"no attribute table at {', '.join(missing)}" if missing else
               "no source of the dataset has an attribute table (CelebA's ATTRIBUTES.txt)")
    return labels, named, why


def _expression_batches(manifest, sources: list[str], split: str, labels: dict, endless: bool, batch_size: int,
                        seed: int = 0):
    from prouigan_platform.config import DataConfig
    from prouigan_platform.dataset import manifest as mf
    from prouigan_platform.dataset.reader import FaceShards

    data = DataConfig(occlusion={"probability": 0.0})
    for src in sources:
        if not mf.shard_uris(manifest, split, src):
            continue
        ds = FaceShards(manifest, split, data, seed=seed, epochs=None if endless else 1, source=src)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=1 if endless else 0)
        for b in loader:
            keep = [i for i, k in enumerate(b["key"]) if k in labels]
            if keep:
                yield b["hr"][keep], torch.from_numpy(np.stack([labels[b["key"][i]] for i in keep]))


def expression_scores(model: ExpressionNet, manifest, sources: list[str], split: str, labels: dict) -> dict:
    """Accuracy and balanced accuracy of each attribute on a split's labelled faces."""
    model.eval()
    preds, truth = [], []
    for x, y in _expression_batches(manifest, sources, split, labels, False, 128):
        preds.append(model.predict(x).numpy())
        truth.append(y.numpy() > 0.5)
    if not preds:
        return {"faces": 0}
    p, t = np.concatenate(preds), np.concatenate(truth)
    out = {"faces": len(p)}
    for j, e in enumerate(EXPRESSIONS):
        pos, neg = t[:, j], ~t[:, j]
        tpr = float((p[pos, j]).mean()) if pos.any() else float("nan")
        tnr = float((~p[neg, j]).mean()) if neg.any() else float("nan")
        out[e] = {"accuracy": round(float((p[:, j] == t[:, j]).mean()), 4),
                  "balanced_accuracy": round((tpr + tnr) / 2, 4), "positives": int(pos.sum())}
    return out


def train_expression(manifest_uri: str, attributes: Path | None = None, minutes: float | None = 10.0,
                     steps: int | None = None, batch_size: int = 64, lr: float = 2e-3, width: int = 32,
                     seed: int = 0, root: str | None = None, log=print) -> Judge:
    """Train the expression classifier on a dataset version's CelebA train faces; score it on val and test."""
    from prouigan_platform.dataset import manifest as mf

    _set_threads()
    budget_s, budget_steps = _budget(minutes, steps)
    m = mf.load(manifest_uri)
    labels, sources, why = expression_labels(m, attributes)
    if why:
        raise BadInput(f"no expression labels for {manifest_uri}: {why}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ExpressionNet(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    train_n = sum(mf.split_count(m, "train", s) for s in sources)
    log(f"judges: training the expression classifier ({', '.join(EXPRESSIONS)}) on the {train_n:,} train faces of "
        f"{', '.join(sources)} in {manifest_uri}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"parameters, batch {batch_size}, budget " + (f"{minutes:g} min" if minutes else f"{steps} steps"))
    batches = ((_augment(x, None, gen)[0], y)
               for x, y in _expression_batches(m, sources, "train", labels, True, batch_size, seed))
    step, minutes_spent = _fit("expression", model, opt, batches, F.binary_cross_entropy_with_logits, lr, budget_s,
                               budget_steps, batch_size, log)
    held = {s: expression_scores(model, m, sources, s, labels) for s in ("val", "test")}
    for s, sc in held.items():
        if sc["faces"]:
            log(f"judges: expression on the {sc['faces']} {s} faces: " + ", ".join(
                f"{e} accuracy {sc[e]['accuracy']:.3f} (balanced {sc[e]['balanced_accuracy']:.3f})"
                for e in EXPRESSIONS))
    record = {"data": {"dataset": manifest_uri, "digest": m.digest, "sources": sources, "attributes": {
                  e: EXPRESSION_ATTRIBUTES[e] for e in EXPRESSIONS}, "train_faces": train_n},
              "training": {"steps": step, "minutes": minutes_spent, "batch_size": batch_size, "lr": lr, "seed": seed},
              "held_out": held}
    return save("expression", model, record, root)


# ------------------------------------------------------------------------------------------------ judging

@dataclass
class Panel:
    """The judges an evaluation uses, and the expression labels of the split's faces."""

    parser: Judge | None
    expression: Judge | None
    labels: dict[str, np.ndarray]
    skipped: dict[str, str]  # metric -> why it is not measured

    def describe(self) -> dict:
        """What judged: each judge's version, weights' sha256 and its own held-out scores (the ceiling)."""
        out = {}
        if self.parser:
            h = self.parser.record.get("held_out", {})
            out["parser"] = {"version": self.parser.version, "sha256": self.parser.record["sha256"],
                             "held_out_mean_f1": h.get("mean_f1"), "held_out_miou": h.get("miou"),
                             "held_out_faces": h.get("faces")}
        if self.expression:
            t = self.expression.record.get("held_out", {}).get("test", {})
            out["expression"] = {"version": self.expression.version, "sha256": self.expression.record["sha256"],
                                 **{f"test_accuracy_{e}": t.get(e, {}).get("accuracy") for e in EXPRESSIONS},
                                 "test_faces": t.get("faces")}
        return out

    def score(self, keys: list[str], hr: torch.Tensor, outputs: dict[str, torch.Tensor],
              original: str) -> dict[str, dict[str, np.ndarray]]:
        """method -> metric -> per face: the parse of each output against the parse of ``hr`` (F1 per face class
        and their mean), and expression accuracy against the labels for each output and for ``hr`` itself (named
        ``original``; NaN for a face without labels)."""
        from prouigan.judges import parse_scores

        out: dict[str, dict[str, np.ndarray]] = {name: {} for name in (*outputs, original)}
        if self.parser is not None:
            ref = self.parser.model.parse(hr)
            for name, img in outputs.items():
                out[name].update(parse_scores(self.parser.model.parse(img), ref))
        if self.expression is not None and self.labels:
            y = np.stack([self.labels.get(k, np.full(len(EXPRESSIONS), np.nan, np.float32)) for k in keys])
            has = np.isfinite(y).all(1)
            if has.any():
                for name, img in {**outputs, original: hr}.items():
                    right = (self.expression.model.predict(img).numpy() == (y > 0.5)).astype(np.float64)
                    right[~has] = np.nan
                    for j, e in enumerate(EXPRESSIONS):
                        out[name][f"expression_accuracy_{e}"] = right[:, j]
                    out[name]["expression_accuracy"] = right.mean(1)
        return out


def panel(manifest, use: bool = True, root: str | None = None) -> Panel:
    """The latest stored judges, the expression labels of ``manifest``'s faces, and why what is missing is."""
    skipped: dict[str, str] = {}
    if not use:
        return Panel(None, None, {}, {"parse_f1": "judges turned off (eval.judges: false)",
                                      "expression_accuracy": "judges turned off (eval.judges: false)"})
    parser, expression = load("parser", root=root), load("expression", root=root)
    if parser is None:
        skipped["parse_f1"] = "no face parser stored: train one with `prouigan judges train parser`"
    labels: dict[str, np.ndarray] = {}
    if expression is None:
        skipped["expression_accuracy"] = ("no expression classifier stored: train one with `prouigan judges train "
                                          "expression`")
    else:
        labels, _, why = expression_labels(manifest)
        if why:
            skipped["expression_accuracy"] = why
    return Panel(parser, expression, labels, skipped)
