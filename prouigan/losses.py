"""The loss terms, each named, each weighted from the config.

Generator side (summed over the three stages where a term is per stage):
  pixel        MSE between each stage's image and the HR face resized to that stage
  pixel_l1     the same with L1 (what the plain CNN baseline trains with)
  heatmap      MSE between each stage's estimated priors and the ground-truth Gaussians, summed over the
               68 points and averaged over pixels (so its scale does not shrink with the point count);
               absent for a generator without priors
  adversarial  LSGAN (D(fake) - 1)^2 of the global and the local discriminator, last stage only
  tv           total variation of every stage's image
  perceptual   VGG19 feature L1 (relu1_1..relu5_1), last stage; only with local VGG weights
  style        Gram-matrix L1 of the same features, last stage; only with local VGG weights
Discriminator side: LSGAN 0.5 * [(D(real) - 1)^2 + D(fake)^2].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prouigan.discriminators import crop


@dataclass(frozen=True)
class LossWeights:
    pixel: float = 1.0
    pixel_l1: float = 0.0
    heatmap: float = 0.1
    adversarial: float = 1e-3
    tv: float = 1e-5
    perceptual: float = 0.0
    style: float = 0.0


def resize_to(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-1] == size:
        return img
    return F.interpolate(img, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def total_variation(img: torch.Tensor) -> torch.Tensor:
    return (img[..., 1:, :] - img[..., :-1, :]).abs().mean() + (img[..., :, 1:] - img[..., :, :-1]).abs().mean()


def lsgan_generator(scores: torch.Tensor) -> torch.Tensor:
    return ((scores.float() - 1) ** 2).mean()


def lsgan_discriminator(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    return 0.5 * (((real_scores.float() - 1) ** 2).mean() + (fake_scores.float() ** 2).mean())


# torchvision's vgg19 `features` layout: conv widths, "M" = max-pool
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
_VGG_TAPS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (indices in `features`)


class VGGFeatures(nn.Module):
    """Frozen VGG19 feature taps.  Weights come from a local file only (torchvision's vgg19 state_dict,
    or just its ``features.*`` part); nothing is downloaded."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"VGG19 weights not found at {path} (the perceptual/style losses need a local "
                                    "torchvision vgg19 state_dict; nothing is downloaded)")
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*layers[: _VGG_TAPS[-1] + 1])
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
        keep = {k: v for k, v in state.items() if int(k.split(".")[0]) <= _VGG_TAPS[-1]}
        self.features.load_state_dict(keep, strict=True)
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG_TAPS:
                taps.append(x)
        return taps


def perceptual_network(weights: LossWeights, vgg_path: str | Path | None) -> tuple[VGGFeatures | None, str]:
    """The VGG for the perceptual/style terms, and a line saying whether they are on.  Without a local weights
    file they are OFF (never a random-weights "perceptual" loss); a path that does not exist is an error."""
    if weights.perceptual <= 0 and weights.style <= 0:
        return None, "perceptual/style losses: off (weights 0)"
    if vgg_path is None:
        return None, ("perceptual/style losses: OFF — no local VGG19 weights given (loss.vgg_weights); "
                      "nothing is downloaded, so these terms are skipped")
    return VGGFeatures(vgg_path), f"perceptual/style losses: on (VGG19 from {vgg_path})"


def gram(f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    f = f.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def generator_loss(out, hr: torch.Tensor, target_heatmaps: list[torch.Tensor], w: LossWeights,
                   d_global: nn.Module | None = None, d_local: nn.Module | None = None,
                   boxes: torch.Tensor | None = None, vgg: VGGFeatures | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total weighted loss and each term's (unweighted) value, detached, for logging."""
    terms: dict[str, torch.Tensor] = {}
    targets = [resize_to(hr, img.shape[-1]) for img in out.images]
    terms["pixel"] = sum(F.mse_loss(img.float(), t) for img, t in zip(out.images, targets, strict=True))
    if w.pixel_l1 > 0:
        terms["pixel_l1"] = sum(F.l1_loss(img.float(), t) for img, t in zip(out.images, targets, strict=True))
    if out.heatmaps:
        terms["heatmap"] = sum(((hm.float() - t) ** 2).sum(1).mean() for hm, t in zip(out.heatmaps, target_heatmaps,
                                                                                      strict=True))
    terms["tv"] = sum(total_variation(img.float()) for img in out.images)
    fake = out.final
    if w.adversarial > 0 and d_global is not None:
        adv = lsgan_generator(d_global(fake))
        if d_local is not None and boxes is not None:
            adv = adv + lsgan_generator(d_local(crop(fake, boxes)))
        terms["adversarial"] = adv
    if vgg is not None and (w.perceptual > 0 or w.style > 0):
        ff, fr = vgg(fake.float()), vgg(hr.float())
        terms["perceptual"] = sum(F.l1_loss(a, b) for a, b in zip(ff, fr, strict=True))
        terms["style"] = sum(F.l1_loss(gram(a), gram(b)) for a, b in zip(ff, fr, strict=True))
    total = sum(getattr(w, name) * value for name, value in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}


def discriminator_loss(d_global: nn.Module, d_local: nn.Module | None, real: torch.Tensor, fake: torch.Tensor,
                       boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    fake = fake.detach()
    n = len(real)
    # one forward per discriminator over [real; fake]: a single use per step keeps DDP's reducer simple
    scores = d_global(torch.cat([real, fake]))
    terms = {"d_global": lsgan_discriminator(scores[:n], scores[n:])}
    if d_local is not None and boxes is not None:
        scores = d_local(torch.cat([crop(real, boxes), crop(fake, boxes)]))
        terms["d_local"] = lsgan_discriminator(scores[:n], scores[n:])
    return sum(terms.values()), {k: v.detach() for k, v in terms.items()}
