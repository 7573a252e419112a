"""Generator size presets.  Constructor arguments of ``ProUIGANGenerator`` are the fields of
``GeneratorConfig``; a config file picks a preset and may override single fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class GeneratorConfig:
    channels: tuple[int, int, int] = (96, 64, 48)  # trunk width of the 16, 32 and 64 px stages
    blocks: tuple[int, int, int] = (3, 2, 2)  # residual blocks per stage trunk
    prior_channels: int = 32  # width of the landmark (prior) branch
    prior_blocks: int = 2  # residual blocks of the prior estimator
    num_points: int = 68  # landmark heatmaps estimated at every stage
    attn_dim: int = 16  # query/key width of the cross-modal attention
    attn_max_tokens: int = 1024  # keys are average-pooled to at most this many positions
    attn_gamma_init: float = 0.1  # initial scale of the attention residuals
    prior_max_size: int = 64  # the prior branch and the attention run on features pooled to at most this size
    fuse_kernel: int = 3  # kernel of the conv fusing attended face and landmark features (1 or 3)
    priors: bool = True  # False: the plain residual CNN baseline (no prior branch, no attention)

    def __post_init__(self):
        """Sizes a generator can be built with on any real machine: a checkpoint's config is input, and a crafted
        one must be a clear error, not a request for terabytes."""
        for name, (lo, hi) in LIMITS.items():
            v = getattr(self, name)
            values = v if isinstance(v, tuple) else (v,)
            if name in ("channels", "blocks") and len(values) != 3:
                raise ValueError(f"generator {name} must be three numbers, got {v!r}")
            for x in values:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not lo <= x <= hi:
                    raise ValueError(f"generator {name} = {v!r} is outside {lo}..{hi}")
        if self.fuse_kernel not in (1, 3):
            raise ValueError(f"generator fuse_kernel must be 1 or 3, got {self.fuse_kernel!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a generator config is a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown generator field(s) {unknown}")
        d = dict(d)
        for k in ("channels", "blocks"):
            if k in d:
                if not isinstance(d[k], (list, tuple)):
                    raise ValueError(f"generator {k} must be three numbers, got {d[k]!r}")
                d[k] = tuple(d[k])
        return cls(**d)


# the bounds every generator config must keep (the paper-sized model is well inside them)
LIMITS: dict[str, tuple[float, float]] = {
    "channels": (1, 2048), "blocks": (0, 64), "prior_channels": (1, 1024), "prior_blocks": (0, 32),
    "num_points": (1, 256), "attn_dim": (1, 1024), "attn_max_tokens": (1, 65536), "attn_gamma_init": (-10, 10),
    "prior_max_size": (1, 128), "fuse_kernel": (1, 3),
}


PRESETS: dict[str, GeneratorConfig] = {
    # unit tests and smoke runs: seconds on a CPU
    "tiny": GeneratorConfig(channels=(16, 16, 8), blocks=(1, 1, 1), prior_channels=8, prior_blocks=1,
                            attn_dim=8, attn_max_tokens=256),
    # ~1.45M parameters, trains on 2 CPU cores within an hour.  Width sits in the cheap 16 and 32 px stages, and
    # the 64 px stage estimates its priors on 32x32 pooled features: chosen by equal-time ablations
    # (BENCHMARKS.md), where the first cpu-small shape (96,64,48)/(3,2,2) ran at half the plain CNN's samples/s
    "cpu-small": GeneratorConfig(channels=(96, 64, 32), blocks=(4, 3, 1), attn_max_tokens=256, prior_max_size=32,
                                 fuse_kernel=1),
    # the ablation baseline: the same progressive residual trunk with no priors and no attention, widened to
    # about cpu-small's parameter count; trained with L1 only and no discriminators (configs/cpu-small-plain)
    "cpu-small-plain": GeneratorConfig(channels=(112, 80, 56), blocks=(3, 2, 2), priors=False),
    # the paper-sized model for GPUs
    "gpu-paper": GeneratorConfig(channels=(256, 128, 64), blocks=(6, 4, 3), prior_channels=128, prior_blocks=4,
                                 attn_dim=64, attn_max_tokens=1024),
}


def generator_config(preset: str, overrides: dict | None = None) -> GeneratorConfig:
    """A preset with some fields changed.  Unknown names raise with the list of what exists."""
    if preset not in PRESETS:
        raise KeyError(f"unknown generator preset '{preset}'; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    overrides = dict(overrides or {})
    known = {f.name for f in fields(GeneratorConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KeyError(f"unknown generator field(s) {unknown}; known: {', '.join(sorted(known))}")
    for k in ("channels", "blocks"):
        if k in overrides:
            v = overrides[k]
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(i, int) and i > 0 for i in v)):
                raise ValueError(f"{k} must be three positive integers, got {v!r}")
            overrides[k] = tuple(v)
    return replace(cfg, **overrides)
