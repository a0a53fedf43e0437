"""Which Stable Diffusion family a diffusers folder holds, from its JSON configs alone.

Anything else (SD3/Flux transformers, inpainting or other non-4-channel UNets, LCM, the SDXL
refiner, UNet conditioning or UNet/VAE settings the Flax modules cannot honour) is refused with one
line before any weights are read.
"""

from __future__ import annotations

from pathlib import Path

from rival_jax.errors import RivalError
from rival_jax.models.checkpoints import read_json

SUPPORTED = "rival_jax supports SD 1.x, SD 2.x and SDXL base in diffusers layout"
FAMILIES = ("sd1", "sd2", "sdxl")
# (text encoder, tokenizer) sub-folders per family, in the order the UNet's context concatenates them.
TEXT_COMPONENTS = {
    "sd1": (("text_encoder", "tokenizer"),),
    "sd2": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}

# Settings the Flax UNet/VAE ignore (they always compute the default) though they change the model.
UNET_DEFAULTS = {
    "act_fn": "silu",
    "attention_type": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dual_cross_attention": False,
    "encoder_hid_dim_type": None,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
}
VAE_DEFAULTS = {
    "latents_mean": None,
    "latents_std": None,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
}


def _has(folder: Path, index: dict, component: str) -> bool:
    """Whether model_index.json lists the component (hub folders hold only configs at first) or it exists."""
    entry = index.get(component)
    return (isinstance(entry, list) and bool(entry) and entry[0] is not None) or (folder / component).is_dir()


def _refuse(folder: Path, found: str) -> RivalError:
    return RivalError(f"{folder} is {found}: {SUPPORTED}")


def detect_family(folder: Path, index: dict) -> str:
    """'sd1', 'sd2' or 'sdxl' for a diffusers folder; a one-line RivalError for any other checkpoint.

    Args:
        folder: the model folder (configs must be present; weights need not be).
        index: its parsed model_index.json.
    """
    pipeline = index.get("_class_name", "an unnamed pipeline")
    if not (folder / "unet").is_dir() and _has(folder, index, "transformer"):
        raise _refuse(folder, f"a {pipeline} checkpoint (a transformer/ denoiser, not a unet/)")
    if _has(folder, index, "text_encoder_2") and not _has(folder, index, "text_encoder"):
        raise _refuse(folder, f"an SDXL refiner ({pipeline}: text_encoder_2/ without text_encoder/)")
    unet = read_json(folder / "unet" / "config.json")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    scheduler_class = scheduler.get("_class_name", "")
    if "LCM" in scheduler_class or any(name in pipeline for name in ("LCM", "LatentConsistency")):
        raise _refuse(folder, f"a latent consistency (LCM) checkpoint ({pipeline}, {scheduler_class or 'scheduler'})")
    if unet.get("time_cond_proj_dim") is not None:
        raise _refuse(folder, "a latent consistency (LCM) checkpoint (its UNet has time_cond_proj_dim)")
    if unet.get("in_channels", 4) != 4:
        raise _refuse(
            folder, f"a {unet['in_channels']}-channel UNet checkpoint (inpainting, depth or instruct-pix2pix)"
        )
    vae = read_json(folder / "vae" / "config.json")
    for component, config, defaults in (("UNet", unet, UNET_DEFAULTS), ("VAE", vae, VAE_DEFAULTS)):
        for key, default in defaults.items():
            if config.get(key, default) != default:
                raise _refuse(
                    folder, f"a checkpoint whose {component} sets {key}={config[key]!r}, which the Flax one lacks"
                )
    addition = unet.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise _refuse(folder, f"a checkpoint whose UNet has addition_embed_type={addition!r}")
    if addition == "text_time":
        time_dim = unet.get("addition_time_embed_dim") or 0
        if 5 * time_dim + unet.get("cross_attention_dim", 0) == unet.get("projection_class_embeddings_input_dim"):
            raise _refuse(folder, f"an SDXL refiner ({pipeline}: its UNet takes the refiner's 5 micro-conditions)")
        if not _has(folder, index, "text_encoder_2"):
            raise _refuse(folder, f"a {pipeline} checkpoint with an SDXL UNet but no text_encoder_2/")
        return "sdxl"
    if _has(folder, index, "text_encoder_2"):
        raise _refuse(folder, f"a {pipeline} checkpoint with text_encoder_2/ but no SDXL (text_time) UNet")
    if unet.get("cross_attention_dim") == 1024 or scheduler.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd1"
