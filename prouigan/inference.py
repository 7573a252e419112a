"""Load a generator checkpoint and map batches of 16x16 faces to 128x128 faces (eval mode, no autograd)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prouigan.generator import GeneratorOutput, ProUIGANGenerator, unwrap
from prouigan.presets import GeneratorConfig

CHECKPOINT_FORMAT = "prouigan-generator/1"
# a generator of more parameters than this is refused before it is built: every field of a crafted config can be
# within its own bound while their product asks for tens of GB (gpu-paper has 15.6 M, cpu-small 1.45 M)
MAX_PARAMETERS = 200_000_000


def generator_state(generator: ProUIGANGenerator) -> dict:
    """What a generator checkpoint holds: weights + the architecture arguments to rebuild it."""
    g = unwrap(generator)
    return {"format": CHECKPOINT_FORMAT, "generator_config": g.cfg.to_dict(),
            "generator": {k: v.detach().cpu() for k, v in g.state_dict().items()}}


def save_generator(generator: ProUIGANGenerator, path: str | Path) -> None:
    torch.save(generator_state(generator), path)


def check_shapes(cfg: GeneratorConfig, weights: dict, where: str = "the checkpoint") -> None:
    """Before a generator is built for real: its parameter count is bounded (``MAX_PARAMETERS``) and the
    checkpoint's tensors have the shapes the config asks for, checked on a generator built on the meta device (no
    memory).  ValueError naming the first difference."""
    with torch.device("meta"):
        g = ProUIGANGenerator(cfg)
    n = sum(p.numel() for p in g.parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"{where}: its generator config asks for {n / 1e6:,.0f} M parameters (the limit is "
                         f"{MAX_PARAMETERS / 1e6:.0f} M): refused before building it")
    want = g.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(want):
        missing, extra = sorted(set(want) - set(weights or {})), sorted(set(weights or {}) - set(want))
        raise ValueError(f"{where}: its weights do not match its generator config (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for k, t in want.items():
        got = weights[k]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(t.shape):
            raise ValueError(f"{where}: weight {k} is {tuple(getattr(got, 'shape', ()))}, its generator config "
                             f"makes it {tuple(t.shape)}")


class Hallucinator:
    """``Hallucinator.load(path)(lr)``: lr is (B, 3, 16, 16) float in [0, 1] or (B, 16, 16, 3) uint8."""

    def __init__(self, generator: ProUIGANGenerator, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Hallucinator:
        """A file saved by ``save_generator`` or a training checkpoint that holds the same keys."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "generator" not in state or "generator_config" not in state:
            raise ValueError(f"{path} is not a Pro-UIGAN generator checkpoint (no 'generator'/'generator_config')")
        cfg = GeneratorConfig.from_dict(state["generator_config"])
        check_shapes(cfg, state["generator"], str(path))
        g = ProUIGANGenerator(cfg)
        g.load_state_dict(state["generator"])
        return cls(g, device)

    @staticmethod
    def to_tensor(lr) -> torch.Tensor:
        if isinstance(lr, np.ndarray):
            lr = torch.from_numpy(np.ascontiguousarray(lr))
        if lr.dtype == torch.uint8:
            lr = lr.float() / 255
            if lr.shape[-1] == 3:
                lr = lr.permute(0, 3, 1, 2)
        if lr.dim() != 4 or tuple(lr.shape[1:]) != (3, 16, 16):
            raise ValueError(f"expected a batch of 16x16 RGB faces, got shape {tuple(lr.shape)}")
        return lr.float()

    @torch.inference_mode()
    def run(self, lr, batch_size: int = 64, observed: torch.Tensor | None = None) -> GeneratorOutput:
        """Every stage's images (clamped to [0, 1]) and heatmaps, on CPU.  ``observed``: see
        ``ProUIGANGenerator.forward``."""
        x = self.to_tensor(lr)
        obs = lambda i: None if observed is None else observed[i:i + batch_size].to(self.device)  # noqa: E731
        outs = [self.generator(x[i:i + batch_size].to(self.device), obs(i)) for i in range(0, len(x), batch_size)]
        images = [torch.cat([o.images[s] for o in outs]).clamp(0, 1).cpu() for s in range(3)]
        maps = [torch.cat([o.heatmaps[s] for o in outs]).float().cpu() for s in range(len(outs[0].heatmaps))]
        return GeneratorOutput(images, maps)

    @torch.inference_mode()
    def __call__(self, lr, batch_size: int = 64) -> torch.Tensor:
        """(B, 3, 128, 128) float in [0, 1]: the final stage only (the others and the heatmaps are dropped batch by
        batch, so a large request holds one batch's worth of them at a time)."""
        x = self.to_tensor(lr)
        return torch.cat([self.generator(x[i:i + batch_size].to(self.device)).images[-1].clamp(0, 1).cpu()
                          for i in range(0, len(x), batch_size)])

    def to_uint8(self, lr, batch_size: int = 64) -> np.ndarray:
        """(B, 128, 128, 3) uint8."""
        return (self(lr, batch_size).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
