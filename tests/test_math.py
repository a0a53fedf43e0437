"""Properties of the RIVAL math: attention injection, AdaIN, shuffles, start latents, stages, DDIM."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxDDIMScheduler
from diffusers.models.attention_flax import FlaxAttention
from diffusers.models.unets.unet_2d_condition_flax import FlaxUNet2DConditionOutput
from flax.traverse_util import flatten_dict

from rival_jax.config import RivalConfig
from rival_jax.core.attention import (
    FUSION,
    PLAIN,
    QUERY_BLOCK,
    REPLACEMENT,
    inject_reference,
    own_reference,
)
from rival_jax.core.ddim import DDIMSchedule, ddim_step
from rival_jax.core.inversion import invert
from rival_jax.core.reference import ReferenceFeatures
from rival_jax.core.sampler import (
    GenerationInputs,
    adain,
    aligned_generate,
    attention_stage,
    shuffle_within,
    start_latents,
)
from rival_jax.core.unet import Conditioning, unet_output, unet_output_injected, unet_output_recording
from rival_jax.models.random_models import SCHEDULER_CONFIG


class SelfAttention(nn.Module):
    """A transformer block's self-attention, named as diffusers names it."""

    @nn.compact
    def __call__(self, x):
        return FlaxAttention(query_dim=16, heads=2, dim_head=8, name="attn1")(x)


@pytest.fixture(scope="module")
def attention():
    module = SelfAttention()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 16))
    return module, module.init(jax.random.PRNGKey(1), x), x


def _injected(module, params, x, reference, stage):
    with inject_reference({("attn1",): reference}, stage):
        return module.apply(params, x)


@pytest.mark.parametrize("stage", [PLAIN, REPLACEMENT, FUSION])
def test_identical_reference_gives_plain_self_attention(attention, stage):
    module, params, x = attention
    chex.assert_trees_all_close(_injected(module, params, x, x, stage), module.apply(params, x), atol=1e-5)


def test_a_traced_stage_picks_the_same_attention_as_a_fixed_one(attention):
    """Generation passes the stage as a traced scalar: each hooked layer switches between the three."""
    module, params, x = attention
    reference = jax.random.normal(jax.random.PRNGKey(6), x.shape)
    traced = jax.jit(lambda stage: _injected(module, params, x, reference, stage))
    outputs = [traced(jnp.int32(stage)) for stage in (PLAIN, REPLACEMENT, FUSION)]
    for stage, output in zip((PLAIN, REPLACEMENT, FUSION), outputs, strict=True):
        chex.assert_trees_all_close(output, _injected(module, params, x, reference, stage), atol=1e-6)
    chex.assert_trees_all_close(outputs[PLAIN], module.apply(params, x), atol=1e-5)
    assert not np.allclose(outputs[REPLACEMENT], outputs[FUSION], atol=1e-3)


def test_own_reference_is_plain_self_attention(attention):
    module, params, x = attention
    wide = jax.random.normal(jax.random.PRNGKey(4), (2, QUERY_BLOCK + 8, 16))
    for tokens in (x, wide):
        with own_reference():
            blockwise = module.apply(params, tokens)
        chex.assert_trees_all_close(blockwise, module.apply(params, tokens), atol=1e-5)


def test_replacement_takes_keys_and_values_from_reference_only(attention):
    module, params, x = attention
    reference = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    p = params["params"]["attn1"]
    q = (x @ p["to_q"]["kernel"]).reshape(3, 10, 2, 8)
    k = (reference @ p["to_k"]["kernel"]).reshape(3, 10, 2, 8)
    v = (reference @ p["to_v"]["kernel"]).reshape(3, 10, 2, 8)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(3, 10, 16)
    expected = mixed @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
    chex.assert_trees_all_close(_injected(module, params, x, reference, REPLACEMENT), expected, atol=1e-5)


def test_fusion_attends_to_reference_and_own_tokens(attention):
    module, params, x = attention
    reference = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    fused = _injected(module, params, x, reference, FUSION)
    assert not np.allclose(fused, module.apply(params, x), atol=1e-3)
    assert not np.allclose(fused, _injected(module, params, x, reference, REPLACEMENT), atol=1e-3)


@pytest.mark.parametrize("tokens", [2 * QUERY_BLOCK, QUERY_BLOCK + 44])
def test_blockwise_injection_equals_softmax_over_concatenated_keys(tokens):
    """Groups of entries share one reference; fusion is one softmax over [reference tokens, own tokens]."""
    module = SelfAttention()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, tokens, 16))
    reference = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (2, tokens, 16))
    variables = module.init(jax.random.PRNGKey(2), x)
    p = variables["params"]["attn1"]

    def heads(a):
        return a.reshape(a.shape[0], a.shape[1], 2, 8)

    per_entry = jnp.repeat(reference, 2, axis=0)  # entries 0, 1 pair with reference 0; 2, 3 with reference 1
    q = heads(x @ p["to_q"]["kernel"])
    for stage, source in ((REPLACEMENT, per_entry), (FUSION, jnp.concatenate([per_entry, x], axis=1))):
        k, v = heads(source @ p["to_k"]["kernel"]), heads(source @ p["to_v"]["kernel"])
        mixed = jax.nn.dot_product_attention(q, k, v).reshape(x.shape)
        expected = mixed @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
        chex.assert_trees_all_close(_injected(module, variables, x, reference, stage), expected, atol=2e-5)


@pytest.mark.parametrize("stage", [REPLACEMENT, FUSION])
def test_cudnn_layer_with_a_rejected_shape_falls_back_to_blockwise(attention, stage, monkeypatch):
    """cuDNN refuses some head dims at trace time (NotImplementedError); that layer must still be computed."""

    def rejected(*args, **kwargs):
        raise NotImplementedError("The head dim must be <= 128 and a multiple of 8")

    module, params, x = attention
    reference = jax.random.normal(jax.random.PRNGKey(5), x.shape)
    expected = _injected(module, params, x, reference, stage)
    monkeypatch.setattr(jax.nn, "dot_product_attention", rejected)
    with inject_reference({("attn1",): reference}, stage, "cudnn"):
        chex.assert_trees_all_close(module.apply(params, x), expected, atol=1e-6)


def test_recording_covers_every_self_attention_layer_of_the_unet(tiny_pipe):
    unet, params = tiny_pipe.models.unet, tiny_pipe.params["unet"]
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16, 16))
    text = tiny_pipe.encode_prompt(["", "a cat"], (128, 128))
    eps, hidden = unet_output_recording(unet, params, x, 501, text)
    blocks = {path[: path.index("attn1") + 1] for path in flatten_dict(params) if "attn1" in path}
    assert set(hidden) == blocks and len(blocks) >= 5
    chex.assert_trees_all_close(eps, unet_output(unet, params, x, 501, text), atol=1e-5)
    for path, states in hidden.items():
        chex.assert_shape(states, (2, None, flatten_dict(params)[(*path, "to_q", "kernel")].shape[0]))
    same = unet_output_injected(unet, params, x, 501, text, hidden, FUSION)
    chex.assert_trees_all_close(same, eps, atol=1e-4)
    swapped = {path: states[::-1] for path, states in hidden.items()}
    assert not np.allclose(unet_output_injected(unet, params, x, 501, text, swapped, REPLACEMENT), eps, atol=1e-3)


def test_adain_gives_target_channel_statistics():
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (5, 4, 8, 8)) + 2.0
    target = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8)) - 1.0
    out = adain(x, target)
    chex.assert_shape(out, x.shape)
    np.testing.assert_allclose(out.mean(axis=(2, 3)), np.broadcast_to(target.mean(axis=(1, 2)), (5, 4)), atol=1e-5)
    want = np.sqrt(np.var(np.asarray(target), axis=(1, 2), ddof=1) + 1e-5)
    got = np.sqrt(np.var(np.asarray(out), axis=(2, 3), ddof=1) + 1e-5)
    np.testing.assert_allclose(got, np.broadcast_to(want, (5, 4)), rtol=1e-4)


def test_shuffle_is_one_spatial_permutation_for_all_channels():
    positions = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
    x = jnp.stack([positions, positions * 10.0, -positions, positions + 0.5])
    out = shuffle_within(x, jnp.ones((8, 8), bool), jax.random.PRNGKey(0))
    permutation = np.asarray(out[0]).astype(int).reshape(-1)
    assert sorted(permutation) == list(range(64)) and (permutation != np.arange(64)).any()
    for channel in range(4):
        np.testing.assert_array_equal(out[channel].reshape(-1), x[channel].reshape(-1)[permutation])


def test_shuffle_within_region_keeps_outside_and_permutes_inside():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8))
    region = jnp.zeros((8, 8), bool).at[2:6, 1:5].set(True)
    out = shuffle_within(x, region, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(out[:, ~region], x[:, ~region])
    np.testing.assert_array_equal(np.sort(out[0, region]), np.sort(x[0, region]))
    assert not np.array_equal(out[:, region], x[:, region])


def _init(config: RivalConfig) -> dict:
    return {"latent_init": config.latent_init, "latent_alignment": config.latent_alignment}


def test_start_latents_depend_on_seed_and_index_only():
    x_t = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8))
    region = jnp.ones((8, 8), bool)
    key = jax.random.PRNGKey(7)
    for config in (RivalConfig(), RivalConfig(latent_init="adaptive_gaussian"), RivalConfig(latent_alignment=False)):
        four = start_latents(key, jnp.arange(4), x_t, region, **_init(config))
        chex.assert_shape(four, (4, 4, 8, 8))
        np.testing.assert_array_equal(four[2], start_latents(key, jnp.array([2]), x_t, region, **_init(config))[0])
        assert not np.allclose(four[0], four[1])
    exemplar = start_latents(key, jnp.arange(2), x_t, region, **_init(RivalConfig(latent_init="exemplar")))
    np.testing.assert_array_equal(exemplar, jnp.stack([x_t, x_t]))


def test_adaptive_gaussian_matches_channel_statistics():
    x_t = jnp.array([0.5, -1.0, 2.0, 0.0])[:, None, None] + jnp.array([1.0, 0.5, 2.0, 0.1])[:, None, None] * (
        jax.random.normal(jax.random.PRNGKey(0), (4, 64, 64))
    )
    out = start_latents(
        jax.random.PRNGKey(1),
        jnp.arange(1),
        x_t,
        jnp.ones((64, 64), bool),
        **_init(RivalConfig(latent_init="adaptive_gaussian")),
    )[0]
    np.testing.assert_allclose(out.mean(axis=(1, 2)), x_t.mean(axis=(1, 2)), atol=0.05)
    np.testing.assert_allclose(out.std(axis=(1, 2)), x_t.std(axis=(1, 2)), rtol=0.05)


@pytest.mark.parametrize(
    ("t", "changes", "stage"),
    [
        (601, {}, REPLACEMENT),
        (600, {}, FUSION),
        (1, {}, FUSION),
        (901, {"early_replacement": False}, FUSION),
        (300, {"attention_injection": False}, PLAIN),
        (901, {"editing_start": 900}, PLAIN),
        (900, {"editing_start": 900}, REPLACEMENT),
    ],
)
def test_attention_stage_follows_the_timestep(t, changes, stage):
    settings = RivalConfig(t_align=600, **changes).as_arrays()
    assert int(attention_stage(jnp.int32(t), settings)) == stage


class InputFreeUNet(nn.Module):
    """A 'UNet' whose noise prediction depends on t only: DDIM inversion is then exact."""

    @nn.compact
    def __call__(self, sample, t, text, added_cond_kwargs=None):
        scale = self.param("scale", nn.initializers.ones, (4,))
        eps = jnp.sin(0.01 * t + jnp.arange(4.0)) * scale
        return FlaxUNet2DConditionOutput(sample=jnp.broadcast_to(eps[None, :, None, None], sample.shape))


def test_inversion_then_plain_ddim_reconstructs_x0():
    schedule = DDIMSchedule.from_scheduler_config(SCHEDULER_CONFIG)
    unet = InputFreeUNet()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8))
    text = Conditioning(text=jnp.zeros((1, 3, 2)))
    params = unet.init(jax.random.PRNGKey(0), x0[None], 1, text.text)["params"]
    timesteps = jnp.asarray(schedule.timesteps(10))
    chain = invert(unet, params, schedule, x0, text, timesteps)
    chex.assert_shape(chain, (11, 4, 8, 8))
    assert float(jnp.abs(chain[-1] - x0).mean()) > 0.1
    reference = ReferenceFeatures(hidden={}, eps=jnp.zeros((10, 4, 8, 8)), contexts=1)
    settings = RivalConfig(guidance_scale=1.0, attention_injection=False, noise_alignment=False).as_arrays()
    inputs = GenerationInputs(
        start=chain[-1:],
        chain=chain,
        conditioning=Conditioning(text=jnp.zeros((2, 3, 2))),
        contexts=text,
        reference=reference,
        region=jnp.ones((8, 8), bool),
        settings=settings,
        timesteps=timesteps,
    )
    final = aligned_generate(unet, params, schedule, inputs)
    chex.assert_trees_all_close(final[0], x0, atol=1e-4)


def test_ddim_step_round_trip():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    eps = jax.random.normal(jax.random.PRNGKey(1), (4, 4))
    there = ddim_step(x, eps, jnp.float32(0.9), jnp.float32(0.3))
    chex.assert_trees_all_close(ddim_step(there, eps, jnp.float32(0.3), jnp.float32(0.9)), x, atol=1e-5)


# The scheduler configs the real checkpoints ship: SD 1.5 (PNDM, epsilon) and SD 2.1 (DDIM, v-prediction).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER = {**SD15_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}


@pytest.mark.parametrize("config", [SD15_SCHEDULER, SD21_SCHEDULER], ids=["sd15-epsilon", "sd21-v-prediction"])
def test_ddim_step_matches_diffusers_flax_ddim_scheduler(config):
    """Every generation step, the last one (to 'before t = 0') included, is diffusers' DDIM step with eta = 0."""
    steps = 7
    schedule = DDIMSchedule.from_scheduler_config(config)
    peer = FlaxDDIMScheduler.from_config({k: v for k, v in config.items() if k != "_class_name"})
    state = peer.set_timesteps(peer.create_state(), steps)
    np.testing.assert_array_equal(schedule.timesteps(steps), state.timesteps)
    x = 1.5 * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8))
    output = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    for t in schedule.timesteps(steps):
        alpha = schedule.alpha(t)
        eps = schedule.epsilon(output, x, alpha)
        ours = ddim_step(x, eps, alpha, schedule.alpha(t - schedule.stride(steps)))
        theirs = peer.step(state, output, int(t), x).prev_sample
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5, err_msg=f"t={t}")
