"""Randomly initialised Stable-Diffusion-1.x-shaped models, built by the package itself.

- The built-in **tiny checkpoint**: every part a real SD 1.5 folder has (UNet with self-attention
  at two resolutions and in the mid block, a 4-block VAE with the real 8x downsampling, a CLIP text
  model, a working byte-level BPE tokenizer, a DDIM scheduler config), written in either weight
  format, so the whole pipeline and both loading paths run anywhere in seconds.
- The **full SD 1.5 architecture** in memory (`random_sd15_models`), so speed and memory can be
  measured without downloading weights.

Their weights are random: their images are noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rival_jax.ddim import DDIMSchedule
from rival_jax.loading import TINY_MARKER, LoadedModels, default_cache_dir, flax_to_pytorch_state_dict

TINY_VERSION = "1"
WeightFormat = Literal["flax", "safetensors"]

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}
TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
TOKENIZER_WORDS = (
    *("a", "photo", "of", "the", "cat", "dog", "painting", "in", "style", "portrait", "landscape", "watercolor"),
    *("oil", "mountain", "sky", "sunset", "red", "blue", "green", "house", "tree", "river", "flower"),
)
# Output layers rescaled so latents and noise predictions are O(1), like a trained model's.
VAE_QUANT_SCALE = 10.0
UNET_OUT_SCALE = 1.6


def random_params(shapes: dict, key: jax.Array) -> dict:
    """LeCun-normal kernels and embeddings, unit norm scales, small biases, for a params layout.

    Drawing from the abstract layout avoids running the module's init (a full forward pass); one
    normal draw is sliced for all leaves so there is a single small program to compile.
    """
    flat = sorted(flatten_dict(shapes).items())
    sizes = [int(np.prod(spec.shape)) for _, spec in flat]
    noise = np.asarray(jax.random.normal(key, (sum(sizes),), dtype=np.float32))
    params, offset = {}, 0
    for (path, spec), size in zip(flat, sizes, strict=True):
        draw, offset = noise[offset : offset + size].reshape(spec.shape), offset + size
        if path[-1] == "scale":
            params[path] = np.ones(spec.shape, np.float32)
        elif path[-1] == "bias":
            params[path] = 0.02 * draw
        else:
            fan_in = int(np.prod(spec.shape[:-1])) if path[-1] == "kernel" else 1
            params[path] = draw / np.sqrt(fan_in)
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


def _write_tokenizer(folder: Path) -> tuple[int, int, int]:
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_files()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return len(vocab), tokenizer.bos_token_id, tokenizer.eos_token_id


def _save_weights(folder: Path, module, params, weight_format: WeightFormat, st_name: str) -> None:
    """Save config.json and weights, with PyTorch class names for the safetensors form."""
    module.save_pretrained(str(folder), params=params)
    if weight_format == "flax":
        return
    from safetensors.numpy import save_file

    for flax_file in folder.glob("*.msgpack"):
        flax_file.unlink()
    config = json.loads((folder / "config.json").read_text())
    if "_class_name" in config:
        config["_class_name"] = config["_class_name"].removeprefix("Flax")
    if "architectures" in config:
        config["architectures"] = [name.removeprefix("Flax") for name in config["architectures"]]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(flax_to_pytorch_state_dict(params), str(folder / st_name), metadata={"format": "pt"})


def write_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0, weight_format: WeightFormat = "flax") -> Path:
    """Write a complete tiny SD-1.x checkpoint folder (diffusers layout) with random weights from `seed`."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    folder = Path(folder)
    if weight_format not in ("flax", "safetensors"):
        raise ValueError(f"weight_format must be 'flax' or 'safetensors', not {weight_format!r}")
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size, bos, eos = _write_tokenizer(folder / "tokenizer")
    unet_key, vae_key, text_key = jax.random.split(jax.random.PRNGKey(seed), 3)

    unet = FlaxUNet2DConditionModel(**UNET_CONFIG)
    unet_params = random_params(jax.eval_shape(unet.init_weights, unet_key), unet_key)
    unet_params["conv_out"]["kernel"] *= UNET_OUT_SCALE
    vae = FlaxAutoencoderKL(**VAE_CONFIG)
    vae_params = random_params(jax.eval_shape(vae.init_weights, vae_key), vae_key)
    vae_params["quant_conv"]["kernel"] *= VAE_QUANT_SCALE
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **TEXT_CONFIG
    )
    text = FlaxCLIPTextModel(text_config, _do_init=False)
    text_params = random_params(text.params_shape_tree, text_key)

    _save_weights(folder / "unet", unet, unet_params, weight_format, "diffusion_pytorch_model.safetensors")
    _save_weights(folder / "vae", vae, vae_params, weight_format, "diffusion_pytorch_model.safetensors")
    _save_weights(folder / "text_encoder", text, text_params, weight_format, "model.safetensors")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    prefix = "Flax" if weight_format == "flax" else ""
    index = {
        "_class_name": f"{prefix}StableDiffusionPipeline",
        TINY_MARKER: True,
        "unet": ["diffusers", f"{prefix}UNet2DConditionModel"],
        "vae": ["diffusers", f"{prefix}AutoencoderKL"],
        "text_encoder": ["transformers", f"{prefix}CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", f"{prefix}DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD15_VAE_CONFIG = VAE_CONFIG | {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512}
SD15_TEXT_CONFIG = TEXT_CONFIG | {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}


def random_sd15_models(dtype: jnp.dtype = jnp.float32, seed: int = 0) -> LoadedModels:
    """The SD 1.5 UNet/VAE/CLIP architecture with random weights (tokenizer: the tiny one), in memory."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

    tiny = tiny_checkpoint(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny / "tokenizer"))
    unet_key, vae_key, text_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    unet = FlaxUNet2DConditionModel(**SD15_UNET_CONFIG, dtype=dtype)
    vae = FlaxAutoencoderKL(**SD15_VAE_CONFIG, dtype=dtype)
    text_config = CLIPTextConfig(
        vocab_size=49408, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SD15_TEXT_CONFIG
    )
    text = FlaxCLIPTextModel(text_config, dtype=dtype, _do_init=False)
    params = {
        "unet": random_params(jax.eval_shape(unet.init_weights, unet_key), unet_key),
        "vae": random_params(jax.eval_shape(vae.init_weights, vae_key), vae_key),
        "text_encoder": random_params(text.params_shape_tree, text_key),
    }
    return LoadedModels(
        path=Path("random-sd15"),
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        schedule=DDIMSchedule.from_scheduler_config(SCHEDULER_CONFIG),
        params=jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params),
        sources={name: "random (SD 1.5 architecture)" for name in params},
        random_weights=True,
    )


def tiny_checkpoint(seed: int = 0, weight_format: WeightFormat = "flax", cache_dir: Path | None = None) -> Path:
    """The built-in tiny checkpoint, written once into the cache folder (atomically) and reused."""
    root = (cache_dir or default_cache_dir()) / "tiny"
    target = root / f"v{TINY_VERSION}-seed{seed}-{weight_format}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
    try:
        write_tiny_checkpoint(staging, seed=seed, weight_format=weight_format)
        os.replace(staging, target)
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
