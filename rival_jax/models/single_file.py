"""Single-file Stable Diffusion checkpoints (original CompVis/LDM and SGM layout) to diffusers folders, without torch.

Community fine-tunes usually ship as one `.safetensors` holding `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE) and the text encoder(s): `cond_stage_model.transformer.*` (SD 1.x CLIP),
`cond_stage_model.model.*` (SD 2.x OpenCLIP) or `conditioner.embedders.{0,1}.*` (SDXL CLIP-L and
OpenCLIP bigG). `convert_single_file` rewrites one into the diffusers layout that `rival_jax.models.loading`
reads, with PyTorch-named safetensors weights, and caches the result.

The key mapping is diffusers' own (`diffusers.loaders.single_file_utils`). That module imports torch
at the top, so it is not imported: its source is parsed and only the constant tables and these
functions are executed: `infer_diffusers_model_type`, `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint` and the
helpers they call (`update_*_ldm_to_diffusers`, `conv_attn_to_linear`). They run on numpy arrays
unchanged, except that:

- `convert_open_clip_checkpoint` calls the tensor methods `.contiguous()`, `.clone()` and `.detach()`:
  its input arrays are viewed as `_TensorMethods`, an ndarray subclass with those three.
- `infer_diffusers_model_type` calls `torch.all` in its Z-Image ControlNet branch: a `torch` holding
  `numpy.all` is supplied.

Reimplemented, because diffusers does them while building torch models or downloading from the hub:
the choice of text-encoder converter per family (`create_diffusers_clip_model_from_ldm`) and the
folder assembly (configs, tokenizers, scheduler and `model_index.json` come from `config_folder`).
The family is read from the text-encoder layout: `infer_diffusers_model_type` only rejects other
model types, as its SD 2 and SDXL markers depend on full-size widths and depths.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from rival_jax.errors import RivalError
from rival_jax.files import write_folder_atomic
from rival_jax.models.checkpoints import read_json
from rival_jax.models.families import FAMILIES, TEXT_COMPONENTS, detect_family
from rival_jax.runtime import default_cache_dir

SINGLE_FILE_VERSION = "1"
DIFFUSERS_FUNCTIONS = (
    "infer_diffusers_model_type",
    "conv_attn_to_linear",
    "update_unet_resnet_ldm_to_diffusers",
    "update_unet_attention_ldm_to_diffusers",
    "update_vae_resnet_ldm_to_diffusers",
    "update_vae_attentions_ldm_to_diffusers",
    "convert_ldm_unet_checkpoint",
    "convert_ldm_vae_checkpoint",
    "convert_ldm_clip_checkpoint",
    "convert_open_clip_checkpoint",
)
BASE_MODEL_TYPES = ("v1", "v2", "xl_base")
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# Per family, the text encoders as (subfolder, prefix in the single file); the last prefix identifies the family.
TEXT_ENCODERS = {
    "sdxl": (
        ("text_encoder", "conditioner.embedders.0.transformer."),
        ("text_encoder_2", "conditioner.embedders.1.model."),
    ),
    "sd2": (("text_encoder", "cond_stage_model.model."),),
    "sd1": (("text_encoder", "cond_stage_model.transformer."),),
}
COMPONENT_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
}


class _TensorMethods(np.ndarray):
    """A numpy array that also answers the torch tensor methods diffusers' OpenCLIP converter calls."""

    def contiguous(self) -> np.ndarray:
        return np.ascontiguousarray(self)

    def clone(self) -> _TensorMethods:
        return self.copy()

    def detach(self) -> _TensorMethods:
        return self


@functools.cache
def _diffusers_mapping() -> SimpleNamespace:
    """diffusers' single-file mapping functions and tables, executed from source without importing torch."""
    from diffusers import __version__
    from diffusers.utils import logging as diffusers_logging

    source_path = importlib.util.find_spec("diffusers.loaders.single_file_utils").origin
    tree = ast.parse(Path(source_path).read_text())
    nodes = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in DIFFUSERS_FUNCTIONS)
        or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets))
    ]
    namespace = {
        "logger": diffusers_logging.get_logger("diffusers.loaders.single_file_utils"),
        "torch": SimpleNamespace(all=np.all),
    }
    exec(compile(ast.Module(body=nodes, type_ignores=[]), source_path, "exec"), namespace)
    missing = [name for name in DIFFUSERS_FUNCTIONS if name not in namespace]
    if missing:
        raise RivalError(f"diffusers {__version__} lacks {', '.join(missing)}: install diffusers==0.39.0")
    return SimpleNamespace(**{name: namespace[name] for name in DIFFUSERS_FUNCTIONS})


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise RivalError(f"{path} does not exist: pass the path of a single-file .safetensors checkpoint")
    if path.suffix != ".safetensors":
        raise RivalError(
            f"{path} is not a .safetensors file: pickled checkpoints (.ckpt/.pt) need torch to open, "
            "convert it to .safetensors first"
        )


def _read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as error:
        raise RivalError(f"{path} is not a readable safetensors file ({error}): re-download it") from None


def _detect_family(checkpoint: dict[str, np.ndarray], path: Path) -> str:
    """'sd1', 'sd2' or 'sdxl' from the keys; other model types and incomplete files are errors."""
    model_type = _diffusers_mapping().infer_diffusers_model_type(checkpoint)
    if model_type not in BASE_MODEL_TYPES:
        raise RivalError(
            f"{path} holds model type {model_type!r}: only Stable Diffusion 1.x, 2.x and SDXL base single files "
            "can be converted, use that model's diffusers folder instead"
        )
    family = next(
        (name for name, encoders in TEXT_ENCODERS.items() if any(k.startswith(encoders[-1][1]) for k in checkpoint)),
        None,
    )
    if family is None:
        raise RivalError(
            f"{path} is not an original-layout Stable Diffusion checkpoint (no CLIP text encoder keys such as "
            f"{TEXT_ENCODERS['sd1'][0][1]}*): pass a single-file SD 1.x/2.x/SDXL .safetensors"
        )
    for prefix in (UNET_PREFIX, VAE_PREFIX, *(p for _, p in TEXT_ENCODERS[family])):
        if not any(key.startswith(prefix) for key in checkpoint):
            raise RivalError(f"{path} has no {prefix}* weights: it is incomplete, use a full single-file checkpoint")
    return family


def _read_config(path: Path) -> dict:
    """A config JSON with the PyTorch class names that the written safetensors weights call for."""
    config = read_json(path)
    if "_class_name" in config:
        config["_class_name"] = config["_class_name"].removeprefix("Flax")
    if "architectures" in config:
        config["architectures"] = [name.removeprefix("Flax") for name in config["architectures"]]
    return config


def _convert(checkpoint: dict[str, np.ndarray], family: str, configs: dict[str, dict]) -> dict[str, dict]:
    """Diffusers-named state dicts per component, by diffusers' own mapping."""
    mapping = _diffusers_mapping()
    states = {
        "unet": mapping.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
        "vae": mapping.convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),
    }
    for name, prefix in TEXT_ENCODERS[family]:
        if prefix.endswith(".transformer."):
            state = mapping.convert_ldm_clip_checkpoint(checkpoint)
        else:
            text_model = SimpleNamespace(config=SimpleNamespace(**configs[name]))
            wrapped = {key: value.view(_TensorMethods) for key, value in checkpoint.items() if key.startswith(prefix)}
            state = mapping.convert_open_clip_checkpoint(text_model, wrapped, prefix=prefix)
        states[name] = {key: value for key, value in state.items() if not key.endswith("position_ids")}
    return states


def _digest(path: Path, config_folder: Path) -> str:
    """Hash of the converter version, the single file and the config/tokenizer files that shape the output."""
    digest = hashlib.sha256(SINGLE_FILE_VERSION.encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    for file in sorted(config_folder.glob("*.json")) + sorted(config_folder.glob("*/*")):
        if file.suffix in (".json", ".txt"):
            digest.update(str(file.relative_to(config_folder)).encode() + file.read_bytes())
    return digest.hexdigest()[:40]


def _write_folder(folder: Path, checkpoint: dict[str, np.ndarray], family: str, config_folder: Path) -> None:
    from diffusers import __version__
    from safetensors.numpy import save_file

    encoders = [name for name, _ in TEXT_ENCODERS[family]]
    configs = {name: _read_config(config_folder / name / "config.json") for name in ["unet", "vae", *encoders]}
    scheduler = _read_config(config_folder / "scheduler" / "scheduler_config.json")
    base_index = _read_config(config_folder / "model_index.json")
    # Pipeline attributes (e.g. SDXL's force_zeros_for_empty_prompt) carry over; private markers do not.
    index = {key: value for key, value in base_index.items() if not key.startswith("_") and not isinstance(value, list)}
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    index |= {"_class_name": base_index.get("_class_name", pipeline), "_diffusers_version": __version__}
    for name, state in _convert(checkpoint, family, configs).items():
        weights = "model.safetensors" if name in encoders else "diffusion_pytorch_model.safetensors"
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(configs[name], indent=2))
        tensors = {key: np.ascontiguousarray(value) for key, value in state.items()}
        save_file(tensors, str(folder / name / weights), metadata={"format": "pt"})
        index[name] = list(COMPONENT_CLASSES[name])
    for _, tokenizer in TEXT_COMPONENTS[family]:
        if not (config_folder / tokenizer / "vocab.json").is_file():
            raise RivalError(
                f"config_folder {config_folder} has no {tokenizer}/vocab.json: pass a complete diffusers folder"
            )
        shutil.copytree(config_folder / tokenizer, folder / tokenizer)
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def convert_single_file(
    path: Path, config_folder: Path | None = None, family: str | None = None, cache_dir: Path | None = None
) -> Path:
    """Convert a single-file SD 1.x/2.x/SDXL checkpoint into a cached diffusers-layout folder.

    Args:
        path: the original-layout (CompVis/LDM or SGM) `.safetensors` file.
        config_folder: a diffusers folder of the same family (e.g. the base model's); it supplies every
            component's config.json, the scheduler config and the tokenizer(s). Required: the CLIP
            tokenizer files cannot be obtained without it.
        family: "sd1", "sd2" or "sdxl" to insist on; None accepts the family the file and folder hold.
        cache_dir: cache root; default `rival_jax.runtime.default_cache_dir()`. The folder is written
            once into `cache_dir / "single-file" / <hash>` and reused while file and configs are unchanged.

    Returns:
        The converted folder, ready for `rival_jax.models.loading.load_models`.

    Example:
        >>> folder = convert_single_file(Path("dreamshaper_8.safetensors"), config_folder=Path("sd15"))
        >>> models = load_models(folder)
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise RivalError(f"family={family!r} is not supported: use one of {', '.join(FAMILIES)} or None to detect it")
    if config_folder is None:
        raise RivalError(
            f"single-file checkpoint {path.name} needs a base model for its configs and tokenizer: pass "
            "--base-model (Python: base_model=) with a diffusers folder of its family, e.g. the base model's"
        )
    config_folder = Path(config_folder)
    _check_file(path)
    folder_family = detect_family(config_folder, read_json(config_folder / "model_index.json"))
    if family not in (None, folder_family):
        raise RivalError(
            f"config_folder {config_folder} holds an {folder_family} model, not {family}: "
            f"pass a config_folder of the {family} family"
        )
    root = (cache_dir or default_cache_dir()) / "single-file"
    target = root / _digest(path, config_folder)
    if (target / "model_index.json").is_file():
        return target
    checkpoint = _read_checkpoint(path)
    file_family = _detect_family(checkpoint, path)
    if file_family != folder_family:
        raise RivalError(
            f"{path} is an {file_family} checkpoint but config_folder {config_folder} holds an {folder_family} "
            f"model: pass a config_folder of the {file_family} family"
        )
    return write_folder_atomic(target, lambda staging: _write_folder(staging, checkpoint, file_family, config_folder))
