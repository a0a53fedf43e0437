"""The one way every part of RIVAL calls the diffusers Flax UNet.

Every call takes a `Conditioning`: the text embeddings and, for SDXL, the added conditioning
(pooled text embeddings and size/crop time ids). Inversion, the reference pass and aligned
generation differ only in which self-attention hooks of `attention` are active around the call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rival_jax.core.attention import (
    REFERENCE_COLLECTION,
    Stage,
    inject_from_batch,
    inject_reference,
    record_reference,
    reference_layers,
)


@struct.dataclass
class Conditioning:
    """What a batch of UNet entries is conditioned on, entry-first.

    text: (B, L, D) text encoder hidden states.
    added: SDXL's `added_cond_kwargs` ({"text_embeds": (B, P), "time_ids": (B, 6)}); None for SD 1.x/2.x.

    >>> both = Conditioning.concat([negative, positive]).repeat(4)  # [negative x 4, positive x 4]
    """

    text: jnp.ndarray
    added: dict[str, jnp.ndarray] | None = None

    def take(self, index: Any) -> Conditioning:
        """The entries at `index` (an int array or slice), as a Conditioning."""
        return jax.tree_util.tree_map(lambda x: x[index], self)

    def repeat(self, count: int) -> Conditioning:
        """Every entry `count` times in a row: [a, b] -> [a x count, b x count]."""
        return jax.tree_util.tree_map(lambda x: jnp.repeat(x, count, axis=0), self)

    @staticmethod
    def concat(parts: list[Conditioning]) -> Conditioning:
        """Entries of `parts` one after another."""
        return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)

    @property
    def size(self) -> int:
        return int(self.text.shape[0])


def unet_output(
    unet: Any, params: Any, latents: jnp.ndarray, t: jnp.ndarray, cond: Conditioning, residuals: Any = None
) -> jnp.ndarray:
    """The Flax UNet's raw prediction (epsilon or v), NCHW in and out; t is a scalar or one per entry.

    `residuals`: ControlNet residuals (`control.Residuals`) added inside the UNet, or None.
    """
    extra = {}
    if residuals is not None:
        extra = {"down_block_additional_residuals": residuals.down, "mid_block_additional_residual": residuals.mid}
    return unet.apply({"params": params}, latents, t, cond.text, added_cond_kwargs=cond.added, **extra).sample


def unet_output_recording(
    unet: Any, params: Any, latents: jnp.ndarray, t: jnp.ndarray, cond: Conditioning
) -> tuple[jnp.ndarray, dict[tuple[str, ...], jnp.ndarray]]:
    """The prediction and, per self-attention layer, the hidden states that entered it."""
    with record_reference():
        out, state = unet.apply(
            {"params": params}, latents, t, cond.text, added_cond_kwargs=cond.added, mutable=[REFERENCE_COLLECTION]
        )
    return out.sample, reference_layers(state[REFERENCE_COLLECTION])


def unet_output_injected(
    unet: Any,
    params: Any,
    latents: jnp.ndarray,
    t: jnp.ndarray,
    cond: Conditioning,
    reference: dict[tuple[str, ...], jnp.ndarray],
    stage: Stage,
    implementation: str | None = None,
    residuals: Any = None,
    shares: dict | None = None,
) -> jnp.ndarray:
    """The prediction with cross-image self-attention against stored `reference` states (`inject_reference`).

    `stage`: the attention stage (`attention.PLAIN`, `REPLACEMENT`, `FUSION`; may be traced). `shares`: a dict that
    receives each layer's exemplar share (traces; the output is the same).
    """
    with inject_reference(reference, stage, implementation, shares):
        return unet_output(unet, params, latents, t, cond, residuals)


def unet_output_alongside(
    unet: Any,
    params: Any,
    latents: jnp.ndarray,
    t: jnp.ndarray,
    cond: Conditioning,
    leading: int,
    group_reference: jnp.ndarray,
    stage: Stage,
    implementation: str | None = None,
    residuals: Any = None,
    shares: dict | None = None,
) -> jnp.ndarray:
    """The prediction of a batch whose first `leading` entries are the exemplar's (`inject_from_batch`).

    `shares`: as in `unet_output_injected`, for the generated entries.
    """
    with inject_from_batch(leading, group_reference, stage, implementation, shares):
        return unet_output(unet, params, latents, t, cond, residuals)
