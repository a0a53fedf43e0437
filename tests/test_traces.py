"""Per-step traces: the exemplar's attention share and the latents' statistic distance, without changing images."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rival_jax.cli import main
from rival_jax.config import RivalConfig
from rival_jax.core.attention import exemplar_share
from rival_jax.core.traces import statistic_distance


def test_exemplar_share_is_the_softmax_mass_on_the_exemplar_keys():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (4, 6, 2, 8))  # two groups of two entries, 6 tokens, 2 heads
    reference = (jax.random.normal(keys[1], (2, 5, 2, 8)), jax.random.normal(keys[2], (2, 5, 2, 8)))
    own = (2.0 * jax.random.normal(keys[3], (4, 6, 2, 8)), jax.random.normal(keys[4], (4, 6, 2, 8)))
    scale = 8**-0.5
    exemplar_keys = jnp.repeat(reference[0], 2, axis=0)
    logits = jnp.einsum("bqhd,bkhd->bqhk", q, jnp.concatenate([exemplar_keys, own[0]], axis=1)) * scale
    expected = jax.nn.softmax(logits, axis=-1)[..., :5].sum(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(exemplar_share(q, reference, own, scale), expected, rtol=1e-5)


def test_statistic_distance_is_zero_for_a_shuffle_and_positive_for_a_shift():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8))
    shuffled = x.reshape(4, -1)[:, jax.random.permutation(jax.random.PRNGKey(2), 64)].reshape(x.shape)
    distance = statistic_distance(jnp.stack([shuffled, x + 0.5]), x)
    np.testing.assert_allclose(distance, [0.0, 0.5 * 2.0], atol=1e-5)  # mean shift 0.5 in each of 4 channels


@pytest.fixture(scope="module")
def traced(tiny_pipe, tiny_chain):
    """One generation without traces and, in both reference modes, with them (replacement, fusion, AdaIN)."""
    from rival_jax import RivalPipeline

    recompute = RivalPipeline(tiny_pipe.models, tiny_pipe.options.replace(reference_mode="recompute"))
    run = {"num_variations": 2, "seed": 3, "config": RivalConfig(t_align=600, t_early=600), "output_type": "np"}
    plain = tiny_pipe.generate(tiny_chain, **run)
    return plain, {
        pipe.reference_mode(tiny_chain): pipe.generate(tiny_chain, **run, return_traces=True)
        for pipe in (tiny_pipe, recompute)
    }


def test_traces_leave_images_unchanged_and_off_returns_none(traced):
    plain, with_traces = traced
    assert plain.traces is None and plain.reference_mode == "keep"
    np.testing.assert_array_equal(plain.latents, with_traces["keep"].latents)
    np.testing.assert_array_equal(plain.images, with_traces["keep"].images)
    recomputed = with_traces["recompute"].latents
    assert np.linalg.norm(recomputed - plain.latents) / np.linalg.norm(plain.latents) < 1e-4


@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_traces_follow_the_attention_stages_and_start_on_the_chain(traced, tiny_chain, mode):
    found = traced[1][mode].traces
    share, timesteps = found.exemplar_attention_share, tiny_chain.timesteps
    assert list(found.timesteps) == list(timesteps) and share.shape == (len(timesteps), len(found.layers))
    assert len(found.layers) > 1 and all(layer.endswith("attn1") for layer in found.layers)
    replacement, fusion = timesteps > 600, timesteps <= 600
    assert replacement.any() and fusion.any()
    np.testing.assert_array_equal(share[replacement], 1.0)
    assert np.all((share[fusion] > 0.0) & (share[fusion] < 1.0))
    distance = found.latent_stat_distance
    assert distance.shape == timesteps.shape and abs(distance[0]) < 1e-4 and np.all(distance[1:] > 0)


def test_keep_and_recompute_traces_agree(traced):
    keep, recompute = (traced[1][mode].traces for mode in ("keep", "recompute"))
    assert keep.layers == recompute.layers
    np.testing.assert_allclose(keep.exemplar_attention_share, recompute.exemplar_attention_share, atol=1e-4)
    np.testing.assert_allclose(keep.latent_stat_distance, recompute.latent_stat_distance, atol=1e-4)


def test_generate_traces_flag_writes_traces_json(capsys, tmp_path, tiny_flax, exemplar):
    from PIL import Image

    Image.fromarray(exemplar).save(tmp_path / "exemplar.jpg")  # as tests/test_cli.py: its programs are reused
    output = tmp_path / "out"
    args = ["generate", tmp_path / "exemplar.jpg", "--model", tiny_flax, "--steps", "3", "-n", "2", "--no-progress"]
    args += ["-o", output, "--traces", "--editing-start", "500"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    traces = json.loads((output / "traces.json").read_text())
    assert set(traces) == {"timesteps", "layers", "exemplar_attention_share", "latent_stat_distance"}
    sidecar = json.loads((output / "rival.json").read_text())
    assert sidecar["traces"] == "traces.json" and len(traces["timesteps"]) == 3
    first, *later = traces["exemplar_attention_share"]
    assert first == [None] * len(traces["layers"])  # t > editing_start: no injection
    assert all(0.0 < share < 1.0 for step in later for share in step) and len(traces["latent_stat_distance"]) == 3
