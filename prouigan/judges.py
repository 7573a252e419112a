"""The downstream judges of the paper's table, as plain PyTorch: a face parser and an expression classifier that
look at 128x128 aligned faces (the model's output, bicubic's, the original) so the evaluation can say how well a
hallucinated face keeps its parts and its expression.

Both are small (well under 2 M parameters): they are trained on this project's CPU in minutes by
``prouigan judges train`` and only have to be good enough to tell faces apart, not to win a parsing benchmark.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prouigan.vocabulary import EXPRESSIONS, PARSE_CLASSES

IGNORE = 255  # a label pixel no class owns (eyeglasses): left out of the parser's loss and scores

# CelebAMask-HQ's 19 classes (the order ../shared/parsing uses) -> PARSE_CLASSES: HELEN's 11 classes with left
# and right merged (a flip then keeps a label true), ears into skin, neck and accessories into background, hat
# into hair, eyeglasses ignored (HELEN has no class for them: their pixels hide eye, brow or skin)
CELEBAMASK = ("background", "skin", "nose", "eyeglasses", "left_eye", "right_eye", "left_brow", "right_brow",
              "left_ear", "right_ear", "inner_mouth", "upper_lip", "lower_lip", "hair", "hat", "earring", "necklace",
              "neck", "cloth")
_MERGE = {"left_eye": "eyes", "right_eye": "eyes", "left_brow": "brows", "right_brow": "brows", "left_ear": "skin",
          "right_ear": "skin", "hat": "hair", "earring": "background", "necklace": "background", "neck": "background",
          "cloth": "background"}
CELEBAMASK_TO_PARSE = np.array([IGNORE if c == "eyeglasses" else PARSE_CLASSES.index(_MERGE.get(c, c))
                                for c in CELEBAMASK] + [IGNORE] * (256 - len(CELEBAMASK)), np.uint8)
FACE_CLASSES = tuple(c for c in PARSE_CLASSES if c != "background")  # what the mean F1 averages


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Parser(nn.Module):
    """A small U-Net: (B, 3, 128, 128) in [0, 1] -> (B, len(PARSE_CLASSES), 128, 128) logits.  It looks at the face
    at ``side`` px (64 by default: 4x the model's input, and a quarter of the work of 128) and its logits are
    upsampled to the input's size."""

    def __init__(self, width: int = 24, classes: int = len(PARSE_CLASSES), side: int = 64):
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.side = side
        self.config = {"width": width, "classes": classes, "side": side}
        self.down = nn.ModuleList([_block(3, w[0]), _block(w[0], w[1]), _block(w[1], w[2]), _block(w[2], w[3])])
        self.up = nn.ModuleList([_block(w[3] + w[2], w[2]), _block(w[2] + w[1], w[1]), _block(w[1] + w[0], w[0])])
        self.head = nn.Conv2d(w[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = (F.interpolate(x, size=(self.side, self.side), mode="area") - 0.5) / 0.25
        skips = []
        for i, d in enumerate(self.down):
            x = d(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for u, s in zip(self.up, reversed(skips[:-1]), strict=True):
            x = u(torch.cat([F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False), s], 1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def parse(self, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(B, 3, 128, 128) -> (B, 128, 128) class indices (uint8)."""
        return torch.cat([self(x[i:i + batch_size].float()).argmax(1).to(torch.uint8)
                          for i in range(0, len(x), batch_size)])


class ExpressionNet(nn.Module):
    """A small CNN: (B, 3, 128, 128) in [0, 1] -> (B, len(EXPRESSIONS)) logits, one binary attribute each.  It sees
    the face at 64x64 (what a 16x16 input's expression can be judged at, and 4x cheaper)."""

    def __init__(self, width: int = 32, outputs: int = len(EXPRESSIONS)):
        super().__init__()
        self.config = {"width": width, "outputs": outputs}
        layers, cin = [], 3
        for cout in (width, width * 2, width * 4, width * 8):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(cin, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(64, 64), mode="area")
        return self.head(self.features((x - 0.5) / 0.25).mean((2, 3)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(B, 3, 128, 128) -> (B, len(EXPRESSIONS)) bool."""
        return torch.cat([self(x[i:i + batch_size].float()) > 0 for i in range(0, len(x), batch_size)])


def confusion(pred: np.ndarray, ref: np.ndarray, classes: int = len(PARSE_CLASSES)) -> np.ndarray:
    """(classes, classes) pixel counts, rows the reference, columns the prediction; IGNORE pixels left out."""
    keep = ref != IGNORE
    return np.bincount(ref[keep].astype(np.int64) * classes + pred[keep].astype(np.int64),
                       minlength=classes * classes).reshape(classes, classes)


def f1_iou(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 and IoU from a confusion matrix; NaN for a class absent from both reference and prediction."""
    tp = np.diag(conf).astype(np.float64)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return f1, iou


def parse_scores(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, np.ndarray]:
    """Per face: ``parse_f1_<class>`` for each face class (NaN where the class is in neither parse) and
    ``parse_f1``, their mean over the classes present."""
    n = len(pred)
    out = {f"parse_f1_{c}": np.full(n, np.nan) for c in FACE_CLASSES}
    p, r = pred.numpy(), ref.numpy()
    for i in range(n):
        f1, _ = f1_iou(confusion(p[i].ravel(), r[i].ravel()))
        for c in FACE_CLASSES:
            out[f"parse_f1_{c}"][i] = f1[PARSE_CLASSES.index(c)]
    stacked = np.stack([out[f"parse_f1_{c}"] for c in FACE_CLASSES], 1)
    present = np.isfinite(stacked)
    with np.errstate(invalid="ignore"):
        out["parse_f1"] = np.where(present, stacked, 0).sum(1) / present.sum(1)  # NaN where no class is present
    return out
