"""Global and local patch discriminators (LSGAN), and the local crops they judge.

The global discriminator sees the whole 128x128 face; the local one sees 64x64 crops centred on the
eyes or the mouth (from landmarks) or, without landmarks, at random positions.  Both output a grid of
patch scores.  Spectral normalisation keeps them from overpowering a small generator.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from prouigan.landmarks import LEFT_EYE, MOUTH, RIGHT_EYE


class PatchDiscriminator(nn.Module):
    """Strided conv stack -> (B, 1, h, w) patch scores.  ``downsamples`` halvings before the head."""

    def __init__(self, channels: int = 64, downsamples: int = 4, max_channels: int = 256):
        super().__init__()
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(3, channels, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        ch = channels
        for _ in range(downsamples - 1):
            nxt = min(ch * 2, max_channels)
            layers += [spectral_norm(nn.Conv2d(ch, nxt, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            ch = nxt
        layers += [spectral_norm(nn.Conv2d(ch, ch, 3, 1, 1)), nn.LeakyReLU(0.2, True), nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)  # images in [0,1] -> [-1,1]


def local_crop_boxes(landmarks: torch.Tensor | None, batch: int, size: int = 128, crop: int = 64,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 2) top-left corners of crop x crop boxes: on a randomly chosen eye or the mouth when landmarks
    are given, at random otherwise; always inside the image."""
    if landmarks is None:
        return torch.randint(0, size - crop + 1, (batch, 2), generator=generator)
    centres = torch.stack([landmarks[:, LEFT_EYE].mean(1), landmarks[:, RIGHT_EYE].mean(1),
                           landmarks[:, MOUTH].mean(1)], 1)  # (B, 3, 2)
    pick = torch.randint(0, 3, (batch,), generator=generator)
    c = centres[torch.arange(batch, device=centres.device), pick.to(centres.device)]
    return (c - crop / 2).round().long().clamp(0, size - crop)  # on the landmarks' device: no host round trip


def crop(images: torch.Tensor, boxes: torch.Tensor, crop: int = 64) -> torch.Tensor:
    """(B, C, H, W), (B, 2) x/y corners -> (B, C, crop, crop), gathered on the images' device (no host sync)."""
    boxes = boxes.to(images.device)
    r = torch.arange(crop, device=images.device)
    ys, xs = boxes[:, 1, None] + r, boxes[:, 0, None] + r  # (B, crop) each
    b = torch.arange(len(images), device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[b, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)


def build_discriminators(preset: str) -> tuple[PatchDiscriminator, PatchDiscriminator]:
    """(global, local) for a generator preset: narrower for the small presets."""
    widths = {"tiny": 16, "cpu-small": 32, "cpu-small-plain": 32, "gpu-paper": 64}
    width = widths.get(preset)
    if width is None:
        raise KeyError(f"unknown preset '{preset}'; known: {', '.join(widths)}")
    return PatchDiscriminator(width, downsamples=4), PatchDiscriminator(width, downsamples=3)
