"""Pro-UIGAN: progressive face hallucination and inpainting from occluded 16x16 thumbnails (plain PyTorch).

Zhang, Yu, Lu, Liu (2021), arXiv:2108.00602.  This package never imports Ray, MLflow, boto3 or pyarrow.
The names below load on first use, so the numpy-only modules (align, occlusion, synthetic) stay light in
data-loading processes that never touch torch.
"""

from importlib import import_module

_EXPORTS = {
    "PatchDiscriminator": "discriminators", "build_discriminators": "discriminators",
    "GeneratorOutput": "generator", "ProUIGANGenerator": "generator", "count_parameters": "generator",
    "Hallucinator": "inference", "save_generator": "inference",
    "LossWeights": "losses", "discriminator_loss": "losses", "generator_loss": "losses",
    "PRESETS": "presets", "GeneratorConfig": "presets", "generator_config": "presets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"prouigan.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'prouigan' has no attribute {name!r}")
