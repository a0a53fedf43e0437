"""RIVAL (NeurIPS 2023) in JAX/Flax: real-world image variation by aligning the diffusion inversion chain."""

from rival_jax.config import RivalConfig
from rival_jax.errors import RivalError
from rival_jax.options import RunOptions
from rival_jax.outputs import InversionChain, RivalOutput
from rival_jax.pipeline import RivalPipeline

__all__ = ["InversionChain", "RivalConfig", "RivalError", "RivalOutput", "RivalPipeline", "RunOptions"]
