"""Loading a diffusers-format Stable Diffusion folder (or hub id) of any supported family into Flax modules and params.

The family (SD 1.x, SD 2.x, SDXL base) is read from the configs (`rival_jax.models.families`); each
component's weights are found, converted and cached by `rival_jax.models.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax.core.ddim import DDIMSchedule
from rival_jax.errors import RivalError
from rival_jax.models.checkpoints import WEIGHTS, load_component, read_json, variant_file, variant_glob
from rival_jax.models.families import TEXT_COMPONENTS, detect_family
from rival_jax.runtime import default_cache_dir

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
CONFIG_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclasses.dataclass(frozen=True)
class LoadedModels:
    """Everything a pipeline needs from one checkpoint: modules, params pytree and where each came from.

    `text_encoders`/`tokenizers` hold one entry for SD 1.x/2.x and two (CLIP-L, then OpenCLIP-bigG
    with projection) for SDXL; `params` has a key per module: unet, vae, text_encoder[, text_encoder_2].
    """

    path: Path
    family: str
    unet: Any
    vae: Any
    text_encoders: tuple
    tokenizers: tuple
    schedule: DDIMSchedule
    params: dict[str, Any]
    sources: dict[str, str]
    random_weights: bool
    force_zeros_for_empty_prompt: bool


def _snapshot(name: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as error:  # any hub/network failure becomes one actionable line
        raise RivalError(
            f"could not fetch {name} from the Hugging Face Hub ({type(error).__name__}; offline?): download it "
            "where you are online and pass the local folder, e.g. --model /path/to/stable-diffusion-v1-5"
        ) from None


def resolve_model_folder(name_or_path: str | os.PathLike, variant: str | None = None) -> Path:
    """A local diffusers folder as is; a hub id downloaded with huggingface_hub (needs network).

    A hub download fetches the configs first and refuses an unsupported checkpoint before any
    weights are fetched; then the weights of the family's components (of `variant` if given,
    else the plain files, or every variant's where a component has no plain file).

    Args:
        name_or_path: a local diffusers folder or a hub id (org/name).
        variant: weight file variant to download, e.g. 'fp16'.
    """
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
    folder = _snapshot(
        name, ["model_index.json"] + [f"{sub}/*.{ext}" for sub in CONFIG_FOLDERS for ext in ("json", "txt")]
    )
    family = detect_family(folder, read_json(folder / "model_index.json"))
    components = ("unet", "vae", *(encoder for encoder, _ in TEXT_COMPONENTS[family]))
    folder = _snapshot(name, [f"{sub}/{variant_file(file, variant)}" for sub in components for file in WEIGHTS[sub]])
    bare = [sub for sub in components if not any((folder / sub / file).is_file() for file in WEIGHTS[sub])]
    if variant is None and bare:
        folder = _snapshot(name, [f"{sub}/{variant_glob(file)}" for sub in bare for file in WEIGHTS[sub]])
    return folder


def _cast(params: dict, dtype: jnp.dtype) -> dict:
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype=dtype), params)


def load_models(
    name_or_path: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    cache_dir: Path | bool | None = True,
    variant: str | None = None,
    base_model: str | os.PathLike | None = None,
) -> LoadedModels:
    """Load every component of an SD 1.x, SD 2.x or SDXL base checkpoint.

    Args:
        name_or_path: a local diffusers folder, a hub id, or a single-file checkpoint in the original
            layout (`.safetensors`), converted once into a diffusers folder (`single_file`).
        dtype: dtype of the modules' computation and of the returned params.
        cache_dir: where converted safetensors are cached; True uses `default_cache_dir()`, False/None disables it.
        variant: weight file variant such as 'fp16' (read and upcast); None reads the plain weight files, or
            a component's only variant where it has no plain file.
        base_model: for a single-file checkpoint, the diffusers folder or hub id of the same family whose
            configs, scheduler and tokenizers it uses (single files carry none).

    >>> models = load_models("/models/stable-diffusion-xl-base-1.0", dtype=jnp.bfloat16, variant="fp16")
    """
    from transformers import CLIPTokenizer

    cache = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
    if Path(name_or_path).expanduser().is_file():
        from rival_jax.models.single_file import convert_single_file

        base = resolve_model_folder(base_model) if base_model is not None else None
        name_or_path = convert_single_file(Path(name_or_path).expanduser(), base, cache_dir=cache)
    folder = resolve_model_folder(name_or_path, variant)
    index = read_json(folder / "model_index.json")
    family = detect_family(folder, index)
    schedule = DDIMSchedule.from_scheduler_config(read_json(folder / "scheduler" / "scheduler_config.json"))
    encoders, tokenizers = zip(*TEXT_COMPONENTS[family], strict=True)
    for tokenizer in tokenizers:
        if not (folder / tokenizer / "vocab.json").is_file():
            raise RivalError(f"{folder / tokenizer} has no vocab.json: the model folder is incomplete")
    modules, params, sources = {}, {}, {}
    for name in ("unet", "vae", *encoders):
        modules[name], raw, sources[name] = load_component(folder, name, dtype, cache, variant)
        params[name] = _cast(raw, dtype)
    return LoadedModels(
        path=folder,
        family=family,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoders=tuple(modules[name] for name in encoders),
        tokenizers=tuple(CLIPTokenizer.from_pretrained(str(folder / name)) for name in tokenizers),
        schedule=schedule,
        params=params,
        sources=sources,
        random_weights=bool(index.get(TINY_MARKER, False)),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )
