"""The progressive Pro-UIGAN generator: 16 -> 32 -> 64 -> 128 in three stages.

Each stage takes the current face (and the features carried from the previous stage) and
  (a) estimates facial geometry priors: landmark features and 68 heatmaps at the stage's input size,
  (b) fuses face and landmark features with cross-modal attention,
  (c) upsamples x2 and inpaints: a residual trunk, pixel shuffle, and an RGB residual over the bilinear
      upsampled input face.
Priors are re-estimated from every stage's output, so they sharpen as the face does.  We estimate all 68
points at every stage (the public code's 7/42/68 schedule followed the points its frozen pretrained
networks gave; ours are trained jointly from 68-point ground truth, so the full set is supervised at
every scale and one heatmap head shape serves all stages).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prouigan.attention import CrossModalAttention
from prouigan.presets import GeneratorConfig


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class ResBlock(nn.Module):
    def __init__(self, ch: int, scale: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), _act(), nn.Conv2d(ch, ch, 3, padding=1))
        self.scale = scale  # residual scaling (EDSR): keeps a deep un-normalised trunk stable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.body(x)


class Stage(nn.Module):
    def __init__(self, ch: int, out_ch: int, carried_ch: int, blocks: int, cfg: GeneratorConfig):
        super().__init__()
        p = cfg.prior_channels
        self.priors = cfg.priors
        self.encode = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), _act())
        self.carry = nn.Conv2d(carried_ch, ch, 1) if carried_ch else None
        if self.priors:
            self.prior = nn.Sequential(nn.Conv2d(ch, p, 3, padding=1), _act(),
                                       *[ResBlock(p) for _ in range(cfg.prior_blocks)])
            self.heatmap = nn.Conv2d(p, cfg.num_points, 1)
            self.heatmap_embed = nn.Conv2d(cfg.num_points, p, 1)
            self.attention = CrossModalAttention(ch, p, cfg.attn_dim, cfg.attn_max_tokens, cfg.attn_gamma_init)
            k = cfg.fuse_kernel
            self.fuse = nn.Sequential(nn.Conv2d(ch + p, ch, k, padding=k // 2), _act())
            self.prior_max_size = cfg.prior_max_size
        self.trunk = nn.Sequential(*[ResBlock(ch) for _ in range(blocks)])
        self.up = nn.Sequential(nn.Conv2d(ch, out_ch * 4, 3, padding=1), nn.PixelShuffle(2), _act())
        self.to_rgb = nn.Conv2d(out_ch, 3, 3, padding=1)

    def forward(self, img: torch.Tensor, carried: torch.Tensor | None, external_heatmaps: torch.Tensor | None = None):
        f = self.encode(img)  # (B, ch, r, r)
        if carried is not None:
            f = f + self.carry(carried)
        if self.priors:
            # priors are smooth: at a large stage they are estimated (and attended) on pooled features, which
            # halves the cost of the 64x64 stage of the CPU preset; the results are upsampled back
            r = f.shape[-1]
            s = max(1, r // self.prior_max_size)
            fp = F.avg_pool2d(f, s) if s > 1 else f
            lm = self.prior(fp)  # (B, p, r/s, r/s) landmark features
            hm = self.heatmap(lm)  # (B, K, r/s, r/s) estimated priors
            ext = external_heatmaps
            if ext is not None and s > 1:
                ext = F.avg_pool2d(ext, s)
            lm = lm + self.heatmap_embed(hm if ext is None else ext)
            f_att, lm_att = self.attention(fp, lm)
            if s > 1:
                up = dict(size=(r, r), mode="bilinear", align_corners=False)
                f_att = f + F.interpolate(f_att - fp, **up)
                lm_att = F.interpolate(lm_att, **up)
                hm = F.interpolate(hm, **up)
            t = self.trunk(self.fuse(torch.cat([f_att, lm_att], 1))) + f
        else:  # the plain CNN baseline
            hm = None
            t = self.trunk(f) + f
        u = self.up(t)  # (B, out_ch, 2r, 2r)
        out = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + self.to_rgb(u)
        return out, hm, u


@dataclass
class GeneratorOutput:
    images: list[torch.Tensor]  # [(B,3,32,32), (B,3,64,64), (B,3,128,128)]
    heatmaps: list[torch.Tensor]  # [(B,K,16,16), (B,K,32,32), (B,K,64,64)] priors of each stage's input;
    # empty for the plain CNN baseline (``GeneratorConfig.priors=False``)

    @property
    def final(self) -> torch.Tensor:
        return self.images[-1]


class ProUIGANGenerator(nn.Module):
    """16x16 occluded face -> 128x128 face, with every stage's image and priors.

    ``external_prior``: optional frozen module mapping a (B,3,r,r) face in [0,1] to (B,K,h,w) heatmaps;
    when given, its heatmaps (resized to each stage) replace the learned ones inside the stages, while the
    learned heads are still returned (and can still be supervised).
    """

    def __init__(self, cfg: GeneratorConfig | None = None, external_prior: nn.Module | None = None):
        super().__init__()
        cfg = cfg or GeneratorConfig()
        self.cfg = cfg
        c = cfg.channels
        outs = (c[1], c[2], max(16, c[2] // 2))
        carried = (0, c[1], c[2])
        self.stages = nn.ModuleList(Stage(c[i], outs[i], carried[i], cfg.blocks[i], cfg) for i in range(3))
        self.external_prior = external_prior
        if external_prior is not None:
            for prm in external_prior.parameters():
                prm.requires_grad_(False)

    def _external(self, img: torch.Tensor) -> torch.Tensor | None:
        if self.external_prior is None:
            return None
        with torch.no_grad():
            self.external_prior.eval()
            hm = self.external_prior(img)
        return F.interpolate(hm, size=img.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, lr: torch.Tensor, observed: torch.Tensor | None = None) -> GeneratorOutput:
        """``observed`` (B, 3, R, R), R = 32 or 64: the face as a photo shows it at that size, which the stage
        starting from R takes instead of the previous stage's estimate (restoring a face larger than 16 px: what
        the photo holds beyond the thumbnail is not thrown away); the features still flow from the thumbnail."""
        img, carried = lr, None  # (B, 3, 16, 16)
        images, maps = [], []
        for stage in self.stages:
            if observed is not None and img.shape[-1] == observed.shape[-1]:
                img = observed.to(img.dtype)
            img, hm, carried = stage(img, carried, self._external(img))
            images.append(img)
            if hm is not None:
                maps.append(hm)
        return GeneratorOutput(images, maps)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
