"""The Pallas TPU attention kernel, run in Pallas' TPU interpret mode on the CPU, against the blockwise kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from rival_jax.core import attention
from rival_jax.core import pallas_attention as pallas
from rival_jax.core.attention import _blockwise

GROUPS, PER_GROUP, HEADS, DIM = 2, 2, 2, 8


def _inputs(queries: int, keys: int, dim: int = DIM, dtype: jnp.dtype = jnp.float32) -> tuple:
    entries = GROUPS * PER_GROUP
    keys_of = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys_of[0], (entries, queries, HEADS, dim))
    reference = tuple(jax.random.normal(k, (GROUPS, keys, HEADS, dim)) for k in keys_of[1:3])
    own = tuple(jax.random.normal(k, (entries, queries, HEADS, dim)) for k in keys_of[3:])
    return q.astype(dtype), tuple(x.astype(dtype) for x in reference), tuple(x.astype(dtype) for x in own)


def _relative_error(out: jax.Array, expected: jax.Array) -> float:
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def _interpreted(q: jax.Array, reference: tuple, own: tuple | None, scale: float) -> jax.Array:
    with pltpu.force_tpu_interpret_mode():
        return pallas.pallas_attention(q, reference, own, scale)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks small enough that a few hundred tokens take several padded, masked blocks."""
    monkeypatch.setattr(pallas, "QUERY_BLOCK", 64)
    monkeypatch.setattr(pallas, "SINGLE_KEY_BLOCK", 128)


@pytest.mark.parametrize("fuse", [False, True], ids=["replacement", "fusion"])
def test_pallas_equals_blockwise_when_keys_fit_one_unpadded_block(fuse: bool) -> None:
    q, reference, own = _inputs(queries=72, keys=72)
    own = own if fuse else None
    expected = _blockwise(q, reference, own, DIM**-0.5)
    assert _relative_error(_interpreted(q, reference, own, DIM**-0.5), expected) <= 1e-5


@pytest.mark.parametrize("fuse", [False, True], ids=["replacement", "fusion"])
def test_pallas_equals_blockwise_over_padded_masked_blocks(fuse: bool, small_blocks: None) -> None:
    q, reference, own = _inputs(queries=100, keys=300)
    own = own if fuse else None
    assert pallas.key_blocking(300 + (100 if fuse else 0))[0] > 300 + (100 if fuse else 0)  # padding is masked
    expected = _blockwise(q, reference, own, DIM**-0.5)
    assert _relative_error(_interpreted(q, reference, own, DIM**-0.5), expected) <= 1e-5


def test_pallas_pads_a_head_dim_over_128_that_is_not_a_multiple_of_it() -> None:
    q, reference, own = _inputs(queries=24, keys=24, dim=136)
    expected = _blockwise(q, reference, own, 136**-0.5)
    assert _relative_error(_interpreted(q, reference, own, 136**-0.5), expected) <= 1e-5


@pytest.mark.parametrize("fuse", [False, True], ids=["replacement", "fusion"])
def test_pallas_in_bfloat16_is_as_accurate_as_blockwise(fuse: bool, small_blocks: None) -> None:
    q, reference, own = _inputs(queries=100, keys=300, dtype=jnp.bfloat16)
    own = own if fuse else None
    exact = _blockwise(*jax.tree.map(lambda x: x.astype(jnp.float32), (q, reference, own)), DIM**-0.5)
    # attention.py casts either kernel's output to the layer's dtype
    blockwise = _relative_error(_blockwise(q, reference, own, DIM**-0.5).astype(jnp.bfloat16), exact)
    flash = _relative_error(_interpreted(q, reference, own, DIM**-0.5).astype(jnp.bfloat16), exact)
    assert flash <= blockwise + 1e-3


def test_blocks_suit_sd15_fusion_at_512() -> None:
    assert pallas.key_blocking(2 * 4096) == (8192, 512)
    assert pallas.query_blocking(4096) == (4096, pallas.QUERY_BLOCK)
    assert pallas.key_blocking(2 * 576) == (1152, 128)  # SD 2.1 at 768: 24x24 tokens, concatenated


def test_the_pallas_kernel_is_what_the_injected_layers_run_under_its_name() -> None:
    q, reference, own = _inputs(queries=72, keys=72)
    with pltpu.force_tpu_interpret_mode():
        through_table = attention.KERNELS["pallas"](q, reference, own, DIM**-0.5)
    assert _relative_error(through_table, _blockwise(q, reference, own, DIM**-0.5)) <= 1e-5


def test_auto_attention_runs_the_blockwise_kernel_on_a_cpu_and_pallas_is_refused_there() -> None:
    from rival_jax.errors import RivalError
    from rival_jax.options import resolve_attention

    assert jax.default_backend() == "cpu"
    assert resolve_attention("auto", jnp.float32) == resolve_attention("auto", jnp.bfloat16) == "xla"
    with pytest.raises(RivalError, match="needs a TPU"):
        resolve_attention("pallas", jnp.bfloat16)
