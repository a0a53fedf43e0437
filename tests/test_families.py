"""SD 1.x, SD 2.x (v-prediction) and SDXL: peer equality with diffusers' own Flax pipelines, and RIVAL on each."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline, FlaxStableDiffusionXLPipeline

from rival_jax import RivalConfig
from rival_jax.core.ddim import DDIM_OVERRIDES
from rival_jax.core.unet import unet_output

STEPS = 4
PROMPT, NEGATIVE = "a photo of a cat", "blue sky"
PLAIN = RivalConfig(guidance_scale=5.0, attention_injection=False, noise_alignment=False)


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _scheduler(pipe):
    """diffusers' DDIM scheduler from the checkpoint's config, set up as rival-jax's (docs/method.md, DDIM)."""
    config = json.loads((pipe.models.path / "scheduler" / "scheduler_config.json").read_text())
    scheduler = FlaxDDIMScheduler.from_config({**config, **DDIM_OVERRIDES})
    return scheduler, scheduler.create_state()


def _ours(pipe, exemplar, count, seed=0):
    """Plain generation through rival-jax (every RIVAL switch off) and the start latents it used."""
    chain = pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=STEPS)
    start = jax.random.normal(jax.random.PRNGKey(seed), (count, *chain.latents.shape[1:]))
    out = pipe.generate(chain, prompt=PROMPT, negative_prompt=NEGATIVE, latents=start, config=PLAIN, output_type="np")
    return chain, start, out.images


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_plain_generation_equals_diffusers_flax_stable_diffusion_pipeline(family_pipes, exemplar, family):
    pipe = family_pipes[family]
    chain, start, ours = _ours(pipe, exemplar, count=1)
    scheduler, state = _scheduler(pipe)
    models = pipe.models
    peer = FlaxStableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoders[0],
        tokenizer=models.tokenizers[0],
        unet=models.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
    )
    width, height = chain.size
    theirs = peer(
        peer.prepare_inputs([PROMPT]),
        {**pipe.params, "scheduler": state},
        jax.random.PRNGKey(0),
        num_inference_steps=STEPS,
        height=height,
        width=width,
        guidance_scale=PLAIN.guidance_scale,
        latents=start,
        neg_prompt_ids=peer.prepare_inputs([NEGATIVE]),
        jit=False,
    ).images
    assert theirs.shape == ours.shape == (1, height, width, 3)
    assert relative_error(ours, theirs) < 1e-4


def test_plain_generation_equals_diffusers_flax_sdxl_pipeline(family_pipes, exemplar):
    pipe = family_pipes["sdxl"]
    chain = pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=STEPS)
    start = jax.random.normal(jax.random.PRNGKey(1), (2, *chain.latents.shape[1:]))
    scheduler, state = _scheduler(pipe)
    models = pipe.models
    peer = FlaxStableDiffusionXLPipeline(
        text_encoder=models.text_encoders[0],
        text_encoder_2=models.text_encoders[1],
        vae=models.vae,
        tokenizer=models.tokenizers[0],
        tokenizer_2=models.tokenizers[1],
        unet=models.unet,
        scheduler=scheduler,
    )
    width, height = chain.size
    arguments = {"num_inference_steps": STEPS, "height": height, "width": width, "latents": start}
    params = {**pipe.params, "scheduler": state}
    for negative, negative_ids in (("", None), (NEGATIVE, peer.prepare_inputs([NEGATIVE] * 2))):
        ours = pipe.generate(
            chain, prompt=PROMPT, negative_prompt=negative, latents=start, config=PLAIN, output_type="np"
        ).images
        theirs = peer(
            peer.prepare_inputs([PROMPT] * 2),
            params,
            jax.random.PRNGKey(0),
            guidance_scale=PLAIN.guidance_scale,
            neg_prompt_ids=negative_ids,
            **arguments,
        ).images
        assert theirs.shape == ours.shape == (2, height, width, 3)
        assert relative_error(ours, theirs) < 1e-4


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_rival_variations_are_finite_and_differ_from_each_other_and_from_plain(family_pipes, exemplar, family):
    pipe = family_pipes[family]
    chain = pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=STEPS)
    start = jax.random.normal(jax.random.PRNGKey(2), (2, *chain.latents.shape[1:]))
    rival = pipe.generate(chain, latents=start, output_type="np").images
    plain = pipe.generate(chain, latents=start, config=RivalConfig(attention_injection=False, noise_alignment=False))
    plain = np.stack([np.asarray(image, np.float32) / 255 for image in plain.images])
    assert np.isfinite(rival).all()
    assert np.abs(rival[0] - rival[1]).mean() > 1e-3
    assert np.abs(rival - plain).mean() > 1e-3


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_recomputing_the_exemplar_each_step_equals_keeping_its_features(family_pipes, exemplar, family):
    """Both reference modes, through replacement, fusion and AdaIN (t_align/t_early mid-chain)."""
    from rival_jax import RivalPipeline

    pipe = family_pipes[family]
    recompute = RivalPipeline(pipe.models, pipe.options.replace(reference_mode="recompute"))
    keep = RivalPipeline(pipe.models, pipe.options.replace(reference_mode="keep"))
    chain = keep.invert(exemplar, prompt=PROMPT, num_inference_steps=STEPS)
    config = RivalConfig(t_align=500, t_early=700)
    kept = keep.generate(chain, num_variations=3, seed=5, config=config, output_type="latent")
    recomputed = recompute.generate(chain, num_variations=3, seed=5, config=config, output_type="latent")
    assert (kept.reference_mode, recomputed.reference_mode) == ("keep", "recompute")
    assert relative_error(recomputed.latents, kept.latents) < 1e-4


def test_sdxl_conditioning_carries_sizes_and_zeros_for_empty_prompts(family_pipes):
    pipe = family_pipes["sdxl"]
    assert pipe.models.force_zeros_for_empty_prompt
    cond = pipe.encode_prompt(["", PROMPT], (128, 96))
    np.testing.assert_array_equal(cond.added["time_ids"], [[96, 128, 0, 0, 96, 128]] * 2)
    assert not jnp.any(cond.text[0]) and not jnp.any(cond.added["text_embeds"][0])
    assert jnp.all(jnp.any(cond.text[1] != 0, axis=-1)) and jnp.any(cond.added["text_embeds"][1])
    widths = [encoder.config.hidden_size for encoder in pipe.models.text_encoders]
    assert cond.text.shape[-1] == sum(widths) == pipe.models.unet.config.cross_attention_dim


def test_v_prediction_inversion_uses_the_level_of_the_stepped_latent(family_pipes, exemplar):
    """SD 2 (v-prediction): the chain's last step equals one DDIM step of diffusers' inverse formula."""
    pipe = family_pipes["sd2"]
    schedule = pipe.models.schedule
    chain = pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=STEPS)
    t, stride = int(chain.timesteps[0]), 1000 // STEPS
    cond = pipe.encode_prompt([PROMPT], chain.size)
    x = chain.latents[-2]
    v = unet_output(pipe.models.unet, pipe.params["unet"], x[None], t, cond)[0]
    a_from, a_to = schedule.alpha(t - stride), schedule.alpha(t)
    x0 = jnp.sqrt(a_from) * x - jnp.sqrt(1 - a_from) * v
    eps = jnp.sqrt(a_from) * v + jnp.sqrt(1 - a_from) * x
    expected = jnp.sqrt(a_to) * x0 + jnp.sqrt(1 - a_to) * eps
    assert relative_error(chain.latents[-1], expected) < 1e-5
