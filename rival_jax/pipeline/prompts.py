"""Prompts to `Conditioning`, per model family.

- SD 1.x / 2.x: the text encoder's last hidden states.
- SDXL (as diffusers' Flax SDXL pipeline): both encoders' penultimate hidden states side by side,
  the second encoder's projected pooled output as `text_embeds`, and `time_ids` = (original size,
  crop top-left, target size) = (H, W, 0, 0, H, W) of the processed exemplar. With the checkpoint's
  `force_zeros_for_empty_prompt` (SDXL base), an empty prompt is all zeros, text and pooled, as
  diffusers' SDXL pipelines make the unconditional input when no negative prompt is given.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax.core.unet import Conditioning


class PromptEncoder:
    """Encodes prompts for one loaded checkpoint (`LoadedModels`), compiled once per batch size.

    >>> cond = PromptEncoder(models)(params, ["", "a photo of a cat"], size=(768, 512))
    """

    def __init__(self, models: Any) -> None:
        self.models = models
        self._encode = jax.jit(self._encode_ids)

    def _encode_ids(self, params: dict, ids: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        encoders = self.models.text_encoders
        if len(encoders) == 1:
            return encoders[0](ids[0], params=params["text_encoder"])[0], None
        first = encoders[0](ids[0], params=params["text_encoder"], output_hidden_states=True)
        second = encoders[1](ids[1], params=params["text_encoder_2"], output_hidden_states=True)
        text = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
        return text, second.text_embeds

    def token_ids(self, prompts: list[str]) -> tuple[np.ndarray, ...]:
        """Token ids per tokenizer, padded to the first tokenizer's length (as diffusers' pipelines do)."""
        length = self.models.tokenizers[0].model_max_length
        return tuple(
            tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
            for tokenizer in self.models.tokenizers
        )

    def __call__(self, params: dict, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """Conditioning with one entry per prompt, for images of `size` (W, H)."""
        text, pooled = self._encode(params, self.token_ids(prompts))
        if pooled is None:
            return Conditioning(text=text)
        if self.models.force_zeros_for_empty_prompt:
            keep = jnp.asarray([prompt != "" for prompt in prompts])
            text = jnp.where(keep[:, None, None], text, 0)
            pooled = jnp.where(keep[:, None], pooled, 0)
        width, height = size
        time_ids = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], text.dtype), (len(prompts), 1))
        return Conditioning(text=text, added={"text_embeds": pooled, "time_ids": time_ids})
