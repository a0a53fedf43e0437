"""Cross-image self-attention, hooked into diffusers' Flax UNet without editing diffusers.

`flax.linen.intercept_methods` sees every module call. We act only on the first attention of each
transformer block (`attn1`, the self-attention; the text cross-attention `attn2` is untouched):

- `record_reference`: the exemplar's pass stores the hidden states entering each `attn1` (after
  its LayerNorm) in the `intermediates` collection, keyed by the layer's module path.
- `inject_reference`: a generated pass keeps its own queries and takes keys/values from the
  exemplar's stored hidden states (replacement) or from exemplar and own concatenated along the
  token axis (fusion). The exemplar's keys/values are projected once per guidance context with
  the layer's own weights and shared by every generated entry; attention itself is
  `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when asked for).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
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


def cross_image_attention(
    attention: Any,
    hidden: jnp.ndarray,
    reference: jnp.ndarray,
    entry_context: jnp.ndarray,
    mode: str,
    implementation: str | None = None,
) -> jnp.ndarray:
    """A diffusers `FlaxAttention` layer's output for generated entries attending across images.

    hidden (B, L, D): the generated entries' input; reference (C, L, D): the exemplar's input to the
    same layer per guidance context; entry_context (B,): which context each entry pairs with.
    Replacement: keys/values from the exemplar only; fusion: exemplar's then the entry's own.
    """
    own = hidden.astype(attention.dtype)
    stored = reference.astype(attention.dtype)
    keys = attention.key(stored)[entry_context]
    values = attention.value(stored)[entry_context]
    if mode == FUSE:
        keys = jnp.concatenate([keys, attention.key(own)], axis=1)
        values = jnp.concatenate([values, attention.value(own)], axis=1)

    def heads(x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(x.shape[0], x.shape[1], attention.heads, attention.dim_head)

    mixed = jax.nn.dot_product_attention(
        heads(attention.query(own)), heads(keys), heads(values), scale=attention.scale, implementation=implementation
    )
    out = attention.proj_attn(mixed.reshape(own.shape[0], own.shape[1], attention.heads * attention.dim_head))
    return attention.dropout_layer(out, deterministic=True)


@contextlib.contextmanager
def inject_reference(
    reference: dict[tuple[str, ...], jnp.ndarray],
    entry_context: jnp.ndarray,
    mode: str,
    implementation: str | None = None,
) -> Iterator[None]:
    """Within this context every attn1 runs `cross_image_attention` against `reference[its path]`."""

    def interceptor(next_fun, args, kwargs, context):
        if not _is_self_attention(context):
            return next_fun(*args, **kwargs)
        stored = reference[tuple(context.module.path)]
        return cross_image_attention(context.module, args[0], stored, entry_context, mode, implementation)

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
    entry_context: jnp.ndarray,
    mode: str,
    implementation: str | None = None,
) -> jnp.ndarray:
    """Noise prediction with cross-image self-attention against `reference` (see `inject_reference`)."""
    with inject_reference(reference, entry_context, mode, implementation):
        return unet_eps(unet, params, latents, t, text)
