"""Exemplar geometry (aspect ratio kept within the model's pixel budget, masks alike) and the reference-mode choice."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rival_jax.core.reference import KEEP_MEMORY_FRACTION, choose_reference_mode
from rival_jax.errors import RivalError
from rival_jax.images import MAX_ASPECT, MIN_SIDE, check_exemplar_size, mask_region, target_size

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


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((1, 1), "is 1x1: its shorter side is under 32 px"),
        ((2000, 10), "2000x10: its aspect ratio 200.0:1 is beyond 4:1"),
    ],
)
def test_tiny_and_extreme_exemplars_are_refused_before_anything_runs(size, message):
    with pytest.raises(RivalError, match=message):
        target_size(size, None, 512, 64, square=False)


def test_size_limits_hold_at_their_edges_and_centre_crops_lift_the_aspect_limit():
    for size in ((MIN_SIDE, MIN_SIDE), (int(MAX_ASPECT * 100), 100), (100, int(MAX_ASPECT * 100))):
        width, height = target_size(size, None, 512, 64, square=False)
        assert abs(np.log(width / height * size[1] / size[0])) < 0.11
    for bad in ((MIN_SIDE - 1, 64), (int(MAX_ASPECT * 100) + 1, 100)):
        with pytest.raises(RivalError):
            check_exemplar_size(bad, None, square=False)
    check_exemplar_size((2000, 100), None, square=True)
    check_exemplar_size((2000, 100), (256, 256), square=False)
    with pytest.raises(RivalError, match="shorter side"):
        check_exemplar_size((2000, 10), None, square=True)


def test_an_rgb_uint8_mask_is_read_on_the_0_to_255_scale():
    mask = np.full((48, 64, 3), 100, np.uint8)
    mask[:, :32] = 255
    region = mask_region(mask, (640, 480), (64, 48), (6, 8))
    assert region[:, :4].all() and not region[:, 4:].any()
