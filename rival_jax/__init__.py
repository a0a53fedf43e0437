"""RIVAL (NeurIPS 2023) in JAX/Flax: real-world image variation by aligning the diffusion inversion chain."""

from importlib import resources
from pathlib import Path

from rival_jax.config import RivalConfig
from rival_jax.errors import RivalError
from rival_jax.options import RunOptions
from rival_jax.pipeline import ExemplarGroup, InversionChain, RandomWeightsWarning, Request, RivalOutput, RivalPipeline


def example_image() -> Path:
    """The photograph shipped with the package: the CLI's default exemplar, for trying the API.

    Example:
        >>> import rival_jax
        >>> pipe = rival_jax.RivalPipeline.from_pretrained("tiny")
        >>> chain = pipe.invert(rival_jax.example_image(), num_inference_steps=10)
    """
    return Path(str(resources.files("rival_jax") / "assets" / "exemplar.png"))


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
