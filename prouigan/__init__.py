"""Pro-UIGAN: progressive face hallucination and inpainting from occluded 16x16 thumbnails (plain PyTorch).

Zhang, Yu, Lu, Liu (2021), arXiv:2108.00602.  This package never imports Ray, MLflow, boto3 or pyarrow.
"""

from prouigan.discriminators import PatchDiscriminator, build_discriminators
from prouigan.generator import GeneratorOutput, ProUIGANGenerator, count_parameters
from prouigan.inference import Hallucinator, save_generator
from prouigan.losses import LossWeights, discriminator_loss, generator_loss
from prouigan.presets import PRESETS, GeneratorConfig, generator_config

__all__ = [
    "PRESETS", "GeneratorConfig", "GeneratorOutput", "Hallucinator", "LossWeights", "PatchDiscriminator",
    "ProUIGANGenerator", "build_discriminators", "count_parameters", "discriminator_loss", "generator_config",
    "generator_loss", "save_generator",
]
