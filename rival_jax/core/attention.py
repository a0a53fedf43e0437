"""Cross-image self-attention, hooked into diffusers' Flax UNet without editing diffusers.

`flax.linen.intercept_methods` sees every module call. We act only on the first attention of each
transformer block (`attn1`, the self-attention; the text cross-attention `attn2` is untouched):

- `record_reference`: the exemplar's pass stores the hidden states entering each `attn1` (after
  its LayerNorm) in the `intermediates` collection, keyed by the layer's module path.
- `inject_reference`: a generated pass keeps its own queries and takes keys/values from the
  exemplar's stored hidden states (replacement) or from exemplar and own together (fusion).

The stage (`PLAIN`, `REPLACEMENT`, `FUSION`) may be a traced scalar: each hooked layer then picks
its attention with `lax.switch`, so a generation program traces and compiles the UNet once for all
three stages (docs/performance.md#one-unet-for-every-stage).

The exemplar's keys/values are projected once per group and shared by every generated entry of the
group, whose queries are stacked into one matrix product against them. Fusion never builds the
concatenated keys: the attention over the exemplar's tokens and over the entry's own tokens are
computed apart and merged by their log-sum-exps, which is the softmax over both exactly. Queries go
through in blocks of `QUERY_BLOCK` tokens so the score matrices stay small. `implementation="cudnn"`
hands both stages to cuDNN flash attention through `jax.nn.dot_product_attention` instead, and
`implementation="pallas"` to the Pallas TPU flash kernel (`pallas_attention`), fusion over the
concatenated keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from rival_jax.core import pallas_attention

REFERENCE_COLLECTION = "intermediates"
REFERENCE_NAME = "rival_reference"
# The attention stages of aligned generation: own tokens only, the exemplar's only, both.
PLAIN, REPLACEMENT, FUSION = 0, 1, 2
Stage = int | jnp.ndarray
QUERY_BLOCK = 256
KeyValues = pallas_attention.KeyValues


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


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Softmax attention (B, T, H, d) of q over k/v (B, S, H, d), and its log-sum-exp (B, T, H), in float32."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    peak = logits.max(axis=-1, keepdims=True)
    weights = jnp.exp(logits - peak)
    total = weights.sum(axis=-1).transpose(0, 2, 1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / total[..., None], peak[..., 0].transpose(0, 2, 1) + jnp.log(total)


def _grouped(x: jnp.ndarray, groups: int) -> jnp.ndarray:
    """(G*n, T, ...) entries to (G, n*T, ...): one query matrix per group."""
    return x.reshape(groups, -1, *x.shape[2:])


def _cross_image_block(q: jnp.ndarray, reference_kv: KeyValues, own_kv: KeyValues | None, scale: float) -> jnp.ndarray:
    """Queries q (G*n, T, H, d) over their group's reference keys/values (G, S, H, d), and their own if given."""
    out, lse = attend(_grouped(q, reference_kv[0].shape[0]), *reference_kv, scale)
    out, lse = out.reshape(q.shape), lse.reshape(q.shape[:3])
    if own_kv is None:
        return out
    own_out, own_lse = attend(q, *own_kv, scale)
    return own_out + jax.nn.sigmoid(lse - own_lse)[..., None] * (out - own_out)


def _query_block(length: int) -> int:
    return max(size for size in range(1, min(length, QUERY_BLOCK) + 1) if length % size == 0)


def _blockwise(q: jnp.ndarray, reference_kv: KeyValues, own_kv: KeyValues | None, scale: float) -> jnp.ndarray:
    """`_cross_image_block` over blocks of the query tokens, one block at a time."""
    batch, length, heads, dim = q.shape
    block = _query_block(length)
    blocks = q.reshape(batch, length // block, block, heads, dim).swapaxes(0, 1)
    out = jax.lax.map(lambda qb: _cross_image_block(qb, reference_kv, own_kv, scale), blocks)
    return out.swapaxes(0, 1).reshape(q.shape)


def _cudnn(q: jnp.ndarray, reference_kv: KeyValues, own_kv: KeyValues | None, scale: float) -> jnp.ndarray:
    """Both stages as one cuDNN flash attention call (fusion over the concatenated keys).

    A layer whose shape this GPU's cuDNN rejects at trace time (head dim 160 of SD 1.5's inner blocks
    before Hopper) runs `_blockwise` instead, so the other layers keep flash attention.
    """
    try:
        return _flash(q, reference_kv, own_kv, scale)
    except NotImplementedError:
        return _blockwise(q, reference_kv, own_kv, scale)


def _flash(q: jnp.ndarray, reference_kv: KeyValues, own_kv: KeyValues | None, scale: float) -> jnp.ndarray:
    if own_kv is None:
        grouped = _grouped(q, reference_kv[0].shape[0])
        out = jax.nn.dot_product_attention(grouped, *reference_kv, scale=scale, implementation="cudnn")
        return out.reshape(q.shape)
    keys, values = pallas_attention.fused_key_values(q.shape[0], reference_kv, own_kv)
    return jax.nn.dot_product_attention(q, keys, values, scale=scale, implementation="cudnn")


# The injected layers' kernels by `RunOptions.attention` name (None: "xla").
KERNELS = {"xla": _blockwise, "cudnn": _cudnn, "pallas": pallas_attention.pallas_attention}


def exemplar_share(q: jnp.ndarray, reference_kv: KeyValues, own_kv: KeyValues, scale: float) -> jnp.ndarray:
    """Per entry (G*n,), the softmax mass fusion gives the exemplar's tokens, averaged over heads and queries.

    For each query it is sigmoid(lse_exemplar - lse_own), the share of the exemplar's keys in the
    softmax over both; computed over blocks of queries like `_blockwise`.
    """
    batch, length, heads, dim = q.shape
    block = _query_block(length)
    groups = reference_kv[0].shape[0]

    def log_sum_exp(qb: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
        logits = jnp.einsum("bqhd,bkhd->bqhk", qb, k, preferred_element_type=jnp.float32) * scale
        return jax.nn.logsumexp(logits, axis=-1)

    def share(qb: jnp.ndarray) -> jnp.ndarray:
        exemplar = log_sum_exp(_grouped(qb, groups), reference_kv[0]).reshape(qb.shape[:3])
        return jax.nn.sigmoid(exemplar - log_sum_exp(qb, own_kv[0])).mean(axis=(1, 2))

    blocks = q.reshape(batch, length // block, block, heads, dim).swapaxes(0, 1)
    return jax.lax.map(share, blocks).mean(axis=0)


def cross_image_attention(
    attention: Any,
    hidden: jnp.ndarray,
    reference: jnp.ndarray,
    stage: Stage,
    implementation: str | None = None,
    shares: dict[tuple[str, ...], jnp.ndarray] | None = None,
) -> jnp.ndarray:
    """A diffusers `FlaxAttention` layer's output for generated entries attending across images.

    hidden (G*n, L, D): the generated entries' input, G contiguous groups of n entries; reference
    (G, L, D): the exemplar's input to the same layer, one per group (group g pairs with reference g).
    stage: PLAIN (each entry's own tokens), REPLACEMENT (keys/values from the exemplar only) or FUSION
    (from the exemplar's and the entry's own tokens together); a Python int, or a traced scalar that
    `lax.switch` reads. `shares`: receives each entry's `exemplar_share` under the layer's path (1.0 in
    replacement, NaN in plain; traces only, the output is the same with or without it).
    """

    def heads(x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(x.shape[0], x.shape[1], attention.heads, attention.dim_head)

    def key_values(x: jnp.ndarray) -> KeyValues:
        return heads(attention.key(x)), heads(attention.value(x))

    own, stored = hidden.astype(attention.dtype), reference.astype(attention.dtype)
    queries = heads(attention.query(own))
    kernel = KERNELS[implementation or "xla"]

    def attended(reference_kv: KeyValues, own_kv: KeyValues | None, share: Callable[[], jnp.ndarray]) -> tuple:
        mixed = kernel(queries, reference_kv, own_kv, attention.scale).astype(attention.dtype)
        return mixed, None if shares is None else share().astype(jnp.float32)

    def plain() -> tuple:
        return attended(key_values(own), None, lambda: jnp.full(own.shape[:1], jnp.nan))

    def replacement() -> tuple:
        return attended(key_values(stored), None, lambda: jnp.ones(own.shape[:1]))

    def fusion() -> tuple:
        reference_kv, own_kv = key_values(stored), key_values(own)
        return attended(reference_kv, own_kv, lambda: exemplar_share(queries, reference_kv, own_kv, attention.scale))

    branches = (plain, replacement, fusion)
    mixed, share = branches[stage]() if isinstance(stage, int) else jax.lax.switch(stage, branches)
    if shares is not None:
        shares[tuple(attention.path)] = share
    out = attention.proj_attn(mixed.reshape(own.shape[0], own.shape[1], attention.heads * attention.dim_head))
    return attention.dropout_layer(out, deterministic=True)


def _replace_self_attention(
    reference_of: Callable[[Any, jnp.ndarray], jnp.ndarray],
    stage: Stage,
    implementation: str | None,
    shares: dict | None = None,
) -> contextlib.AbstractContextManager:
    """Intercept every attn1 and run `cross_image_attention` against `reference_of(layer, its input)`."""

    def interceptor(next_fun, args, kwargs, context):
        if not _is_self_attention(context):
            return next_fun(*args, **kwargs)
        reference = reference_of(context.module, args[0])
        return cross_image_attention(context.module, args[0], reference, stage, implementation, shares)

    return nn.intercept_methods(interceptor)


def inject_reference(
    reference: dict[tuple[str, ...], jnp.ndarray],
    stage: Stage,
    implementation: str | None = None,
    shares: dict | None = None,
) -> contextlib.AbstractContextManager:
    """Within this context every attn1 runs `cross_image_attention` against `reference[its path]`.

    `shares`: a dict that receives each layer's exemplar share (see `core.traces`).
    """
    return _replace_self_attention(lambda layer, _: reference[tuple(layer.path)], stage, implementation, shares)


def inject_from_batch(
    leading: int,
    group_reference: jnp.ndarray,
    stage: Stage,
    implementation: str | None = None,
    shares: dict | None = None,
) -> contextlib.AbstractContextManager:
    """Within this context every attn1 treats the first `leading` batch entries as the exemplar's.

    Those entries attend to themselves as usual; every other entry runs `cross_image_attention`
    against exemplar entry `group_reference[g]` for its group g (the authors' layout: the exemplar
    is recomputed in the same UNet batch instead of read from stored features). `shares` as in
    `inject_reference`, for the generated entries.
    """

    def interceptor(next_fun, args, kwargs, context):
        if not _is_self_attention(context):
            return next_fun(*args, **kwargs)
        hidden = args[0]
        exemplar, own = hidden[:leading], hidden[leading:]
        exemplar_out = next_fun(exemplar, *args[1:], **kwargs)
        reference = exemplar[group_reference]
        own_out = cross_image_attention(context.module, own, reference, stage, implementation, shares)
        return jnp.concatenate([exemplar_out, own_out.astype(exemplar_out.dtype)], axis=0)

    return nn.intercept_methods(interceptor)


def own_reference(implementation: str | None = None) -> contextlib.AbstractContextManager:
    """Within this context every attn1 attends to its own input through `cross_image_attention`.

    That is plain self-attention computed by the injected layers' kernel: a like-for-like baseline.
    """
    return _replace_self_attention(lambda _, hidden: hidden, PLAIN, implementation)
