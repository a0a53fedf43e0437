"""The models `benchmark.py` runs on: a checkpoint, or a family's full architecture with random weights, and
ControlNets with random weights shaped for its UNet (for full SDXL: diffusers' controlnet-canny-sdxl-1.0)."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from rival_jax import RivalPipeline, RunOptions
from rival_jax.models.checkpoints import build_diffusers_module
from rival_jax.models.controlnet import LoadedControlNet, check_controlnet, controlnet_class
from rival_jax.models.loading import LoadedModels
from rival_jax.models.random_models import random_full_models, random_params
from rival_jax.options import FIELDS, resolve_dtype

# The conditioning embedding of diffusers' ControlNetModel (and of controlnet-canny-sdxl-1.0).
CONTROLNET_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def random_controlnet(models: LoadedModels, dtype: jnp.dtype, seed: int = 1) -> LoadedControlNet:
    """A ControlNet with random weights, in memory, shaped for `models`' UNet as published ControlNets are.

    Its blocks, channels, heads, transformer depths and added conditioning are the UNet's; for the full
    SDXL base architecture that is controlnet-canny-sdxl-1.0's config.

    Args:
        models: the base model (its UNet's config).
        dtype: dtype of the ControlNet's computation and of its params.
        seed: seeds every weight.

    >>> controlnet = random_controlnet(random_full_models("sdxl", jnp.bfloat16), jnp.bfloat16)
    """
    config = dict(models.unet.config) | {"conditioning_embedding_out_channels": CONTROLNET_EMBEDDING_CHANNELS}
    module, shapes, _ = build_diffusers_module(controlnet_class(config), config, dtype)
    params = random_params(shapes, jax.random.PRNGKey(seed), lambda leaf: jnp.asarray(leaf, dtype))
    controlnet = LoadedControlNet(Path(f"random-controlnet-{models.family}"), module, params, "random")
    check_controlnet(controlnet, models)
    return controlnet


def load_pipeline(args: argparse.Namespace) -> RivalPipeline:
    """The pipeline on `--family` (random full architecture) or `--model`, with the run options given;
    `--random-controlnet` adds a random ControlNet shaped for its UNet to the ones `--controlnet` loads."""
    options = RunOptions(**{name: value for name, value in vars(args).items() if name in FIELDS})
    if args.family:
        pipe = RivalPipeline(random_full_models(args.family, resolve_dtype(options.dtype)), options)
    else:
        pipe = RivalPipeline.from_pretrained(args.model, options)
    if not args.random_controlnet:
        return pipe
    controlnet = random_controlnet(pipe.models, pipe.dtype)
    return RivalPipeline(pipe.models, options, (*pipe.controlnets, controlnet))
