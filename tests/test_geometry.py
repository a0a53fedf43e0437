"""Exemplar geometry (aspect ratio kept within the model's pixel budget, masks alike) and the reference-mode choice."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rival_jax.core.reference import KEEP_MEMORY_FRACTION, choose_reference_mode
from rival_jax.images import mask_region, target_size

FAMILIES = {"sd1": (512, 64), "sd2-768": (768, 64), "sdxl": (1024, 32)}


@pytest.mark.parametrize(("side", "multiple"), FAMILIES.values(), ids=FAMILIES)
def test_a_640x480_exemplar_stays_4_to_3_within_the_pixel_budget(side, multiple):
    width, height = target_size((640, 480), None, side, multiple, square=False)
    assert width * 3 == height * 4 and width * height <= side**2 and width % multiple == height % multiple == 0
    assert target_size((480, 640), None, side, multiple, square=False) == (height, width)
    assert target_size((640, 480), None, side, multiple, square=True) == (side, side)


@pytest.mark.parametrize(("side", "multiple"), FAMILIES.values(), ids=FAMILIES)
def test_any_aspect_ratio_gets_the_nearest_shape_the_unet_can_take(side, multiple):
    for aspect in np.linspace(1 / 3, 3, 37):
        width, height = target_size((int(1000 * aspect), 1000), None, side, multiple, square=False)
        assert width % multiple == height % multiple == 0 and width * height <= side**2
        assert abs(np.log(width / height / aspect)) < 0.11
        assert width * height >= 0.7 * side**2


def test_explicit_sizes_are_kept_or_refused():
    assert target_size((640, 480), (768, 512), 512, 64, square=False) == (768, 512)
    assert target_size((640, 480), 256, 512, 64, square=False) == (256, 192)
    with pytest.raises(Exception, match="multiples of 64"):
        target_size((640, 480), (700, 512), 512, 64, square=False)


def test_a_mask_drawn_on_the_exemplar_follows_its_geometry():
    mask = np.zeros((480, 640), np.uint8)
    mask[:, :320] = 255
    region = mask_region(Image.fromarray(mask), (640, 480), (512, 384), (48, 64))
    assert region.shape == (48, 64) and region[:, :32].all() and not region[:, 32:].any()
    with pytest.raises(Exception, match="draw the mask at the exemplar's size"):
        mask_region(Image.fromarray(mask[:100]), (640, 480), (512, 384), (48, 64))


def test_auto_keeps_features_that_fit_and_recomputes_the_rest():
    memory = 16 * 2**30
    assert choose_reference_mode("auto", int(KEEP_MEMORY_FRACTION * memory), memory) == "keep"
    assert choose_reference_mode("auto", int(KEEP_MEMORY_FRACTION * memory) + 1, memory) == "recompute"
    assert choose_reference_mode("auto", 10**12, None) == "keep"
    assert choose_reference_mode("keep", 10**15, memory) == "keep"
    assert choose_reference_mode("recompute", 1, memory) == "recompute"


@pytest.mark.parametrize("prompt", ["", "a photo of a cat"])
def test_the_feature_estimate_is_the_size_of_the_features(tiny_pipe, exemplar, prompt):
    chain = tiny_pipe.invert(exemplar, prompt=prompt, num_inference_steps=3)
    assert tiny_pipe.reference_feature_bytes(chain) == tiny_pipe.reference_pass(chain).nbytes
