"""A Flax SDXL ControlNet: diffusers' PyTorch `ControlNetModel` with SDXL's conditioning, from diffusers' Flax blocks.

diffusers 0.39's `FlaxControlNetModel` has no `text_time` added embedding and no
`transformer_layers_per_block`, so it cannot hold an SDXL ControlNet. This module is that
ControlNet built as `FlaxUNet2DConditionModel` builds its encoder half: the same down blocks (with
their transformer depths), mid block and time + text/time-id embedding, plus the ControlNet's
conditioning embedding and zero convolutions. Its parameter names are the PyTorch ones under
diffusers' Flax renaming, so SDXL ControlNet checkpoints convert with `checkpoints.load_params`.
Its feed-forward layers use PyTorch's exact GELU, the one the checkpoints were trained with (diffusers'
`FlaxGEGLU` uses Flax's tanh approximation: residuals 1e-4 apart on the tiny model, 3e-6 with the exact one).
It returns what the Flax SDXL UNet takes as `down_block_additional_residuals` and
`mid_block_additional_residual` (NHWC).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from diffusers.configuration_utils import ConfigMixin, flax_register_to_config
from diffusers.models.attention_flax import FlaxGEGLU
from diffusers.models.controlnets.controlnet_flax import FlaxControlNetConditioningEmbedding, FlaxControlNetOutput
from diffusers.models.embeddings_flax import FlaxTimestepEmbedding, FlaxTimesteps
from diffusers.models.modeling_flax_utils import FlaxModelMixin
from diffusers.models.unets.unet_2d_blocks_flax import (
    FlaxCrossAttnDownBlock2D,
    FlaxDownBlock2D,
    FlaxUNetMidBlock2DCrossAttn,
)
from flax.core.frozen_dict import FrozenDict

# SDXL base's micro-conditions: original size, crop top-left, target size.
TIME_IDS = 6


def _zero_conv(channels: int, dtype: jnp.dtype) -> nn.Conv:
    return nn.Conv(
        channels,
        kernel_size=(1, 1),
        padding="VALID",
        kernel_init=nn.initializers.zeros_init(),
        bias_init=nn.initializers.zeros_init(),
        dtype=dtype,
    )


def _exact_geglu(next_fun, args, kwargs, context):
    """diffusers' `FlaxGEGLU` (its dropout is never active here) with the exact GELU."""
    if not isinstance(context.module, FlaxGEGLU) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    linear, gate = jnp.split(context.module.proj(args[0]), 2, axis=-1)
    return linear * nn.gelu(gate, approximate=False)


def _per_block(value: int | bool | tuple | None, count: int) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * count


@flax_register_to_config
class FlaxControlNetSDXLModel(nn.Module, FlaxModelMixin, ConfigMixin):
    """An SDXL ControlNet (`addition_embed_type="text_time"`); the fields are those of its PyTorch config.json.

    Called like `FlaxControlNetModel`, with SDXL's `added_cond_kwargs` ({"text_embeds": (B, P),
    "time_ids": (B, 6)}, as the SDXL UNet takes them).

    >>> down, mid = module.apply({"params": params}, latents, t, text, image, 1.0, False, added_cond_kwargs=added)
    """

    sample_size: int = 128
    in_channels: int = 4
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = (5, 10, 20)
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 2048
    dropout: float = 0.0
    use_linear_projection: bool = True
    dtype: jnp.dtype = jnp.float32
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int | tuple[int, ...] = (1, 2, 10)
    addition_embed_type: str = "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def init_weights(self, rng: jax.Array) -> FrozenDict:
        side = self.sample_size
        text_embeds = self.projection_class_embeddings_input_dim - TIME_IDS * self.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((1, text_embeds)), "time_ids": jnp.zeros((1, TIME_IDS))}
        inputs = (
            jnp.zeros((1, self.in_channels, side, side)),
            jnp.ones((1,), jnp.int32),
            jnp.zeros((1, 1, self.cross_attention_dim)),
            jnp.zeros((1, 3, side * 8, side * 8)),
        )
        params_rng, dropout_rng = jax.random.split(rng)
        return self.init({"params": params_rng, "dropout": dropout_rng}, *inputs, added_cond_kwargs=added)["params"]

    def setup(self) -> None:
        channels, count = self.block_out_channels, len(self.down_block_types)
        time_embed_dim = channels[0] * 4
        heads = _per_block(self.num_attention_heads or self.attention_head_dim, count)
        depths = _per_block(self.transformer_layers_per_block, count)
        only_cross = _per_block(self.only_cross_attention, count)
        self.conv_in = nn.Conv(channels[0], kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)
        self.time_proj = FlaxTimesteps(channels[0], flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        self.time_embedding = FlaxTimestepEmbedding(time_embed_dim, dtype=self.dtype)
        self.add_time_proj = FlaxTimesteps(self.addition_time_embed_dim, self.flip_sin_to_cos, self.freq_shift)
        self.add_embedding = FlaxTimestepEmbedding(time_embed_dim, dtype=self.dtype)
        # As in diffusers' FlaxControlNetModel, the conditioning embedding computes in float32.
        self.controlnet_cond_embedding = FlaxControlNetConditioningEmbedding(
            conditioning_embedding_channels=channels[0], block_out_channels=self.conditioning_embedding_out_channels
        )
        down_blocks, zero_convs = [], [_zero_conv(channels[0], self.dtype)]
        for i, block_type in enumerate(self.down_block_types):
            last = i == count - 1
            shared = {
                "in_channels": channels[max(i - 1, 0)],
                "out_channels": channels[i],
                "dropout": self.dropout,
                "num_layers": self.layers_per_block,
                "add_downsample": not last,
                "dtype": self.dtype,
            }
            if block_type == "CrossAttnDownBlock2D":
                attention = {
                    "transformer_layers_per_block": depths[i],
                    "num_attention_heads": heads[i],
                    "use_linear_projection": self.use_linear_projection,
                    "only_cross_attention": only_cross[i],
                }
                down_blocks.append(FlaxCrossAttnDownBlock2D(**shared, **attention))
            else:
                down_blocks.append(FlaxDownBlock2D(**shared))
            zero_convs += [_zero_conv(channels[i], self.dtype) for _ in range(self.layers_per_block + (not last))]
        self.down_blocks = down_blocks
        self.controlnet_down_blocks = zero_convs
        self.mid_block = FlaxUNetMidBlock2DCrossAttn(
            in_channels=channels[-1],
            dropout=self.dropout,
            num_attention_heads=heads[-1],
            transformer_layers_per_block=depths[-1],
            use_linear_projection=self.use_linear_projection,
            dtype=self.dtype,
        )
        self.controlnet_mid_block = _zero_conv(channels[-1], self.dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> FlaxControlNetOutput | tuple[list[jnp.ndarray], jnp.ndarray]:
        """`residuals` with the exact GELU in every feed-forward layer."""
        with nn.intercept_methods(_exact_geglu):
            return self.residuals(*args, **kwargs)

    def residuals(
        self,
        sample: jnp.ndarray,
        timesteps: jnp.ndarray | float | int,
        encoder_hidden_states: jnp.ndarray,
        controlnet_cond: jnp.ndarray,
        conditioning_scale: float | jnp.ndarray = 1.0,
        return_dict: bool = True,
        train: bool = False,
        *,
        added_cond_kwargs: dict,
    ) -> FlaxControlNetOutput | tuple[list[jnp.ndarray], jnp.ndarray]:
        """Residuals for NCHW `sample` (B, 4, h, w) and `controlnet_cond` (B, 3, 8h, 8w) in [0, 1]."""
        if self.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = jnp.flip(controlnet_cond, axis=1)
        timesteps = jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32))
        t_emb = self.time_embedding(self.time_proj(timesteps))
        text_embeds = added_cond_kwargs["text_embeds"]
        time_embeds = self.add_time_proj(jnp.ravel(added_cond_kwargs["time_ids"]))
        time_embeds = jnp.reshape(time_embeds, (text_embeds.shape[0], -1))
        t_emb = t_emb + self.add_embedding(jnp.concatenate([text_embeds, time_embeds], axis=-1))

        sample = self.conv_in(jnp.transpose(sample, (0, 2, 3, 1)))
        sample += self.controlnet_cond_embedding(jnp.transpose(controlnet_cond, (0, 2, 3, 1)))
        outputs = [sample]
        for block in self.down_blocks:
            if isinstance(block, FlaxCrossAttnDownBlock2D):
                sample, found = block(sample, t_emb, encoder_hidden_states, deterministic=not train)
            else:
                sample, found = block(sample, t_emb, deterministic=not train)
            outputs += found
        sample = self.mid_block(sample, t_emb, encoder_hidden_states, deterministic=not train)

        down = [conv(x) * conditioning_scale for x, conv in zip(outputs, self.controlnet_down_blocks, strict=True)]
        mid = self.controlnet_mid_block(sample) * conditioning_scale
        if not return_dict:
            return down, mid
        return FlaxControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
