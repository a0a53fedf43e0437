"""Fidelity to the authors' PyTorch implementation on the shared tiny checkpoint (docs/method.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rival_jax import RivalConfig, RivalPipeline

from .conftest import PARITY

pytestmark = pytest.mark.skipif(not PARITY.is_dir(), reason=f"parity reference not found at {PARITY}")


def relative_error(ours, theirs) -> float:
    return float(np.linalg.norm(np.asarray(ours, np.float64) - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="module")
def reference():
    return np.load(PARITY / "ref_variation_null.npz"), json.loads((PARITY / "ref_variation_null.json").read_text())


@pytest.fixture(scope="module")
def parity_run(reference, cache_dir):
    arrays, meta = reference
    pipe = RivalPipeline.from_pretrained(PARITY / "tiny-sd", cache_dir=cache_dir)
    chain = pipe.invert(
        arrays["exemplar"], prompt=meta["inversion_prompt"], num_inference_steps=meta["num_inference_steps"]
    )
    config = RivalConfig(guidance_scale=meta["guidance_scale"], t_align=meta["t_align"], t_early=meta["t_early"])
    out = pipe.generate(
        chain,
        prompt=meta["prompts"][1],
        negative_prompt=meta["negative_prompts"][1],
        num_variations=1,
        config=config,
        latents=arrays["start_latents"][1:2],
        output_type="latent",
    )
    return pipe, chain, out


def test_loads_the_pytorch_safetensors_checkpoint(parity_run):
    pipe, _, _ = parity_run
    assert all(source != "flax msgpack" for source in pipe.models.sources.values())
    assert pipe.default_side == 512 and not pipe.random_weights


def test_inversion_chain_matches_authors(parity_run, reference):
    arrays, meta = reference
    _, chain, _ = parity_run
    np.testing.assert_array_equal(chain.image, arrays["exemplar"])
    np.testing.assert_array_equal(chain.timesteps, meta["timesteps"])
    assert chain.latents.shape == arrays["chain"].shape
    assert relative_error(chain.latents, arrays["chain"]) < 3e-4


def test_generated_latent_matches_authors(parity_run, reference):
    arrays, _ = reference
    _, _, out = parity_run
    assert relative_error(out.latents[0], arrays["final_latents"][1]) < 3e-4
