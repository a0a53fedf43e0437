"""Where each part of the method starts and stops: stage boundaries, ablation switches, the inpainting copy, masks.

Each test pins a detail that a plausible one-character bug would move (scripts/mutation_check.py applies them).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rival_jax import RivalConfig, images

SWITCHES = ("attention_injection", "early_replacement", "latent_alignment", "noise_alignment")


@pytest.fixture(scope="module")
def final(tiny_pipe, tiny_chain):
    """Final latents of two variations of seed 0 on the shared tiny chain, per config."""

    def run(config: RivalConfig, chain=tiny_chain, **kwargs) -> np.ndarray:
        out = tiny_pipe.generate(chain, num_variations=2, seed=0, config=config, output_type="latent", **kwargs)
        return out.latents

    return run


def test_noise_alignment_stops_at_the_step_on_t_early(final, tiny_chain):
    first, second = (int(t) for t in tiny_chain.timesteps[:2])
    # AdaIN runs while t > t_early: t_early on the second step's timestep leaves only the first step aligned.
    on_boundary = final(RivalConfig(t_early=second))
    np.testing.assert_array_equal(on_boundary, final(RivalConfig(t_early=first - 1)))
    assert not np.allclose(on_boundary, final(RivalConfig(t_early=second - 1)))


def test_replacement_stops_at_the_step_on_t_align(final, tiny_chain):
    first, second = (int(t) for t in tiny_chain.timesteps[:2])
    # Replacement while t > t_align, fusion from the step whose timestep equals t_align.
    on_boundary = final(RivalConfig(t_align=second))
    np.testing.assert_array_equal(on_boundary, final(RivalConfig(t_align=first - 1)))
    assert not np.allclose(on_boundary, final(RivalConfig(t_align=second - 1)))


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_ablation_switch_changes_the_variations(final, switch):
    assert not np.allclose(final(RivalConfig()), final(RivalConfig(**{switch: False})), atol=1e-4)


def test_inpainting_copies_the_exemplar_chain_outside_the_mask_at_every_step(tiny_chain, final):
    mask = np.zeros((12, 16), bool)
    mask[4:12, 2:10] = True
    # With injection and AdaIN off the chain reaches the variations only through the copy outside the mask.
    plain = RivalConfig(attention_injection=False, noise_alignment=False)
    latents = np.array(tiny_chain.latents)
    latents[1:-1, :, ~mask] += np.random.default_rng(0).standard_normal(latents[1:-1, :, ~mask].shape)
    moved = dataclasses.replace(tiny_chain, latents=latents, reference=None)
    base, perturbed = final(plain, mask=mask), final(plain, chain=moved, mask=mask)
    np.testing.assert_array_equal(base[:, :, ~mask], perturbed[:, :, ~mask])
    assert not np.allclose(base[:, :, mask], perturbed[:, :, mask], atol=1e-4)


def test_mask_cell_half_covered_is_regenerated():
    mask = np.zeros((16, 24), np.uint8)
    mask[:4, :8] = 255  # exactly half of latent cell (0, 0) at 8 pixels per cell
    mask[8:, 8:15] = 255  # 56 of 64 pixels of cell (1, 1): in
    mask[8:, 16:19] = 255  # 24 of 64 pixels of cell (1, 2): out
    region = images.mask_region(mask, (24, 16), (24, 16), (2, 3))
    np.testing.assert_array_equal(region, [[True, False, False], [False, True, False]])
    halves = np.array([[0.5, 0.49], [0.51, 0.0]], np.float32)
    region = images.mask_region(halves, (16, 16), (16, 16), (2, 2))
    np.testing.assert_array_equal(region, [[True, False], [True, False]])
