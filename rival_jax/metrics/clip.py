"""CLIP scores as the paper reports them: raw cosine similarity of projected CLIP features (ViT-L/14).

The model is transformers' `FlaxCLIPModel`, loaded from a transformers-style folder or hub id
(`config.json`, `preprocessor_config.json`, tokenizer files, `flax_model.msgpack` or `model.safetensors`).
Safetensors are converted without torch by the project's converter and cached like the SD models.
"tiny" is a small random CLIP written by the package (`write_tiny_clip`): its scores are meaningless.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from rival_jax.errors import RivalError
from rival_jax.files import write_folder_atomic
from rival_jax.metrics.batched import run_batched
from rival_jax.models.checkpoints import (
    TRANSFORMERS_WEIGHTS,
    _transformers_rename,
    load_params,
    params_layout,
    read_json,
)
from rival_jax.models.loading import TINY_MARKER
from rival_jax.runtime import default_cache_dir

TINY_CLIP_VERSION = "1"
# The converter's file names for transformers weights are those of a CLIP text encoder.
WEIGHTS_KIND = "text_encoder"
HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]


@dataclasses.dataclass(frozen=True)
class Clip:
    """A loaded CLIP model: module, float32 params, image processor, tokenizer and where it came from."""

    module: Any
    params: dict
    processor: Any
    tokenizer: Any
    path: Path
    random_weights: bool

    def image_features(self, pictures: list[Image.Image]) -> np.ndarray:
        """(N, D) projected image features, computed in fixed-size batches (one compiled program)."""
        pixels = self.processor(images=[p.convert("RGB") for p in pictures], return_tensors="np")["pixel_values"]
        return run_batched(_image_program(self.module), self.params, pixels.astype(np.float32))

    def text_features(self, prompts: list[str]) -> np.ndarray:
        """(N, D) projected text features of prompts (truncated to the tokenizer's 77 tokens)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length
        )
        ids = np.asarray(tokens["input_ids"], np.int32)
        return run_batched(_text_program(self.module), self.params, ids)


@functools.cache
def _image_program(module: Any):
    return jax.jit(lambda params, pixels: module.get_image_features(pixel_values=pixels, params=params))


@functools.cache
def _text_program(module: Any):
    return jax.jit(lambda params, ids: module.get_text_features(input_ids=ids, params=params))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) and (N, D) (or (1, D), broadcast) feature arrays."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def mean_pairwise_distance(features: np.ndarray) -> float | None:
    """Mean of 1 - cosine over the distinct pairs of rows; None for fewer than two rows."""
    if len(features) < 2:
        return None
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    similarity = unit @ unit.T
    upper = np.triu_indices(len(features), k=1)
    return float(np.mean(1.0 - similarity[upper]))


def write_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random CLIP (ViT and text transformer, 32 px) in the published transformers layout.

    Weights are PyTorch-named safetensors, so loading it goes through the same conversion as a real model.

    Args:
        folder: where to write (created if missing).
        seed: seeds every weight.

    >>> clip = load_clip(write_tiny_clip("/tmp/tiny-clip"))
    """
    from safetensors.numpy import load_file, save_file
    from transformers import CLIPConfig, CLIPImageProcessor, FlaxCLIPModel

    from rival_jax.models.random_models import _write_tokenizer, random_params, save_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(folder / "tokenizer", None)
    for file in (folder / "tokenizer").iterdir():
        file.rename(folder / file.name)
    (folder / "tokenizer").rmdir()
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = small | {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": 77}
    text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vision = small | {"image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    module = FlaxCLIPModel(config, _do_init=False)
    params = random_params(params_layout(module), jax.random.PRNGKey(seed))
    params["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    save_weights(folder, module, params, "safetensors", {TINY_MARKER: True}, kind=WEIGHTS_KIND)
    # PyTorch's logit_scale is 0-d; the generic Flax-to-PyTorch writer stores it as (1,).
    weights = folder / TRANSFORMERS_WEIGHTS[1]
    state = load_file(str(weights)) | {"logit_scale": np.asarray(params["logit_scale"], np.float32)}
    save_file(state, str(weights), metadata={"format": "pt"})
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_clip(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny random CLIP, written once into the cache folder (atomically) and reused."""
    target = (cache_dir or default_cache_dir()) / "tiny" / f"clip-v{TINY_CLIP_VERSION}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    return write_folder_atomic(target, lambda staging: write_tiny_clip(staging, seed=seed))


def check_clip_name(name: str) -> None:
    """Refuse, in one line and before anything loads, a --clip that is not tiny, a CLIP folder or a hub id."""
    path = Path(name).expanduser()
    if name == "tiny":
        return
    if path.exists():
        if not (path / "config.json").is_file():
            raise RivalError(
                f"{path} is not a CLIP model folder (no config.json): point --clip at a transformers CLIP folder, "
                "a hub id like openai/clip-vit-large-patch14, or tiny"
            )
        return
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise RivalError(
            f"CLIP model {name} does not exist: use a local transformers CLIP folder, a hub id like "
            "openai/clip-vit-large-patch14, or tiny"
        )


def resolve_clip_folder(name: str, cache_dir: Path | None = None) -> Path:
    """ "tiny", a local transformers CLIP folder, or a hub id (downloaded with huggingface_hub)."""
    check_clip_name(name)
    if name == "tiny":
        return tiny_clip(cache_dir)
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=[*HUB_FILES, TRANSFORMERS_WEIGHTS[1]]))
        if not (folder / TRANSFORMERS_WEIGHTS[1]).is_file():
            folder = Path(snapshot_download(name, allow_patterns=[TRANSFORMERS_WEIGHTS[0]]))
        return folder
    except Exception as error:  # any hub/network failure becomes one actionable line
        raise RivalError(
            f"could not fetch CLIP model {name} from the Hugging Face Hub ({type(error).__name__}; offline?): "
            "download it where you are online and pass the local folder to --clip"
        ) from None


def load_clip(name: str | os.PathLike, cache_dir: Path | bool | None = True) -> Clip:
    """Load a CLIP model for scoring.

    Args:
        name: "tiny", a transformers CLIP folder, or a hub id such as openai/clip-vit-large-patch14.
        cache_dir: where converted safetensors are cached; True uses `default_cache_dir()`, None disables it.

    >>> clip = load_clip("openai/clip-vit-large-patch14")
    >>> clip.image_features([Image.open("a.png")]).shape
    (1, 768)
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTokenizer, FlaxCLIPModel

    cache = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
    folder = resolve_clip_folder(str(name), cache)
    settings = read_json(folder / "config.json")
    if settings.get("model_type") != "clip":
        raise RivalError(f"{folder} holds a {settings.get('model_type')!r} model, not CLIP: pass a CLIP model")
    module = FlaxCLIPModel(CLIPConfig.from_dict(settings), _do_init=False)
    rename = functools.partial(_transformers_rename, prefix=FlaxCLIPModel.base_model_prefix)
    params, _ = load_params(folder, WEIGHTS_KIND, params_layout(module), rename, cache)
    for needed in ("preprocessor_config.json", "vocab.json"):
        if not (folder / needed).is_file():
            raise RivalError(f"{folder} has no {needed}: the CLIP folder is incomplete, re-download it")
    return Clip(
        module=module,
        params=params,
        processor=CLIPImageProcessor.from_pretrained(str(folder)),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder)),
        path=folder,
        random_weights=bool(settings.get(TINY_MARKER, False)),
    )
