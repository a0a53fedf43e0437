"""Fidelity to the authors' PyTorch implementation in all four modes (tests/data/parity, docs/method.md).

One pipeline for the module; the three cases inverted with the empty prompt share one chain, and each
case generates only the variation the authors' arrays record.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from PIL import Image

from rival_jax import RivalConfig, RivalPipeline, images
from rival_jax.jobs.settings import ROW_FIELDS, generation_arguments, merge_settings, read_settings_file

from .conftest import PARITY

CASES = ("variation_null", "variation_prompt", "editing", "inpainting")
# Each inversion prompt's reference chain is stored once, with the case named here.
CHAIN_CASES = ("variation_null", "variation_prompt")
TOLERANCE = 3e-4


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@functools.cache
def reference(case: str) -> tuple[dict[str, np.ndarray], dict]:
    """The authors' arrays and settings for one case."""
    with np.load(PARITY / f"{case}.npz") as arrays:
        return dict(arrays), json.loads((PARITY / f"{case}.json").read_text())


def picture(name: str) -> np.ndarray:
    return np.asarray(Image.open(PARITY / name))


@pytest.fixture(scope="module")
def pipe(cache_dir):
    return RivalPipeline.from_pretrained(PARITY / "tiny-sd", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def chains(pipe):
    """Our inversion chain per inversion prompt, computed on first use."""
    exemplar = picture("exemplar.png")
    return functools.cache(lambda prompt: pipe.invert(exemplar, prompt=prompt, num_inference_steps=10))


@pytest.fixture(scope="module")
def generated(pipe, chains):
    """Our final latent of the authors' generated image, per case, from their start latent."""

    def run(case: str) -> np.ndarray:
        arrays, meta = reference(case)
        config = RivalConfig(
            guidance_scale=meta["guidance_scale"],
            t_align=meta["t_align"],
            t_early=meta["t_early"],
            editing_start=meta["editing_early_steps"],
        )
        out = pipe.generate(
            chains(meta["inversion_prompt"]),
            prompt=meta["prompts"][1],
            negative_prompt=meta["negative_prompts"][1],
            config=config,
            latents=arrays["start_latent"][None],
            mask=picture("inpainting_mask.png") if meta["inpainting"] else None,
            output_type="latent",
        )
        return out.latents[0]

    return functools.cache(run)


def test_loads_the_pytorch_safetensors_checkpoint(pipe):
    assert all(source != "flax msgpack" for source in pipe.models.sources.values())
    assert pipe.default_side == 512 and not pipe.random_weights


@pytest.mark.parametrize("case", CHAIN_CASES)
def test_inversion_chain_matches_authors(chains, case):
    arrays, meta = reference(case)
    chain = chains(meta["inversion_prompt"])
    np.testing.assert_array_equal(chain.image, picture("exemplar.png"))
    np.testing.assert_array_equal(chain.timesteps, meta["timesteps"])
    assert chain.latents.shape == arrays["chain"].shape
    assert relative_error(chain.latents, arrays["chain"]) < TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_generated_latent_matches_authors(generated, case):
    arrays, _ = reference(case)
    assert relative_error(generated(case), arrays["final_latent"]) < TOLERANCE


def test_editing_start_latent_is_the_authors(pipe, chains):
    arrays, meta = reference("editing")
    chain, config = chains(meta["inversion_prompt"]), RivalConfig(latent_init="exemplar")
    start = pipe.start_latents(chain, np.arange(1), 0, config, np.ones((64, 64), bool))
    assert relative_error(start[0], arrays["start_latent"]) < TOLERANCE


def test_inpainting_mask_pools_to_the_authors_region(chains):
    arrays, _ = reference("inpainting")
    chain = chains("")
    region = images.mask_region(picture("inpainting_mask.png"), chain.source_size, chain.size, (64, 64))
    np.testing.assert_array_equal(region, arrays["latent_mask_regenerated"])


def test_inpainting_keeps_the_exemplar_outside_the_mask(chains, generated):
    arrays, _ = reference("inpainting")
    outside = ~arrays["latent_mask_regenerated"]
    np.testing.assert_array_equal(generated("inpainting")[:, outside], np.asarray(chains("").latents[0])[:, outside])


def test_their_config_with_t_align_next_to_a_timestep_reproduces_their_latent(pipe, chains, tmp_path):
    arrays, meta = reference("boundary")
    chain_arrays, _ = reference(meta["chain_case"])
    config_file = tmp_path / "rival_variation.json"
    config_file.write_text(json.dumps(meta["authors_inference_config"]))
    settings = merge_settings(read_settings_file(config_file, ROW_FIELDS), {"prompt": meta["prompts"][1]})
    assert (settings["authors_t_align"], settings["t_align"]) == (meta["t_align"], meta["t_align"] + 1)
    assert (settings["inversion_prompt"], settings["steps"]) == ("", len(chain_arrays["chain"]) - 1)
    chain = chains(settings["inversion_prompt"])  # their run reused `variation_null`'s inversion

    def final(settings: dict) -> float:
        arguments = generation_arguments(settings)
        out = pipe.generate(chain, **arguments, latents=arrays["start_latent"][None], output_type="latent")
        return relative_error(out.latents[0], arrays["final_latent"])

    assert final(settings) < TOLERANCE
    # Their threshold read as a timestep would replace one step longer than their code does.
    unmapped = merge_settings(settings, {"t_align": meta["t_align"]})
    assert final(unmapped) > TOLERANCE
