"""RIVAL (NeurIPS 2023) in JAX/Flax: real-world image variation by aligning the diffusion inversion chain."""

from rival_jax.config import RivalConfig
from rival_jax.errors import RivalError
from rival_jax.images import example_image
from rival_jax.options import RunOptions
from rival_jax.pipeline import ExemplarGroup, InversionChain, RandomWeightsWarning, Request, RivalOutput, RivalPipeline

__all__ = [
    "ExemplarGroup",
    "InversionChain",
    "RandomWeightsWarning",
    "Request",
    "RivalConfig",
    "RivalError",
    "RivalOutput",
    "RivalPipeline",
    "RunOptions",
    "example_image",
]
