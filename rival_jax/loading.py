"""Loading a diffusers-format Stable Diffusion 1.x folder (or hub id) into Flax modules and params.

Weights may be Flax msgpack or PyTorch safetensors. Safetensors are converted without torch: the
parameter layout comes from `jax.eval_shape` of the Flax module's init (no random model is built),
and the renaming rules are the libraries' own (diffusers for UNet/VAE, transformers for CLIP).
Converted params are cached with orbax-checkpoint under a key that hashes the weights and config,
so a changed checkpoint is never served from a stale cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from rival_jax.ddim import DDIMSchedule
from rival_jax.errors import RivalError

CONVERTER_VERSION = "1"
FLAX_DEPRECATIONS = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")


class _DropFlaxDeprecation(logging.Filter):
    """diffusers 0.39 warns on every Flax module construction (also while tracing); we pin it knowingly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in FLAX_DEPRECATIONS)


def _silence_flax_deprecation() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    handlers = (
        diffusers_logging.get_logger("diffusers").handlers + transformers_logging.get_logger("transformers").handlers
    )
    for handler in handlers:
        if not any(isinstance(f, _DropFlaxDeprecation) for f in handler.filters):
            handler.addFilter(_DropFlaxDeprecation())


_silence_flax_deprecation()
TINY_MARKER = "_rival_jax_tiny"
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DIFFUSERS_WEIGHTS = ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors")
TRANSFORMERS_WEIGHTS = ("flax_model.msgpack", "model.safetensors")


@dataclasses.dataclass(frozen=True)
class LoadedModels:
    """Everything a pipeline needs from one checkpoint: modules, params pytree and where each came from."""

    path: Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    schedule: DDIMSchedule
    params: dict[str, Any]
    sources: dict[str, str]
    random_weights: bool


def default_cache_dir() -> Path:
    """`$RIVAL_JAX_CACHE`, else `$XDG_CACHE_HOME/rival_jax`, else `~/.cache/rival_jax`."""
    if os.environ.get("RIVAL_JAX_CACHE"):
        return Path(os.environ["RIVAL_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rival_jax"


def resolve_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A local diffusers folder as is; a hub id downloaded with huggingface_hub (needs network)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise RivalError(
                f"{path} is not a diffusers model folder (no model_index.json): point at the folder that holds "
                "model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
            )
        return path
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise RivalError(f"model folder {name} does not exist: pass a local diffusers folder or a hub id like org/name")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json"] + [f"{sub}/*.{ext}" for sub in SUBFOLDERS for ext in ("json", "txt")]
    patterns += [f"{sub}/{w}" for sub in ("unet", "vae") for w in DIFFUSERS_WEIGHTS]
    patterns += [f"text_encoder/{w}" for w in TRANSFORMERS_WEIGHTS]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as error:  # any hub/network failure becomes one actionable line
        raise RivalError(
            f"could not fetch {name} from the Hugging Face Hub ({type(error).__name__}; offline?): download it "
            "where you are online and pass the local folder, e.g. --model /path/to/stable-diffusion-v1-5"
        ) from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RivalError(f"{path} is missing: the model folder is incomplete, re-download or re-export it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RivalError(f"{path} is not valid JSON ({error.msg}): re-download the model folder") from None


def _file_digest(*paths: Path) -> str:
    digest = hashlib.sha256(CONVERTER_VERSION.encode())
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:40]


def _check_against_layout(params: dict, shapes: dict, origin: Path) -> dict:
    """Keep the weights the module needs; missing or mis-shaped ones are a checkpoint error."""
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
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|to_out|net)_(\d+)$"
)
FLAX_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def flax_to_pytorch_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Flax params to the PyTorch names and layouts that diffusers/transformers checkpoints use.

    The inverse of `convert_pytorch_state_dict` for SD UNets, VAEs and CLIP text models; used to
    write the tiny checkpoint in the form real checkpoints are published in.
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


def _transformers_rename(pt_key: str, tensor: np.ndarray, layout: dict) -> tuple:
    from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

    return rename_key_and_reshape_tensor(tuple(pt_key.split(".")), tensor, layout, "text_model")


def _build_module(folder: Path, name: str, dtype: jnp.dtype) -> tuple[Any, dict, tuple[str, str], Callable]:
    """The Flax module for one component, its abstract params layout, weight file names and renamer."""
    config = _read_json(folder / name / "config.json")
    if name == "text_encoder":
        from transformers import CLIPTextConfig, FlaxCLIPTextModel

        module = FlaxCLIPTextModel(CLIPTextConfig.from_dict(config), dtype=dtype, _do_init=False)
        return module, module.params_shape_tree, TRANSFORMERS_WEIGHTS, _transformers_rename
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    cls = FlaxUNet2DConditionModel if name == "unet" else FlaxAutoencoderKL
    module = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}, dtype=dtype)
    return module, jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)), DIFFUSERS_WEIGHTS, _diffusers_rename


def load_component(folder: Path, name: str, dtype: jnp.dtype, cache_dir: Path | None) -> tuple[Any, dict, str]:
    """(module, float32 params, source) for 'unet', 'vae' or 'text_encoder'."""
    module, shapes, (flax_file, st_file), rename = _build_module(folder, name, dtype)
    sub = folder / name
    if (sub / flax_file).is_file():
        try:
            params = serialization.msgpack_restore((sub / flax_file).read_bytes())
        except Exception as error:
            raise RivalError(f"{sub / flax_file} is not a Flax msgpack file ({error}): re-export it") from None
        return module, _check_against_layout(params, shapes, sub / flax_file), "flax msgpack"
    if not (sub / st_file).is_file():
        raise RivalError(f"no weights in {sub}: expected {flax_file} (Flax) or {st_file} (PyTorch safetensors)")
    if cache_dir is None:
        state = _read_safetensors(sub / st_file)
        return (
            module,
            _check_against_layout(convert_pytorch_state_dict(state, shapes, rename), shapes, sub),
            "safetensors",
        )
    import orbax.checkpoint as ocp

    entry = (cache_dir / "params" / f"{name}-{_file_digest(sub / st_file, sub / 'config.json')}").absolute()
    checkpointer = ocp.StandardCheckpointer()
    if entry.is_dir():
        target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
        params = jax.tree_util.tree_map(np.asarray, checkpointer.restore(entry, target))
        return module, params, "orbax cache"
    state = _read_safetensors(sub / st_file)
    params = _check_against_layout(convert_pytorch_state_dict(state, shapes, rename), shapes, sub / st_file)
    entry.parent.mkdir(parents=True, exist_ok=True)
    checkpointer.save(entry, params)
    checkpointer.wait_until_finished()
    return module, params, "safetensors (converted, cached)"


def _cast(params: dict, dtype: jnp.dtype) -> dict:
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype=dtype), params)


def load_models(
    name_or_path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, cache_dir: Path | bool | None = True
) -> LoadedModels:
    """Load all components. `cache_dir=True` uses `default_cache_dir()`, `False`/`None` disables the cache."""
    from transformers import CLIPTokenizer

    folder = resolve_model_folder(name_or_path)
    index = _read_json(folder / "model_index.json")
    cache = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
    modules, params, sources = {}, {}, {}
    for name in ("unet", "vae", "text_encoder"):
        modules[name], raw, sources[name] = load_component(folder, name, dtype, cache)
        params[name] = _cast(raw, dtype)
    if not (folder / "tokenizer" / "vocab.json").is_file():
        raise RivalError(f"{folder / 'tokenizer'} has no vocab.json: the model folder is incomplete")
    schedule = DDIMSchedule.from_scheduler_config(_read_json(folder / "scheduler" / "scheduler_config.json"))
    return LoadedModels(
        path=folder,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        schedule=schedule,
        params=params,
        sources=sources,
        random_weights=bool(index.get(TINY_MARKER, False)),
    )
