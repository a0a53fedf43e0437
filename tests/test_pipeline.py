"""The Python API on the tiny model: reproducibility, every application, switches and bad input."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rival_jax import RivalConfig, RivalError

STEPS = 6


def test_same_seed_same_images_and_reference_reused(tiny_pipe, tiny_chain):
    first = tiny_pipe.generate(tiny_chain, num_variations=2, seed=11, output_type="np")
    reference = tiny_chain.reference
    second = tiny_pipe.generate(tiny_chain, num_variations=2, seed=11, output_type="np")
    assert tiny_chain.reference is reference
    np.testing.assert_array_equal(first.images, second.images)
    other = tiny_pipe.generate(tiny_chain, num_variations=2, seed=12, output_type="np")
    assert not np.allclose(first.images, other.images)
    assert first.images.shape == (2, 96, 128, 3)  # the 160x120 exemplar keeps its 4:3 shape
    assert first.images.min() >= 0.0 and first.images.max() <= 1.0


def test_chain_layout(tiny_pipe, tiny_chain):
    assert tiny_chain.latents.shape == (STEPS + 1, 4, 12, 16) and tiny_chain.size == (128, 96)
    assert list(tiny_chain.timesteps) == sorted(tiny_chain.timesteps, reverse=True)
    reference = tiny_pipe.reference_pass(tiny_chain)
    assert reference.eps.shape == (STEPS, 4, 12, 16)
    assert all(h.shape[:2] == (STEPS, 2) for h in reference.hidden.values())


def test_reference_pass_batches_equal_one_evaluation_per_step_and_context(tiny_pipe, exemplar):
    """Any reference batch size (here padded: 5 steps x 2 contexts in batches of 4) gives the per-step features."""
    from rival_jax import RivalPipeline
    from rival_jax.core.unet import unet_output_recording

    chain = tiny_pipe.invert(exemplar, prompt="a photo of a cat", num_inference_steps=5)
    batched = RivalPipeline(tiny_pipe.models, tiny_pipe.options.replace(reference_batch_size=4)).reference_pass(chain)
    single = RivalPipeline(tiny_pipe.models, tiny_pipe.options.replace(reference_batch_size=1)).reference_pass(chain)
    chex.assert_trees_all_close(batched, single, atol=1e-5)
    step = 2  # generation step j evaluates x_{T-j} at t_j
    contexts = tiny_pipe.contexts(chain)
    latent = jnp.broadcast_to(chain.latents[5 - step], (2, *chain.latents.shape[1:]))
    eps, hidden = unet_output_recording(
        tiny_pipe.models.unet, tiny_pipe.params["unet"], latent, chain.timesteps[step], contexts
    )
    chex.assert_trees_all_close(batched.eps[step], eps[1], atol=1e-5)
    chex.assert_trees_all_close({k: v[step] for k, v in batched.hidden.items()}, hidden, atol=1e-5)


def test_null_inversion_has_one_reference_context(tiny_pipe, exemplar):
    chain = tiny_pipe.invert(exemplar, prompt="", num_inference_steps=STEPS)
    reference = tiny_pipe.reference_pass(chain)
    assert all(h.shape[1] == 1 for h in reference.hidden.values())


def test_output_types(tiny_pipe, tiny_chain):
    pil = tiny_pipe.generate(tiny_chain, num_variations=2, output_type="pil")
    assert all(isinstance(i, Image.Image) and i.size == (128, 96) for i in pil.images)
    latent = tiny_pipe.generate(tiny_chain, num_variations=2, output_type="latent")
    np.testing.assert_array_equal(latent.images, pil.latents)


def test_negative_and_new_prompt_change_only_the_generated_side(tiny_pipe, tiny_chain):
    base = tiny_pipe.generate(tiny_chain, num_variations=2, output_type="latent").latents
    negative = tiny_pipe.generate(
        tiny_chain, num_variations=2, negative_prompt="blue sky", output_type="latent"
    ).latents
    text = tiny_pipe.generate(tiny_chain, num_variations=2, prompt="a painting of a dog", output_type="latent").latents
    assert not np.allclose(base, negative) and not np.allclose(base, text)


def test_editing_starts_from_x_t(tiny_pipe, tiny_chain):
    config = RivalConfig(latent_init="exemplar", editing_start=900)
    out = tiny_pipe.generate(tiny_chain, num_variations=2, config=config, output_type="latent")
    np.testing.assert_array_equal(out.start_latents, np.stack([tiny_chain.latents[-1]] * 2))


def test_inpainting_keeps_the_exemplar_outside_the_mask(tiny_pipe, tiny_chain):
    mask = np.zeros((96, 128), np.uint8)
    mask[32:96, 16:80] = 255
    out = tiny_pipe.generate(tiny_chain, num_variations=2, mask=mask, output_type="latent")
    region = np.zeros((12, 16), bool)
    region[4:12, 2:10] = True
    x_0, x_t = np.asarray(tiny_chain.latents[0]), np.asarray(tiny_chain.latents[-1])
    np.testing.assert_array_equal(out.latents[:, :, ~region], np.broadcast_to(x_0[:, ~region], (2, 4, 12 * 16 - 64)))
    np.testing.assert_array_equal(out.start_latents[:, :, ~region], np.broadcast_to(x_t[:, ~region], (2, 4, 128)))
    assert not np.allclose(out.latents[:, :, region], x_0[None][:, :, region])


def test_ablation_switches_remove_the_exemplar_influence(tiny_pipe, tiny_chain, exemplar):
    other = tiny_pipe.invert(exemplar[::-1, ::-1].copy(), prompt="a photo of a cat", num_inference_steps=STEPS)
    start = np.random.default_rng(0).standard_normal((2, 4, 12, 16)).astype(np.float32)

    def final(chain, config):
        return tiny_pipe.generate(chain, num_variations=2, latents=start, config=config, output_type="latent").latents

    off = RivalConfig(attention_injection=False, noise_alignment=False)
    np.testing.assert_allclose(final(tiny_chain, off), final(other, off), atol=1e-5)
    for on in (RivalConfig(noise_alignment=False), RivalConfig(attention_injection=False), RivalConfig()):
        assert not np.allclose(final(tiny_chain, on), final(other, on), atol=1e-3)
    assert not np.allclose(final(tiny_chain, RivalConfig()), final(tiny_chain, RivalConfig(early_replacement=False)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latents": np.zeros((3, 4, 12, 16)), "num_variations": 2}, "latents have shape"),
        ({"latents": np.zeros((2, 4, 16, 16))}, "latents have shape"),
        ({"mask": np.ones((100, 100))}, "mask has shape"),
        ({"mask": np.zeros((96, 128))}, "marks no region"),
        ({"mask": Image.new("L", (100, 100))}, "draw the mask at the exemplar's size"),
        ({"num_variations": 0}, "num_variations"),
        ({"output_type": "tensor"}, "output_type"),
    ],
)
def test_generate_rejects_bad_input(tiny_pipe, tiny_chain, kwargs, message):
    with pytest.raises(RivalError, match=message):
        tiny_pipe.generate(tiny_chain, **kwargs)


def test_invert_rejects_bad_input(tiny_pipe, exemplar):
    with pytest.raises(RivalError, match="num_inference_steps"):
        tiny_pipe.invert(exemplar, num_inference_steps=0)
    with pytest.raises(RivalError, match="RGB"):
        tiny_pipe.invert(Image.fromarray(exemplar).convert("L"))
    with pytest.raises(RivalError, match="uint8"):
        tiny_pipe.invert(np.zeros((8, 8), np.float32))


def test_resolution_dtype_and_attention_options(tiny_flax, exemplar):
    from rival_jax import RivalPipeline

    pipe = RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, resolution=96, square_crop=True)
    assert pipe.dtype == np.float32
    chain = pipe.invert(exemplar, num_inference_steps=2)
    assert chain.image.shape == (96, 96, 3) and chain.latents.shape == (3, 4, 12, 12)
    exact = RivalPipeline(pipe.models, pipe.options.replace(resolution="64x160", square_crop=False))
    assert exact.invert(exemplar, num_inference_steps=2).latents.shape == (3, 4, 20, 8)
    with pytest.raises(RivalError, match="multiples of 32"):
        RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, resolution="100x64")
    with pytest.raises(RivalError, match="resolution"):
        RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, resolution="0")
    with pytest.raises(RivalError, match="attention"):
        RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, attention="flash")
    with pytest.raises(RivalError, match="dtype"):
        RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, dtype="float8")
    with pytest.raises(RivalError, match="needs bfloat16"):
        RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, dtype="float32", attention="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(RivalError, match="needs an NVIDIA GPU"):
            RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, dtype="bfloat16", attention="cudnn")
    if jax.default_backend() != "tpu":
        with pytest.raises(RivalError, match="needs a TPU"):
            RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, attention="pallas")
    with pytest.raises(RivalError, match="reference_batch_size"):
        RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, reference_batch_size=0)


def test_bfloat16_changes_images_far_less_than_a_new_seed(tiny_flax, tiny_pipe, tiny_chain, exemplar):
    from rival_jax import RivalPipeline

    pipe = RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, dtype="bfloat16")
    chain = pipe.invert(exemplar, prompt=tiny_chain.prompt, num_inference_steps=STEPS)
    half = pipe.generate(chain, num_variations=2, seed=3, output_type="np").images
    full = tiny_pipe.generate(tiny_chain, num_variations=2, seed=3, output_type="np").images
    other_seed = tiny_pipe.generate(tiny_chain, num_variations=2, seed=4, output_type="np").images
    bf16_error = np.abs(full - half).mean()
    assert 0 < bf16_error < 0.05 and bf16_error < 0.25 * np.abs(full - other_seed).mean()


def test_generation_memory_does_not_grow_with_steps(tiny_pipe):
    """XLA's buffer assignment: no step copies the whole chain or the reference features."""
    from rival_jax.core import parallel
    from rival_jax.core.sampler import GenerationInputs
    from rival_jax.pipeline import programs

    size = 16
    contexts = tiny_pipe.encode_prompt(["", "a cat"], (128, 128))

    def memory(steps):
        def shaped(shape, dtype=jnp.float32):
            return jax.ShapeDtypeStruct(shape, dtype)

        chain, timesteps = shaped((1, steps + 1, 4, size, size)), shaped((steps,), jnp.int32)
        unet, statics = tiny_pipe.params["unet"], tiny_pipe.statics
        reference_program = programs.Program(programs.reference, statics)(report_progress=False)
        reference = jax.eval_shape(reference_program, unet, programs.ReferenceInputs(chain, contexts, timesteps))
        stacked = jax.tree_util.tree_map(lambda x: x[None], contexts)
        inputs = GenerationInputs(
            start=shaped((1, 2, 4, size, size)),
            chain=chain,
            conditioning=stacked,
            contexts=stacked,
            reference=reference,
            region=shaped((1, size, size), bool),
            settings=RivalConfig().as_arrays(),
            timesteps=timesteps,
        )
        mesh = parallel.exemplar_mesh(tiny_pipe.mesh, 1, 2)
        program = programs.Program(programs.generation, dataclasses.replace(statics, mesh=mesh))(report_progress=False)
        analysis = jax.jit(program).lower(unet, inputs).compile().memory_analysis()
        return analysis.temp_size_in_bytes, reference.nbytes

    (temp_few, features_few), (temp_many, features_many) = memory(4), memory(40)
    assert temp_many - temp_few < 0.1 * (features_many - features_few)
