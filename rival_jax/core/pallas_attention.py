"""The injected self-attention as Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu`).

Same signature and result as `attention._blockwise`: queries q (G*n, T, H, d) of G contiguous groups
of n entries over their group's exemplar keys/values (G, S, H, d) (replacement), or over the
exemplar's and the entry's own keys/values (G*n, T, H, d) together (fusion: one softmax over S + T
keys, the keys concatenated). Replacement stacks a group's queries into one sequence against its
exemplar, as the blockwise kernel does.

Block sizes come from each layer's shapes. Keys that fit one block (`SINGLE_KEY_BLOCK`) are one
block of their exact length, unpadded; longer key sequences are padded to a multiple of 128 lanes and
the padding masked out (segment ids 0 against the queries' 1). Queries are padded to a multiple of
their block and the padded rows dropped. A head dim over 128 that is not a multiple of 128 (SD 1.5's
160) is zero-padded to one: zero features leave the scores and the kept output features unchanged.
On a CPU the kernel runs in Pallas' TPU interpret mode (`pltpu.force_tpu_interpret_mode()`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rival_jax.core.parallel import padded_length

LANES = 128
SUBLANES = 8
QUERY_BLOCK = 256
SINGLE_KEY_BLOCK = 1024
KEY_BLOCKS = (512, 256, 128)
KeyValues = tuple[jax.Array, jax.Array]


def _pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def key_blocking(length: int) -> tuple[int, int]:
    """(padded key length, key block) for `length` keys: one exact block, or 128-lane blocks of the padded keys.

    >>> key_blocking(576), key_blocking(8192)
    ((576, 576), (8192, 512))
    """
    if length <= SINGLE_KEY_BLOCK:
        return length, length
    padded = padded_length(length, LANES)
    return padded, next(block for block in KEY_BLOCKS if padded % block == 0)


def query_blocking(length: int) -> tuple[int, int]:
    """(padded query length, query block): blocks of `QUERY_BLOCK` rows, or one block of 8-row multiples.

    >>> query_blocking(4096), query_blocking(100)
    ((4096, 256), (104, 104))
    """
    if length <= QUERY_BLOCK:
        block = padded_length(length, SUBLANES)
        return block, block
    return padded_length(length, QUERY_BLOCK), QUERY_BLOCK


def _head_dim(dim: int) -> int:
    return dim if dim <= LANES else padded_length(dim, LANES)


def flash_attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention (B, T, H, d) of q over k/v (B, S, H, d) with the Pallas TPU flash kernel, any T and S.

    Args:
        q: queries (B, T, H, d); k, v: keys and values (B, S, H, d); scale: the logits' factor.

    >>> out = flash_attend(q, k, v, 40**-0.5)  # on a CPU: within pltpu.force_tpu_interpret_mode()
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as flash  # Pallas' TPU ops load only when used

    batch, length, _, dim = q.shape
    keys = k.shape[1]
    q_length, q_block = query_blocking(length)
    k_length, k_block = key_blocking(keys)
    width = _head_dim(dim)

    def layout(x: jax.Array, size: int) -> jax.Array:
        return _pad_axis(_pad_axis(x, 1, size), 3, width).transpose(0, 2, 1, 3)

    segments = None
    if k_length != keys:
        valid = (jnp.arange(k_length) < keys).astype(jnp.int32)
        segments = flash.SegmentIds(jnp.ones((batch, q_length), jnp.int32), jnp.broadcast_to(valid, (batch, k_length)))
    blocks = flash.BlockSizes(block_q=q_block, block_k_major=k_block, block_k=k_block, block_b=1)
    out = flash.flash_attention(
        layout(q, q_length),
        layout(k, k_length),
        layout(v, k_length),
        segment_ids=segments,
        sm_scale=float(scale),
        block_sizes=blocks,
    )
    return out.transpose(0, 2, 1, 3)[:, :length, :, :dim]


def fused_key_values(entries: int, reference_kv: KeyValues, own_kv: KeyValues) -> KeyValues:
    """Fusion's keys and values per entry: its group's exemplar tokens, then its own (entries, S + T, H, d).

    Shared with the cuDNN kernel (`attention._flash`), the other one that attends over them concatenated.
    """
    groups = reference_kv[0].shape[0]
    per_entry = [jnp.repeat(x, entries // groups, axis=0) for x in reference_kv]
    keys, values = (jnp.concatenate([r, o], axis=1) for r, o in zip(per_entry, own_kv, strict=True))
    return keys, values


def pallas_attention(q: jax.Array, reference_kv: KeyValues, own_kv: KeyValues | None, scale: float) -> jax.Array:
    """Cross-image attention of `attention._blockwise`, as Pallas TPU flash attention.

    Args:
        q: the generated entries' queries (G*n, T, H, d), G contiguous groups of n entries.
        reference_kv: each group's exemplar keys and values (G, S, H, d).
        own_kv: the entries' own keys and values (G*n, T, H, d) for fusion; None for replacement.
        scale: the logits' factor (the layer's `attention.scale`).

    >>> out = pallas_attention(q, (k_ref, v_ref), None, layer.scale)  # replacement
    """
    groups = reference_kv[0].shape[0]
    if own_kv is None:
        grouped = q.reshape(groups, -1, *q.shape[2:])
        return flash_attend(grouped, *reference_kv, scale).reshape(q.shape)
    return flash_attend(q, *fused_key_values(q.shape[0], reference_kv, own_kv), scale)
