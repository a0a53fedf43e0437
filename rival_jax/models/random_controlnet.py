"""A random ControlNet shaped for a tiny (or any) SD 1.x/2.x or SDXL checkpoint, in either weight format, for tests."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from rival_jax.models.checkpoints import build_diffusers_module, read_json
from rival_jax.models.controlnet import controlnet_class
from rival_jax.models.random_models import WeightFormat, check_weight_format, random_params, save_weights

# Four blocks: the control image is taken down by the VAE's factor of 8.
CONTROLNET_EMBEDDING_CHANNELS = (16, 32, 64, 64)
# Trained ControlNets' zero convolutions are zero no longer: small random ones make the residuals matter.
ZERO_CONV_SCALE = 0.3
# Keeps the control image's signal alive through the conditioning embedding's seven silu layers.
CONDITIONING_GAIN = 2.0


def write_tiny_controlnet(
    folder: str | os.PathLike, base: Path, seed: int = 0, weight_format: WeightFormat = "flax"
) -> Path:
    """Write a random ControlNet folder (diffusers layout) for the UNet of the SD 1.x/2.x or SDXL checkpoint `base`.

    Blocks, channels, head dims, cross-attention size, projections and (SDXL) transformer depths and
    added conditioning are the base UNet's; the zero convolutions get small random weights and the
    conditioning embedding a gain, so that both the residuals and the control image change the UNet's output.
    In the safetensors form its config.json names PyTorch's `ControlNetModel`, as published ones do.

    Args:
        folder: where to write (created if missing).
        base: the checkpoint folder whose `unet/config.json` it is shaped for, e.g. a tiny checkpoint.
        seed: seeds every weight.
        weight_format: 'flax' (msgpack) or 'safetensors' (PyTorch names and layouts).

    >>> write_tiny_controlnet("/tmp/controlnet", tiny_checkpoint(family="sdxl"), weight_format="safetensors")
    """
    folder, base = Path(folder), Path(base)
    check_weight_format(weight_format)
    config = read_json(base / "unet" / "config.json")
    config |= {"conditioning_embedding_out_channels": CONTROLNET_EMBEDDING_CHANNELS}
    module, shapes, _ = build_diffusers_module(controlnet_class(config), config, jnp.float32)
    params = random_params(shapes, jax.random.PRNGKey(seed))
    for name, conv in params["controlnet_cond_embedding"].items():
        conv["kernel"] *= ZERO_CONV_SCALE if name == "conv_out" else CONDITIONING_GAIN
    for conv in [params[name] for name in params if name.startswith("controlnet_down_blocks_")]:
        conv["kernel"] *= ZERO_CONV_SCALE
    params["controlnet_mid_block"]["kernel"] *= ZERO_CONV_SCALE
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "Flax" if weight_format == "flax" else ""
    save_weights(folder, module, params, weight_format, {"_class_name": f"{prefix}ControlNetModel"}, kind="controlnet")
    return folder
