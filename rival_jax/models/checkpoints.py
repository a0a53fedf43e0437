"""One component's weights: finding the file (plain or variant), reading it, PyTorch-to-Flax conversion, caching.

Weights may be Flax msgpack or PyTorch safetensors. Safetensors are converted without torch: the
parameter layout comes from `jax.eval_shape` of the Flax module's init (no random model is built),
and the renaming rules are the libraries' own (diffusers for UNet/VAE/ControlNet, transformers for CLIP).
Converted params are cached with orbax-checkpoint under a key that hashes the weight file and
config, so a changed checkpoint is never served from a stale cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from rival_jax.errors import RivalError

CONVERTER_VERSION = "1"
DIFFUSERS_WEIGHTS = ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors")
TRANSFORMERS_WEIGHTS = ("flax_model.msgpack", "model.safetensors")
WEIGHTS = {
    "unet": DIFFUSERS_WEIGHTS,
    "vae": DIFFUSERS_WEIGHTS,
    "text_encoder": TRANSFORMERS_WEIGHTS,
    "text_encoder_2": TRANSFORMERS_WEIGHTS,
    "controlnet": DIFFUSERS_WEIGHTS,
}


def read_json(path: Path) -> dict:
    """A config file's contents; a missing or malformed file is a one-line checkpoint error."""
    if not path.is_file():
        raise RivalError(f"{path} is missing: the model folder is incomplete, re-download or re-export it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RivalError(f"{path} is not valid JSON ({error.msg}): re-download the model folder") from None


def variant_file(name: str, variant: str | None) -> str:
    """'model.safetensors' -> 'model.fp16.safetensors' for variant 'fp16'; unchanged without a variant."""
    stem, ext = name.split(".", 1)
    return f"{stem}.{variant}.{ext}" if variant else name


def variant_glob(name: str) -> str:
    """A glob for every variant of one weight file name, e.g. 'model.*.safetensors'."""
    return variant_file(name, "*")


def find_weights(sub: Path, variant: str | None, kind: str | None = None) -> tuple[Path, str | None]:
    """The weight file of component folder `sub` and its variant; Flax msgpack wins over safetensors.

    Without a requested variant the plain file is used, else the only variant present. `kind` is the
    `WEIGHTS` key of the component (default: the folder's name).
    """
    names = WEIGHTS[kind or sub.name]
    if variant is None:
        for name in names:
            if (sub / name).is_file():
                return sub / name, None
        present = sorted({path.name.split(".")[-2] for name in names for path in sub.glob(variant_glob(name))})
        if not present:
            raise RivalError(f"no weights in {sub}: expected {names[0]} (Flax) or {names[1]} (PyTorch safetensors)")
        if len(present) > 1:
            raise RivalError(
                f"{sub} holds only variant weights ({', '.join(present)}): choose one with variant=, e.g. "
                f"variant={present[0]!r}"
            )
        variant = present[0]
    for name in names:
        if (sub / variant_file(name, variant)).is_file():
            return sub / variant_file(name, variant), variant
    found = sorted(path.name for path in sub.iterdir() if path.suffix in (".msgpack", ".safetensors"))
    raise RivalError(
        f"{sub} has no {variant!r} variant weights (found: {', '.join(found) or 'none'}): pick a variant that is "
        "there, or variant=None for the plain weights"
    )


def _file_digest(*paths: Path) -> str:
    digest = hashlib.sha256(CONVERTER_VERSION.encode())
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:40]


def _check_against_layout(params: dict, shapes: dict, origin: Path) -> dict:
    """Keep the weights the module needs, upcast to float32; missing or mis-shaped ones are a checkpoint error."""
    flat, wanted = flatten_dict(params), flatten_dict(shapes)
    missing = [k for k in wanted if k not in flat]
    if missing:
        names = ", ".join("/".join(k) for k in missing[:3])
        raise RivalError(
            f"{origin} lacks {len(missing)} of {len(wanted)} weights its config needs (e.g. {names}): "
            "the checkpoint is empty, truncated or for another model"
        )
    for key, spec in wanted.items():
        if tuple(flat[key].shape) != tuple(spec.shape):
            raise RivalError(
                f"{origin}: weight {'/'.join(key)} has shape {tuple(flat[key].shape)}, the config needs "
                f"{tuple(spec.shape)}: the config.json does not match the weights"
            )
    return unflatten_dict({k: np.asarray(flat[k], dtype=np.float32) for k in wanted})


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise RivalError(f"{path} is not a readable safetensors file ({error}): re-download it") from None
    if not tensors:
        raise RivalError(f"{path} holds no weights: the checkpoint is empty, re-download it")
    return tensors


def convert_pytorch_state_dict(
    state_dict: dict[str, np.ndarray], shapes: dict, rename: Callable[[str, np.ndarray, dict], tuple]
) -> dict:
    """PyTorch names and layouts to a Flax params tree, guided by the module's abstract layout."""
    layout = flatten_dict(shapes)
    converted = {}
    for pt_key, tensor in state_dict.items():
        flax_key, value = rename(pt_key, np.asarray(tensor, dtype=np.float32), layout)
        if flax_key in layout:
            converted[flax_key] = value
    return unflatten_dict(converted)


LIST_CONTAINERS = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|to_out|net"
    r"|controlnet_down_blocks|blocks)_(\d+)$"
)
FLAX_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def flax_to_pytorch_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Flax params to the PyTorch names and layouts that diffusers/transformers checkpoints use.

    The inverse of `convert_pytorch_state_dict` for SD/SDXL UNets, VAEs, ControlNets and CLIP text
    models (with or without projection); used to write tiny checkpoints in the form real ones are published in.
    """
    state = {}
    for path, value in flatten_dict(params).items():
        *modules, leaf = path
        modules = [LIST_CONTAINERS.sub(r"\1.\2", part) for part in modules]
        if modules and modules[-1] in FLAX_ATTENTION_NAMES and leaf in ("kernel", "bias"):
            modules[-1] = FLAX_ATTENTION_NAMES[modules[-1]]
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        if leaf in ("kernel", "scale", "embedding"):
            leaf = "weight"
        state[".".join([*modules, leaf])] = np.ascontiguousarray(value)
    return state


def _diffusers_rename(pt_key: str, tensor: np.ndarray, layout: dict) -> tuple:
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    return rename_key_and_reshape_tensor(tuple(rename_key(pt_key).split(".")), tensor, layout)


def _transformers_rename(pt_key: str, tensor: np.ndarray, layout: dict, prefix: str) -> tuple:
    from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

    return rename_key_and_reshape_tensor(tuple(pt_key.split(".")), tensor, layout, prefix)


def params_layout(module: Any) -> dict:
    """The abstract params tree (shapes, dtypes) of a diffusers UNet/VAE or a transformers CLIP model, uncomputed."""
    if hasattr(module, "params_shape_tree"):
        return module.params_shape_tree
    return jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))


def build_module(folder: Path, name: str, dtype: jnp.dtype) -> tuple[Any, dict, Callable]:
    """The Flax module for one component, its abstract params layout and its PyTorch renamer."""
    config = read_json(folder / name / "config.json")
    if name in ("text_encoder", "text_encoder_2"):
        from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

        cls = FlaxCLIPTextModelWithProjection if name == "text_encoder_2" else FlaxCLIPTextModel
        module = cls(CLIPTextConfig.from_dict(config), dtype=dtype, _do_init=False)
        return module, params_layout(module), functools.partial(_transformers_rename, prefix=cls.base_model_prefix)
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    # Keys the Flax class lacks were vetted by `families.detect_family`.
    return build_diffusers_module(FlaxUNet2DConditionModel if name == "unet" else FlaxAutoencoderKL, config, dtype)


def build_diffusers_module(cls: type, config: dict, dtype: jnp.dtype) -> tuple[Any, dict, Callable]:
    """A diffusers Flax module from a (PyTorch-side) config, its abstract params layout and its PyTorch renamer.

    Keys the Flax class does not take are dropped, since passing them on only makes diffusers warn;
    callers refuse beforehand those whose non-default values the Flax class would get wrong.

    Args:
        cls: the diffusers Flax class, e.g. `FlaxControlNetModel`.
        config: the parsed config.json.
        dtype: the module's compute dtype.

    >>> module, shapes, rename = build_diffusers_module(FlaxControlNetModel, config, jnp.float32)
    """
    fields = {field.name for field in dataclasses.fields(cls)}
    module = cls.from_config({k: v for k, v in config.items() if k in fields}, dtype=dtype)
    return module, params_layout(module), _diffusers_rename


def _source(kind: str, variant: str | None, *details: str) -> str:
    details = (*((f"{variant} variant",) if variant else ()), *details)
    return f"{kind} ({', '.join(details)})" if details else kind


def load_component(
    folder: Path, name: str, dtype: jnp.dtype, cache_dir: Path | None, variant: str | None = None
) -> tuple[Any, dict, str]:
    """(module, float32 params, source) for 'unet', 'vae', 'text_encoder' or 'text_encoder_2'.

    Args:
        folder: the diffusers model folder.
        name: the component (sub-folder) name.
        dtype: the module's compute dtype (params are returned in float32).
        cache_dir: where converted safetensors are cached; None converts on every load.
        variant: weight file variant such as 'fp16'; None for the plain file (or the only variant present).
    """
    module, shapes, rename = build_module(folder, name, dtype)
    return (module, *load_params(folder / name, name, shapes, rename, cache_dir, variant))


def load_params(
    sub: Path, kind: str, shapes: dict, rename: Callable, cache_dir: Path | None, variant: str | None = None
) -> tuple[dict, str]:
    """(float32 params, source) of the component in folder `sub`, converted from safetensors (and cached) if needed.

    Args:
        sub: the component folder (config.json and weights).
        kind: the component's `WEIGHTS` key; also names its cache entries.
        shapes: the module's abstract params layout (`params_layout`).
        rename: the PyTorch-to-Flax renamer (`build_module`, `build_diffusers_module`).
        cache_dir: where converted safetensors are cached; None converts on every load.
        variant: weight file variant such as 'fp16'; None for the plain file (or the only variant present).

    >>> params, source = load_params(folder / "controlnet", "controlnet", shapes, rename, cache_dir=None)
    """
    weights, variant = find_weights(sub, variant, kind)
    if weights.suffix == ".msgpack":
        try:
            params = serialization.msgpack_restore(weights.read_bytes())
        except Exception as error:
            raise RivalError(f"{weights} is not a Flax msgpack file ({error}): re-export it") from None
        return _check_against_layout(params, shapes, weights), _source("flax msgpack", variant)
    if cache_dir is None:
        state = _read_safetensors(weights)
        params = _check_against_layout(convert_pytorch_state_dict(state, shapes, rename), shapes, weights)
        return params, _source("safetensors", variant)
    import orbax.checkpoint as ocp

    entry = (cache_dir / "params" / f"{kind}-{_file_digest(weights, sub / 'config.json')}").absolute()
    checkpointer = ocp.StandardCheckpointer()
    if entry.is_dir():
        target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
        params = jax.tree_util.tree_map(np.asarray, checkpointer.restore(entry, target))
        return params, _source("orbax cache", variant)
    state = _read_safetensors(weights)
    params = _check_against_layout(convert_pytorch_state_dict(state, shapes, rename), shapes, weights)
    entry.parent.mkdir(parents=True, exist_ok=True)
    checkpointer.save(entry, params)
    checkpointer.wait_until_finished()
    return params, _source("safetensors", variant, "converted", "cached")
