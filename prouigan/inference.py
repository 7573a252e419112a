"""Load a generator checkpoint and map batches of 16x16 faces to 128x128 faces (eval mode, no autograd)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prouigan.generator import GeneratorOutput, ProUIGANGenerator, unwrap
from prouigan.presets import GeneratorConfig

CHECKPOINT_FORMAT = "prouigan-generator/1"


def generator_state(generator: ProUIGANGenerator) -> dict:
    """What a generator checkpoint holds: weights + the architecture arguments to rebuild it."""
    g = unwrap(generator)
    return {"format": CHECKPOINT_FORMAT, "generator_config": g.cfg.to_dict(),
            "generator": {k: v.detach().cpu() for k, v in g.state_dict().items()}}


def save_generator(generator: ProUIGANGenerator, path: str | Path) -> None:
    torch.save(generator_state(generator), path)


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
        g = ProUIGANGenerator(GeneratorConfig.from_dict(state["generator_config"]))
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

    def __call__(self, lr, batch_size: int = 64) -> torch.Tensor:
        """(B, 3, 128, 128) float in [0, 1]."""
        return self.run(lr, batch_size).final

    def to_uint8(self, lr, batch_size: int = 64) -> np.ndarray:
        """(B, 128, 128, 3) uint8."""
        return (self(lr, batch_size).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
