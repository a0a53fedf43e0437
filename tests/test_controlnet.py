"""RIVAL + ControlNet: the authors' outputs, diffusers' Flax ControlNet pipeline, and where residuals go."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionControlNetPipeline
from PIL import Image

from rival_jax import RivalConfig, RivalError, RivalPipeline, images
from rival_jax.core.ddim import DDIM_OVERRIDES

from .conftest import PARITY
from .test_cli import FAST, _run

STEPS = 4
PLAIN = RivalConfig(guidance_scale=5.0, attention_injection=False, noise_alignment=False)


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="module")
def control_pipe(tiny_flax, tiny_controlnet):
    return RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, controlnet=tiny_controlnet)


@pytest.fixture(scope="module")
def square_chain(control_pipe, exemplar):
    return control_pipe.invert(exemplar[:, :120].copy(), prompt="a photo of a cat", num_inference_steps=STEPS)


def _start(chain, count=2, seed=3):
    return jax.random.normal(jax.random.PRNGKey(seed), (count, *chain.latents.shape[1:]))


def test_rival_controlnet_matches_the_authors(cache_dir):
    with np.load(PARITY / "controlnet.npz") as case, np.load(PARITY / "variation_null.npz") as null:
        arrays = {**dict(case), "chain": null["chain"]}  # both cases invert with the empty prompt
    meta = json.loads((PARITY / "controlnet.json").read_text())
    control_image = np.asarray(Image.open(PARITY / "control_canny.png"))
    pipe = RivalPipeline.from_pretrained(PARITY / "tiny-sd", cache_dir=cache_dir, controlnet=PARITY / "controlnet-tiny")
    exemplar = np.asarray(Image.open(PARITY / "exemplar.png"))
    chain = pipe.invert(exemplar, prompt=meta["inversion_prompt"], num_inference_steps=10)
    np.testing.assert_array_equal(chain.timesteps, meta["timesteps"])
    assert relative_error(chain.latents, arrays["chain"]) < 1e-4
    config = RivalConfig(guidance_scale=meta["guidance_scale"], t_align=meta["t_align"], t_early=meta["t_early"])
    out = pipe.generate(
        chain,
        prompt=meta["prompts"][1],
        negative_prompt=meta["negative_prompts"][1],
        config=config,
        latents=arrays["start_latent"][None],
        control_image=control_image,
        controlnet_conditioning_scale=meta["controlnet_conditioning_scale"],
        output_type="latent",
    )
    assert relative_error(out.latents[0], arrays["final_latent"]) < 5e-4
    np.testing.assert_array_equal(images.canny(chain.image), control_image)  # their map is our "canny"


def test_plain_generation_equals_diffusers_flax_controlnet_pipeline(control_pipe, square_chain):
    chain, models = square_chain, control_pipe.models
    config = json.loads((models.path / "scheduler" / "scheduler_config.json").read_text())
    scheduler = FlaxDDIMScheduler.from_config({**config, **DDIM_OVERRIDES})
    controlnet = control_pipe.controlnets[0]
    peer = FlaxStableDiffusionControlNetPipeline(
        vae=models.vae,
        text_encoder=models.text_encoders[0],
        tokenizer=models.tokenizers[0],
        unet=models.unet,
        controlnet=controlnet.module,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
    )
    control = Image.fromarray(np.asarray(chain.image)[::-1].copy())
    start = _start(chain, count=1)
    ours = control_pipe.generate(
        chain,
        prompt="a dog",
        negative_prompt="blue",
        latents=start,
        config=PLAIN,
        control_image=control,
        controlnet_conditioning_scale=0.8,
        output_type="np",
    ).images
    params = {**control_pipe.params, "controlnet": controlnet.params, "scheduler": scheduler.create_state()}
    theirs = peer(
        peer.prepare_text_inputs(["a dog"]),
        peer.prepare_image_inputs([control]),
        params,
        jax.random.PRNGKey(0),
        num_inference_steps=STEPS,
        guidance_scale=PLAIN.guidance_scale,
        latents=start,
        neg_prompt_ids=peer.prepare_text_inputs(["blue"]),
        controlnet_conditioning_scale=0.8,
        jit=False,
    ).images
    assert theirs.shape == ours.shape == (1, 128, 128, 3)
    assert relative_error(ours, theirs) < 1e-4


def test_scale_zero_equals_no_controlnet_and_the_range_matters(control_pipe, tiny_pipe, square_chain):
    chain, start = square_chain, _start(square_chain)

    def final(pipe, **control):
        return pipe.generate(chain, latents=start, seed=1, output_type="latent", **control).latents

    without = final(tiny_pipe)
    np.testing.assert_allclose(
        final(control_pipe, control_image="canny", controlnet_conditioning_scale=0.0), without, rtol=0, atol=1e-6
    )
    full = final(control_pipe, control_image="canny")
    assert relative_error(full, without) > 1e-3
    half = final(control_pipe, control_image="canny", control_guidance_end=0.5)
    assert relative_error(half, full) > 1e-4 and relative_error(half, without) > 1e-4


def test_residuals_never_reach_the_exemplar(control_pipe, tiny_pipe, square_chain, exemplar):
    """Inversion and the exemplar's entries get no residuals: recomputing the exemplar beside the
    controlled variations gives what its stored, ControlNet-free features give."""
    plain_chain = tiny_pipe.invert(exemplar[:, :120].copy(), prompt="a photo of a cat", num_inference_steps=STEPS)
    np.testing.assert_array_equal(plain_chain.latents, square_chain.latents)
    features = [pipe.reference_pass(square_chain) for pipe in (control_pipe, tiny_pipe)]
    assert all(np.array_equal(a, b) for a, b in zip(*map(jax.tree_util.tree_leaves, features), strict=True))
    recompute = RivalPipeline(
        control_pipe.models, control_pipe.options.replace(reference_mode="recompute"), control_pipe.controlnets
    )
    keep = RivalPipeline(
        control_pipe.models, control_pipe.options.replace(reference_mode="keep"), control_pipe.controlnets
    )
    config = RivalConfig(t_align=500, t_early=700)
    outs = [
        pipe.generate(square_chain, latents=_start(square_chain), config=config, control_image="canny")
        for pipe in (keep, recompute)
    ]
    assert [out.reference_mode for out in outs] == ["keep", "recompute"]
    assert relative_error(outs[1].latents, outs[0].latents) < 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "pass control_image"),
        ({"control_image": np.zeros((50, 60, 3), np.uint8)}, "make the map at the exemplar's size"),
        ({"control_image": ["canny", "canny"]}, "2 maps for 1 variations .* one map per ControlNet"),
        ({"control_image": [["canny"] * 3], "num_variations": 2}, "3 maps for 2 variations"),
        ({"control_image": "canny", "control_guidance_start": 0.6, "control_guidance_end": 0.4}, "start < end"),
    ],
)
def test_bad_control_input_gets_a_one_line_error(control_pipe, square_chain, kwargs, message):
    with pytest.raises(RivalError, match=message) as error:
        control_pipe.generate(square_chain, **kwargs)
    assert "\n" not in str(error.value)


def test_a_control_image_needs_a_controlnet(tiny_pipe, square_chain):
    with pytest.raises(RivalError, match="no ControlNet is loaded"):
        tiny_pipe.generate(square_chain, control_image="canny")


def test_each_variation_follows_its_own_map(control_pipe, square_chain):
    """A list of maps is one per variation: variation i is what it is when generated alone with map i."""
    edges = images.canny(square_chain.image)
    maps = [edges, edges[:, ::-1].copy(), edges[::-1].copy()]
    start = _start(square_chain, count=3)

    def final(latents, control_image):
        return control_pipe.generate(square_chain, latents=latents, control_image=control_image, output_type="latent")

    both = final(start, maps).latents
    for i in (1, 2):
        assert relative_error(final(start[i : i + 1], maps[i]).latents[0], both[i]) < 1e-5
    assert relative_error(both[1], both[0]) > 1e-3


def test_generate_takes_a_folder_of_maps_one_per_variation(capsys, tmp_path, tiny_flax, tiny_controlnet, exemplar):
    folder = tmp_path / "maps"
    folder.mkdir()
    for name, pixels in (("a.png", exemplar), ("b.png", exemplar[::-1])):
        Image.fromarray(images.canny(pixels)).save(folder / name)
    exemplar_file = tmp_path / "exemplar.png"
    Image.fromarray(exemplar).save(exemplar_file)
    args = ["generate", exemplar_file, "--model", tiny_flax, "--controlnet", tiny_controlnet, "--control-image", folder]
    code, _, stderr = _run(capsys, *args, "-o", tmp_path / "out", *FAST)
    assert code == 0, stderr
    assert json.loads((tmp_path / "out" / "rival.json").read_text())["control_image"] == [str(folder)]
    code, _, stderr = _run(capsys, *args, "-o", tmp_path / "bad", *FAST[:-3], "-n", "3", "--no-progress")
    assert code == 2 and "holds 2 maps for 3 variations" in stderr and len(stderr.strip().splitlines()) == 1, stderr
