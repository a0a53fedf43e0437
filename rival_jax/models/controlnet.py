"""Loading diffusers ControlNet checkpoints: SD 1.x/2.x ones into `FlaxControlNetModel`, SDXL ones into ours.

SDXL ControlNets (`addition_embed_type="text_time"`: the canny/depth SDXL 1.0 layout and its smaller
variants with fewer transformer layers) load into `controlnet_sdxl.FlaxControlNetSDXLModel`.

A ControlNet is a diffusers model folder (config.json and Flax msgpack or PyTorch safetensors
weights, plain or a variant), or a pipeline folder holding one in `controlnet/`, locally or on the
Hub. Its weights are found, converted and cached like the base model's (`checkpoints.load_params`).
Configs the Flax class would silently compute differently from PyTorch are refused before any
weights are read.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from rival_jax.errors import RivalError
from rival_jax.models.checkpoints import (
    DIFFUSERS_WEIGHTS,
    build_diffusers_module,
    load_params,
    read_json,
    variant_file,
    variant_glob,
)
from rival_jax.models.families import UNET_DEFAULTS
from rival_jax.models.loading import LoadedModels, _cast, _snapshot
from rival_jax.runtime import default_cache_dir

# Settings diffusers' FlaxControlNetModel ignores (it always computes the default) though they change the model.
CONTROLNET_DEFAULTS = UNET_DEFAULTS | {
    "conditioning_channels": 3,
    "global_pool_conditions": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
CHANNEL_ORDERS = ("rgb", "bgr")
# Three stride-2 convolutions take the control image down by the VAE's factor of 8.
EMBEDDING_BLOCKS = 4
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
# What the ControlNet's residuals (and for SDXL its added conditioning) must share with the base UNet.
MATCHED = ("in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block")
MATCHED_SDXL = (*MATCHED, "addition_time_embed_dim", "projection_class_embeddings_input_dim")


@dataclasses.dataclass(frozen=True)
class LoadedControlNet:
    """A ControlNet ready to run: its folder, Flax module (with dtype), params (cast to dtype) and weight source."""

    path: Path
    module: Any
    params: dict
    source: str


def _config_folder(path: Path) -> Path:
    """The folder that holds the ControlNet's config.json: `path` itself or its `controlnet/` sub-folder."""
    if not path.is_dir():
        raise RivalError(
            f"{path} is not a folder: pass a diffusers ControlNet folder (config.json and "
            f"{DIFFUSERS_WEIGHTS[1]}); single-file ControlNets are not supported"
        )
    for folder in (path, path / "controlnet"):
        if (folder / "config.json").is_file():
            return folder
    raise RivalError(
        f"{path} has no config.json (nor controlnet/config.json): point at a diffusers ControlNet folder, "
        "e.g. a download of lllyasviel/sd-controlnet-canny"
    )


def is_sdxl(config: dict) -> bool:
    """Whether a ControlNet config.json is an SDXL one (SDXL's `text_time` added conditioning)."""
    return config.get("addition_embed_type") == "text_time"


def _refuse_unsupported(folder: Path, config: dict) -> None:
    """One-line RivalError for a config that is no SD 1.x/2.x/SDXL ControlNet or that we would compute wrongly."""
    found = config.get("_class_name", "ControlNetModel")
    if found.removeprefix("Flax") != "ControlNetModel":
        raise RivalError(
            f"{folder} holds a {found}, not a ControlNetModel: pass an SD 1.x/2.x or SDXL ControlNet folder"
        )
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise RivalError(
            f"{folder} has addition_embed_type={addition!r}: only SD 1.x/2.x (none) and SDXL ('text_time') "
            "ControlNets are supported"
        )
    defaults = CONTROLNET_DEFAULTS.items()
    unsupported = [(key, config[key]) for key, default in defaults if config.get(key, default) != default]
    order = config.get("controlnet_conditioning_channel_order", "rgb")
    if order not in CHANNEL_ORDERS:
        unsupported.append(("controlnet_conditioning_channel_order", order))
    blocks = config.get("down_block_types", DOWN_BLOCKS)
    if any(block not in DOWN_BLOCKS for block in blocks):
        unsupported.append(("down_block_types", blocks))
    given = config.get("transformer_layers_per_block", 1)
    layers = given if isinstance(given, list) else [given]
    sdxl_layers = len(layers) == (len(blocks) if isinstance(given, list) else 1)
    sdxl_layers &= all(isinstance(count, int) and count >= 0 for count in layers)
    if not (sdxl_layers if is_sdxl(config) else all(count == 1 for count in layers)):
        unsupported.append(("transformer_layers_per_block", given))
    embedding = config.get("conditioning_embedding_out_channels", [16, 32, 96, 256])
    if len(embedding) != EMBEDDING_BLOCKS:
        unsupported.append(("conditioning_embedding_out_channels", embedding))
    if unsupported:
        key, value = unsupported[0]
        kind = "SDXL" if is_sdxl(config) else "SD 1.x/2.x"
        raise RivalError(
            f"{folder} sets {key}={value!r}, which rival-jax's Flax ControlNets cannot honour: use a ControlNet "
            f"with the standard {kind} settings"
        )


def resolve_controlnet_folder(name_or_path: str | os.PathLike, variant: str | None = None) -> Path:
    """The folder holding a ControlNet's config.json and weights; a hub id is downloaded with huggingface_hub.

    An unsupported ControlNet is refused from its config alone: a hub download fetches the config
    first, before any weights are fetched; then the weights (of `variant` if given, else the plain
    files, or every variant's where there is no plain file).

    Args:
        name_or_path: a local ControlNet folder, a pipeline folder with `controlnet/`, or a hub id (org/name).
        variant: weight file variant to download, e.g. 'fp16'.

    >>> resolve_controlnet_folder("lllyasviel/sd-controlnet-canny")
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        folder = _config_folder(path)
        _refuse_unsupported(folder, read_json(folder / "config.json"))
        return folder
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise RivalError(
            f"ControlNet folder {name} does not exist: pass a local diffusers ControlNet folder or a hub id like "
            "lllyasviel/sd-controlnet-canny"
        )
    root = _snapshot(name, ["config.json", "controlnet/config.json"])
    folder = _config_folder(root)
    _refuse_unsupported(folder, read_json(folder / "config.json"))
    prefix = "" if folder == root else "controlnet/"
    root = _snapshot(name, [prefix + variant_file(file, variant) for file in DIFFUSERS_WEIGHTS])
    if variant is None and not any((root / prefix / file).is_file() for file in DIFFUSERS_WEIGHTS):
        root = _snapshot(name, [prefix + variant_glob(file) for file in DIFFUSERS_WEIGHTS])
    return root / prefix


def load_controlnet(
    name_or_path: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    cache_dir: Path | bool | None = True,
    variant: str | None = None,
) -> LoadedControlNet:
    """Load an SD 1.x/2.x ControlNet into diffusers' `FlaxControlNetModel`, an SDXL one into `FlaxControlNetSDXLModel`.

    Args:
        name_or_path: a local ControlNet folder, a pipeline folder with `controlnet/`, or a hub id.
        dtype: dtype of the module's computation and of the returned params.
        cache_dir: where converted safetensors are cached; True uses `default_cache_dir()`, False/None disables it.
        variant: weight file variant such as 'fp16' (read and upcast); None reads the plain weight file, or the
            only variant where there is no plain file.

    >>> controlnet = load_controlnet("lllyasviel/sd-controlnet-canny", dtype=jnp.bfloat16)
    """
    cache = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
    folder = resolve_controlnet_folder(name_or_path, variant)
    config = read_json(folder / "config.json")
    module, shapes, rename = build_diffusers_module(controlnet_class(config), config, dtype)
    params, source = load_params(folder, "controlnet", shapes, rename, cache, variant)
    return LoadedControlNet(path=folder, module=module, params=_cast(params, dtype), source=source)


def controlnet_class(config: dict) -> type:
    """The Flax class of a (vetted) ControlNet config.json: ours for SDXL, diffusers' for SD 1.x/2.x."""
    if is_sdxl(config):
        from rival_jax.models.controlnet_sdxl import FlaxControlNetSDXLModel

        return FlaxControlNetSDXLModel
    from diffusers import FlaxControlNetModel

    return FlaxControlNetModel


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def check_controlnet(controlnet: LoadedControlNet, models: LoadedModels) -> None:
    """Refuse, with one line, a ControlNet whose residuals do not fit the base model's UNet.

    Args:
        controlnet: the loaded ControlNet.
        models: the loaded base model.

    >>> check_controlnet(load_controlnet("lllyasviel/sd-controlnet-canny"), load_models("/models/sd-v1-5"))
    """
    net, unet = controlnet.module, models.unet
    sdxl = models.family == "sdxl"
    if sdxl != (getattr(net, "addition_embed_type", None) == "text_time"):
        kinds = ("an SDXL", "an SD 1.x/2.x") if sdxl else ("an SD 1.x/2.x", "an SDXL")
        raise RivalError(
            f"{models.path} is {kinds[0]} base model but ControlNet {controlnet.path} is {kinds[1]} ControlNet: "
            "use a ControlNet trained for this base model's family"
        )
    for key in MATCHED_SDXL if sdxl else MATCHED:
        ours, theirs = _as_tuple(getattr(net, key)), _as_tuple(getattr(unet, key))
        if ours != theirs:
            raise RivalError(
                f"ControlNet {controlnet.path} has {key} {ours} but the UNet of {models.path} has {theirs}: "
                "use a ControlNet trained for this base model (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048 cross-attention)"
            )
