"""Cross-image self-attention, hooked into diffusers' Flax UNet without editing diffusers.

`flax.linen.intercept_methods` sees every module call. We act only on the first attention of each
transformer block (`attn1`, the self-attention; the text cross-attention `attn2` is untouched):

- `record_reference`: the exemplar's pass stores the hidden states entering each `attn1` (after
  its LayerNorm) in the `intermediates` collection, keyed by the layer's module path.
- `inject_reference`: a generated pass keeps its own queries and takes keys/values from the
  exemplar's stored hidden states (replacement) or from exemplar and own concatenated along the
  token axis (fusion). diffusers' `FlaxAttention(hidden, context)` projects queries from `hidden`
  and keys/values from `context`, so injection is that same call with another context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

REFERENCE_COLLECTION = "intermediates"
REFERENCE_NAME = "rival_reference"
REPLACE, FUSE = "replace", "fuse"


def _is_self_attention(context: nn.module.InterceptorContext) -> bool:
    module = context.module
    return context.method_name == "__call__" and module.name == "attn1" and type(module).__name__ == "FlaxAttention"


@contextlib.contextmanager
def record_reference() -> Iterator[None]:
    """Within this context, UNet applies with `mutable=[REFERENCE_COLLECTION]` return the inputs of every attn1."""

    def interceptor(next_fun, args, kwargs, context):
        if _is_self_attention(context):
            context.module.sow(REFERENCE_COLLECTION, REFERENCE_NAME, args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def reference_layers(intermediates: dict) -> dict[tuple[str, ...], jnp.ndarray]:
    """Flatten a recorded `intermediates` tree to {attn1 module path: hidden states (B, L, C)}."""
    flat = flatten_dict(intermediates)
    return {key[:-1]: value[0] for key, value in flat.items() if key[-1] == REFERENCE_NAME}


def cross_image_kv(own: jnp.ndarray, reference: jnp.ndarray, mode: str) -> jnp.ndarray:
    """Hidden states the generated entries draw keys/values from: (B, L, C) or (B, 2L, C)."""
    if mode == REPLACE:
        return reference
    return jnp.concatenate([reference, own], axis=1)


@contextlib.contextmanager
def inject_reference(reference: dict[tuple[str, ...], jnp.ndarray], mode: str) -> Iterator[None]:
    """Within this context every attn1 takes keys/values per `cross_image_kv` from `reference[path]`.

    `reference[path]` must broadcast to the batch of the UNet call (B, L, C).
    """

    def interceptor(next_fun, args, kwargs, context):
        if not _is_self_attention(context):
            return next_fun(*args, **kwargs)
        own = args[0]
        stored = jnp.broadcast_to(reference[tuple(context.module.path)], own.shape).astype(own.dtype)
        kwargs = dict(kwargs, context=cross_image_kv(own, stored, mode))
        return next_fun(own, *args[2:], **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def unet_eps(unet: Any, params: Any, latents: jnp.ndarray, t: jnp.ndarray, text: jnp.ndarray) -> jnp.ndarray:
    """Noise prediction of the Flax UNet, NCHW in and out."""
    return unet.apply({"params": params}, latents, t, text).sample


def unet_eps_recording(
    unet: Any, params: Any, latents: jnp.ndarray, t: jnp.ndarray, text: jnp.ndarray
) -> tuple[jnp.ndarray, dict[tuple[str, ...], jnp.ndarray]]:
    """Noise prediction and, per self-attention layer, the hidden states that entered it."""
    with record_reference():
        out, state = unet.apply({"params": params}, latents, t, text, mutable=[REFERENCE_COLLECTION])
    return out.sample, reference_layers(state[REFERENCE_COLLECTION])


def unet_eps_injected(
    unet: Any,
    params: Any,
    latents: jnp.ndarray,
    t: jnp.ndarray,
    text: jnp.ndarray,
    reference: dict[tuple[str, ...], jnp.ndarray],
    mode: str,
) -> jnp.ndarray:
    """Noise prediction with cross-image self-attention against `reference` (see `inject_reference`)."""
    with inject_reference(reference, mode):
        return unet_eps(unet, params, latents, t, text)
