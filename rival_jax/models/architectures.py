"""Component configs of the three Stable Diffusion families, tiny (tests) and full size (benchmarks).

The tiny ones keep each family's distinguishing features (SD 2: linear attention projections,
per-block head counts, OpenCLIP's gelu, v-prediction; SDXL: two text encoders, text_time
conditioning, deeper transformer stacks) at a size that runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The configs of one family's components, as the diffusers/transformers Flax classes take them.

    `text_encoders` holds one CLIP text config per encoder (tokenizer ids are added when building);
    `vae_extra` goes into the VAE's config.json only (PyTorch-side keys the Flax class does not take).
    """

    label: str
    pipeline: str
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]
    scheduler: dict
    vae_extra: dict = dataclasses.field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = False


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
SD2_SCHEDULER_CONFIG = SCHEDULER_CONFIG | {"prediction_type": "v_prediction"}
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SDXL_VAE_EXTRA = {"force_upcast": True}

TINY = {
    "sd1": Architecture(
        label="tiny SD 1.x",
        pipeline="StableDiffusionPipeline",
        unet=UNET_CONFIG,
        vae=VAE_CONFIG,
        text_encoders=(TEXT_CONFIG,),
        scheduler=SCHEDULER_CONFIG,
    ),
    "sd2": Architecture(
        label="tiny SD 2.x",
        pipeline="StableDiffusionPipeline",
        unet=UNET_CONFIG | {"sample_size": 20, "attention_head_dim": [2, 4, 4], "use_linear_projection": True},
        vae=VAE_CONFIG | {"sample_size": 160},
        text_encoders=(TEXT_CONFIG | {"hidden_act": "gelu"},),
        scheduler=SD2_SCHEDULER_CONFIG,
    ),
    # diffusers' own tiny SDXL test UNet, widened to 32/64 channels for the Flax UNet's 32 norm groups.
    "sdxl": Architecture(
        label="tiny SDXL",
        pipeline="StableDiffusionXLPipeline",
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 2,
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "cross_attention_dim": 64,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        vae=VAE_CONFIG | {"scaling_factor": 0.13025},
        vae_extra=SDXL_VAE_EXTRA,
        text_encoders=(TEXT_CONFIG, TEXT_CONFIG | {"hidden_act": "gelu"}),
        scheduler=SDXL_SCHEDULER_CONFIG,
        force_zeros_for_empty_prompt=True,
    ),
}

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
CLIP_L_CONFIG = TEXT_CONFIG | {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
OPEN_CLIP_H_CONFIG = CLIP_L_CONFIG | {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
OPEN_CLIP_BIG_G_CONFIG = CLIP_L_CONFIG | {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

FULL = {
    "sd1": Architecture(
        label="SD 1.5",
        pipeline="StableDiffusionPipeline",
        unet=SD15_UNET_CONFIG,
        vae=SD15_VAE_CONFIG,
        text_encoders=(CLIP_L_CONFIG,),
        scheduler=SCHEDULER_CONFIG,
    ),
    "sd2": Architecture(
        label="SD 2.1",
        pipeline="StableDiffusionPipeline",
        unet=SD15_UNET_CONFIG
        | {"sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
        | {"cross_attention_dim": 1024},
        vae=SD15_VAE_CONFIG | {"sample_size": 768},
        text_encoders=(OPEN_CLIP_H_CONFIG,),
        scheduler=SD2_SCHEDULER_CONFIG,
    ),
    "sdxl": Architecture(
        label="SDXL base 1.0",
        pipeline="StableDiffusionXLPipeline",
        unet=SD15_UNET_CONFIG
        | {
            "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "cross_attention_dim": 2048,
        },
        vae=SD15_VAE_CONFIG | {"sample_size": 1024, "scaling_factor": 0.13025},
        vae_extra=SDXL_VAE_EXTRA,
        text_encoders=(CLIP_L_CONFIG, OPEN_CLIP_BIG_G_CONFIG),
        scheduler=SDXL_SCHEDULER_CONFIG,
        force_zeros_for_empty_prompt=True,
    ),
}
