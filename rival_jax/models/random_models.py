"""Randomly initialised Stable Diffusion models of every family (SD 1.x, SD 2.x, SDXL), built by the package itself.

- The built-in **tiny checkpoints**: every part a real checkpoint of the family has (UNet, a
  4-block VAE with the real 8x downsampling, one or two CLIP text models, working byte-level BPE
  tokenizers, the family's scheduler config), written in either weight format, so the whole
  pipeline and both loading paths run anywhere in seconds; and a **tiny ControlNet** for the
  SD 1.x/2.x ones (`write_tiny_controlnet`).
- The **full architectures** (SD 1.5, SD 2.1, SDXL base 1.0) in memory (`random_full_models`), so
  speed and memory can be measured without downloading weights.

Their weights are random: their images are noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rival_jax.core.ddim import DDIMSchedule
from rival_jax.errors import RivalError
from rival_jax.files import write_folder_atomic
from rival_jax.models.architectures import FULL, SCHEDULER_CONFIG, TINY, Architecture
from rival_jax.models.checkpoints import (
    WEIGHTS,
    flax_to_pytorch_state_dict,
    params_layout,
)
from rival_jax.models.families import FAMILIES, TEXT_COMPONENTS
from rival_jax.models.loading import TINY_MARKER, LoadedModels
from rival_jax.runtime import default_cache_dir

__all__ = [
    "SCHEDULER_CONFIG",
    "TINY_VERSION",
    "WeightFormat",
    "build_modules",
    "check_weight_format",
    "random_full_models",
    "random_params",
    "save_weights",
    "tiny_checkpoint",
    "write_tiny_checkpoint",
]

TINY_VERSION = "1"
WeightFormat = Literal["flax", "safetensors"]
TOKENIZER_WORDS = (
    *("a", "photo", "of", "the", "cat", "dog", "painting", "in", "style", "portrait", "landscape", "watercolor"),
    *("oil", "mountain", "sky", "sunset", "red", "blue", "green", "house", "tree", "river", "flower"),
)
# SDXL's second tokenizer pads with "!" instead of the end-of-text token.
PAD_TOKENS = {"tokenizer": None, "tokenizer_2": "!"}
TEXT_ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
# Output layers rescaled so latents and noise predictions are O(1), like a trained model's.
VAE_QUANT_SCALE = 10.0
UNET_OUT_SCALE = 1.6
# Normals per draw; threefry needs about 3x the draw in temporaries, too much for an SDXL UNet in one go.
MAX_DRAW = 1 << 27


def _normal_stream(key: jax.Array, size: int) -> Iterator[np.ndarray]:
    """`size` standard normals in chunks of at most MAX_DRAW (one draw from `key` when it fits in one)."""
    if size <= MAX_DRAW:
        yield np.asarray(jax.random.normal(key, (size,), dtype=np.float32))
        return
    for i, start in enumerate(range(0, size, MAX_DRAW)):
        yield np.asarray(jax.random.normal(jax.random.fold_in(key, i), (min(MAX_DRAW, size - start),), np.float32))


def random_params(shapes: dict, key: jax.Array, convert: Callable[[np.ndarray], Any] = lambda leaf: leaf) -> dict:
    """LeCun-normal kernels and embeddings, unit norm scales, small biases, for a params layout.

    Drawing from the abstract layout avoids running the module's init (a full forward pass); the
    leaves are cut from one stream of normals, so there are one or two small programs to compile.
    Each finished leaf goes through `convert` (e.g. to a device array) before the next is drawn, so
    the host holds one chunk and one leaf beyond what `convert` keeps: an SDXL UNet fits in RAM.
    """
    flat = sorted(flatten_dict(shapes).items())
    sizes = [int(np.prod(spec.shape)) for _, spec in flat]
    stream, chunk = _normal_stream(key, sum(sizes)), np.empty(0, np.float32)
    params = {}
    for (path, spec), size in zip(flat, sizes, strict=True):
        pieces, needed = [], size
        while needed:
            if not chunk.size:
                chunk = next(stream)
            pieces.append(chunk[:needed])
            chunk, needed = chunk[len(pieces[-1]) :], needed - len(pieces[-1])
        draw = (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)).reshape(spec.shape)
        if path[-1] == "scale":
            leaf = np.ones(spec.shape, np.float32)
        elif path[-1] == "bias":
            leaf = 0.02 * draw
        else:
            fan_in = int(np.prod(spec.shape[:-1])) if path[-1] == "kernel" else 1
            leaf = draw / np.sqrt(fan_in)
        params[path] = convert(leaf)
    return unflatten_dict(params)


def _bpe_files() -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocabulary and merges in CLIP's layout: bytes, bytes+</w>, merges, specials."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    merges: list[str] = []
    for word in TOKENIZER_WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
                tokens.append(symbols[0] + symbols[1])
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _write_tokenizer(folder: Path, pad_token: str | None) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_files()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pad = {"pad_token": pad_token} if pad_token else {}
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **pad)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise RivalError(f"unknown model family {family!r}: use one of {', '.join(FAMILIES)}")


def check_weight_format(weight_format: str) -> None:
    if weight_format not in ("flax", "safetensors"):
        raise RivalError(f"weight_format must be 'flax' or 'safetensors', not {weight_format!r}")


def build_modules(arch: Architecture, tokenizers: tuple, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
    """The Flax modules of an architecture, without params: unet, vae, text_encoder[, text_encoder_2].

    Args:
        arch: the component configs.
        tokenizers: one CLIP tokenizer per text encoder (vocabulary size, unless the config sets it, and special ids).
        dtype: the modules' compute dtype.
    """
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    modules = {
        "unet": FlaxUNet2DConditionModel(**arch.unet, dtype=dtype),
        "vae": FlaxAutoencoderKL(**arch.vae, dtype=dtype),
    }
    names = tuple(TEXT_ENCODER_CLASSES)[: len(arch.text_encoders)]
    for name, config, tokenizer in zip(names, arch.text_encoders, tokenizers, strict=True):
        ids = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id}
        ids |= {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        cls = FlaxCLIPTextModelWithProjection if name == "text_encoder_2" else FlaxCLIPTextModel
        modules[name] = cls(CLIPTextConfig(**(ids | config)), dtype=dtype, _do_init=False)
    return modules


def _random_weights(
    modules: dict[str, Any], seed: int, convert: Callable[[np.ndarray], Any] = lambda leaf: leaf
) -> dict[str, dict]:
    """Random params per module (float32 numpy, or what `convert` makes of each), output layers rescaled."""
    unet_key, vae_key, text_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    keys = {
        "unet": unet_key,
        "vae": vae_key,
        "text_encoder": text_key,
        "text_encoder_2": jax.random.fold_in(text_key, 1),
    }
    params = {name: random_params(params_layout(module), keys[name], convert) for name, module in modules.items()}
    params["unet"]["conv_out"]["kernel"] *= UNET_OUT_SCALE
    params["vae"]["quant_conv"]["kernel"] *= VAE_QUANT_SCALE
    return params


def save_weights(
    folder: Path, module, params, weight_format: WeightFormat, extra_config: dict, kind: str | None = None
) -> None:
    """Save config.json and weights, with PyTorch class names and tensor names for the safetensors form.

    `kind` is the `WEIGHTS` key of the component (default: the folder's name).
    """
    module.save_pretrained(str(folder), params=params)
    if weight_format == "flax" and not extra_config:
        return
    config = json.loads((folder / "config.json").read_text()) | extra_config
    if weight_format == "safetensors":
        from safetensors.numpy import save_file

        for flax_file in folder.glob("*.msgpack"):
            flax_file.unlink()
        if "_class_name" in config:
            config["_class_name"] = config["_class_name"].removeprefix("Flax")
        if "architectures" in config:
            config["architectures"] = [name.removeprefix("Flax") for name in config["architectures"]]
        save_file(
            flax_to_pytorch_state_dict(params), str(folder / WEIGHTS[kind or folder.name][1]), metadata={"format": "pt"}
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_tiny_checkpoint(
    folder: str | os.PathLike, seed: int = 0, weight_format: WeightFormat = "flax", family: str = "sd1"
) -> Path:
    """Write a complete tiny checkpoint folder (diffusers layout) of one family with random weights.

    Args:
        folder: where to write (created if missing).
        seed: seeds every weight.
        weight_format: 'flax' (msgpack) or 'safetensors' (PyTorch names and layouts).
        family: 'sd1', 'sd2' or 'sdxl'.
    """
    folder = Path(folder)
    check_weight_format(weight_format)
    _check_family(family)
    arch = TINY[family]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizers = tuple(_write_tokenizer(folder / name, PAD_TOKENS[name]) for _, name in TEXT_COMPONENTS[family])
    modules = build_modules(arch, tokenizers)
    params = _random_weights(modules, seed)
    for name, module in modules.items():
        extra = arch.vae_extra if name == "vae" else {}
        save_weights(folder / name, module, params[name], weight_format, extra)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(arch.scheduler, indent=2))
    prefix = "Flax" if weight_format == "flax" else ""
    index = {"_class_name": f"{prefix}{arch.pipeline}", TINY_MARKER: True}
    if arch.force_zeros_for_empty_prompt:
        index["force_zeros_for_empty_prompt"] = True
    index |= {"unet": ["diffusers", f"{prefix}UNet2DConditionModel"], "vae": ["diffusers", f"{prefix}AutoencoderKL"]}
    for encoder, tokenizer in TEXT_COMPONENTS[family]:
        index[encoder] = ["transformers", f"{prefix}{TEXT_ENCODER_CLASSES[encoder]}"]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    index["scheduler"] = ["diffusers", f"{prefix}{arch.scheduler['_class_name']}"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def tiny_checkpoint(
    seed: int = 0, weight_format: WeightFormat = "flax", cache_dir: Path | None = None, family: str = "sd1"
) -> Path:
    """The built-in tiny checkpoint of a family, written once into the cache folder (atomically) and reused."""
    _check_family(family)
    root = (cache_dir or default_cache_dir()) / "tiny"
    name = f"v{TINY_VERSION}-seed{seed}-{weight_format}"
    target = root / (name if family == "sd1" else f"{name}-{family}")
    if (target / "model_index.json").is_file():
        return target
    return write_folder_atomic(
        target, lambda staging: write_tiny_checkpoint(staging, seed=seed, weight_format=weight_format, family=family)
    )


def random_full_models(family: str, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> LoadedModels:
    """The full SD 1.5, SD 2.1 or SDXL base 1.0 architecture with random weights, in memory (tokenizers: the tiny ones).

    Args:
        family: 'sd1', 'sd2' or 'sdxl'.
        dtype: dtype of the modules' computation and of the params.
        seed: seeds every weight.
    """
    from transformers import CLIPTokenizer

    _check_family(family)
    arch = FULL[family]
    tiny = tiny_checkpoint(seed, family=family)
    tokenizers = tuple(CLIPTokenizer.from_pretrained(str(tiny / name)) for _, name in TEXT_COMPONENTS[family])
    modules = build_modules(arch, tokenizers, dtype)
    params = _random_weights(modules, seed, lambda leaf: jnp.asarray(leaf, dtype))
    encoders = [name for name, _ in TEXT_COMPONENTS[family]]
    return LoadedModels(
        path=Path(f"random-{family}"),
        family=family,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoders=tuple(modules[name] for name in encoders),
        tokenizers=tokenizers,
        schedule=DDIMSchedule.from_scheduler_config(arch.scheduler),
        params=params,
        sources={name: f"random ({arch.label} architecture)" for name in params},
        random_weights=True,
        force_zeros_for_empty_prompt=arch.force_zeros_for_empty_prompt,
    )
