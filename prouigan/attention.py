"""Cross-modal attention between face features and landmark (prior) features.

Face features give the queries, landmark features the keys, both projected by 1x1 convs to a small
width d.  One logit map S = Q^T K / sqrt(d) links every face position to every landmark position:
  - landmark features are enhanced by the face values that each landmark position attends to
    (softmax of S^T over face positions), plus a residual;
  - face features are enhanced by the landmark values that each face position attends to
    (softmax of S over landmark positions), plus a residual.
Both directions run through ``scaled_dot_product_attention`` (flash / memory-efficient kernels, no
N x N map kept for backward on GPU).  At 64x64 a full map would be 4096 x 4096 per head; the landmark
side is average-pooled to at most ``max_tokens`` positions (1024 = 32x32), and the landmark update is
computed on that pooled grid and upsampled back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CrossModalAttention(nn.Module):
    def __init__(self, face_channels: int, prior_channels: int, dim: int = 16, max_tokens: int = 1024,
                 gamma_init: float = 0.1):
        super().__init__()
        self.q = nn.Conv2d(face_channels, dim, 1)  # face -> queries
        self.k = nn.Conv2d(prior_channels, dim, 1)  # landmarks -> keys
        self.v_face = nn.Conv2d(face_channels, prior_channels, 1)  # face values, enhance landmarks
        self.v_prior = nn.Conv2d(prior_channels, face_channels, 1)  # landmark values, enhance face
        self.gamma_face = nn.Parameter(torch.tensor(float(gamma_init)))
        self.gamma_prior = nn.Parameter(torch.tensor(float(gamma_init)))
        self.max_tokens = max_tokens

    def key_grid(self, h: int, w: int) -> tuple[int, int]:
        """Size of the pooled landmark grid for an h x w feature map."""
        f = max(1, math.ceil(math.sqrt(h * w / self.max_tokens)))
        return h // f, w // f

    def forward(self, face: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = face.shape
        kh, kw = self.key_grid(h, w)
        prior_small = F.adaptive_avg_pool2d(prior, (kh, kw)) if (kh, kw) != (h, w) else prior
        q = self.q(face).flatten(2).transpose(1, 2)[:, None]  # (B, 1, N, d)   N = h*w face positions
        k = self.k(prior_small).flatten(2).transpose(1, 2)[:, None]  # (B, 1, M, d)   M = kh*kw
        v_prior = self.v_prior(prior_small).flatten(2).transpose(1, 2)[:, None]  # (B, 1, M, Cf)
        v_face = self.v_face(face).flatten(2).transpose(1, 2)[:, None]  # (B, 1, N, Cp)

        face_upd = F.scaled_dot_product_attention(q, k, v_prior)  # softmax over landmark positions
        prior_upd = F.scaled_dot_product_attention(k, q, v_face)  # the transposed map: over face positions
        face_upd = face_upd[:, 0].transpose(1, 2).reshape(b, -1, h, w)
        prior_upd = prior_upd[:, 0].transpose(1, 2).reshape(b, -1, kh, kw)
        if (kh, kw) != (h, w):
            prior_upd = F.interpolate(prior_upd, size=(h, w), mode="bilinear", align_corners=False)
        return face + self.gamma_face * face_upd, prior + self.gamma_prior * prior_upd

    @staticmethod
    def map_bytes(n_queries: int, n_keys: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Bytes a materialised logit map would take (what SDPA's fused kernels avoid storing)."""
        return batch * n_queries * n_keys * dtype_bytes
