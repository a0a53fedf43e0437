"""The pipeline: a checkpoint, its compiled programs (`programs`), input preparation (`inputs`), prompts,
ControlNet maps (`control_maps`) and what it returns (`results`)."""

from rival_jax.pipeline.inputs import Request
from rival_jax.pipeline.pipeline import TINY_MODELS, RandomWeightsWarning, RivalPipeline, random_weights_notice
from rival_jax.pipeline.results import ExemplarGroup, InversionChain, RivalOutput

__all__ = [
    "TINY_MODELS",
    "ExemplarGroup",
    "InversionChain",
    "RandomWeightsWarning",
    "Request",
    "RivalOutput",
    "RivalPipeline",
    "random_weights_notice",
]
