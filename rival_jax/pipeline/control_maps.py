"""ControlNet conditioning maps: what the user gives (files, images, "canny") to the core's `ControlInputs`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from rival_jax import images
from rival_jax.core.control import ControlInputs
from rival_jax.errors import RivalError
from rival_jax.pipeline.results import InversionChain


def _pixels(chain: InversionChain, entry: Any) -> np.ndarray:
    """One map as (H, W, 3) uint8 at the processed size."""
    if isinstance(entry, str) and entry == "canny":
        entry = images.CannyEdges()
    if isinstance(entry, images.CannyEdges):
        return images.canny(chain.image, entry.sigma, entry.low, entry.high)
    return images.control_array(entry, chain.source_size, chain.size)


def control_inputs(
    controlnets: tuple[Any, ...],
    chain: InversionChain,
    dtype: Any,
    control_image: Any,
    settings: tuple[Any, Any, Any],
    variations: int = 1,
) -> ControlInputs | None:
    """The ControlNets' inputs of a generation, checked before any work; None without ControlNets.

    Args:
        controlnets: the pipeline's loaded ControlNets (`models.controlnet.LoadedControlNet`).
        chain: the exemplar's chain (its processed image, sizes).
        dtype: the pipeline's compute dtype.
        control_image: one entry per ControlNet (a list with several). An entry is one map for every
            variation or a list of `variations` maps, one per variation in order; with one ControlNet
            a flat list of `variations` maps is one per variation. A map is a path, PIL image or uint8
            array at the exemplar's size or its processed size, or the processed exemplar's Canny edges
            ("canny", or `images.CannyEdges(sigma, low, high)` for other thresholds).
        settings: (conditioning scale, guidance start, guidance end), each one value or one per ControlNet.
        variations: how many variations are generated (per-variation maps must match it).

    >>> control = control_inputs(pipe.controlnets, chain, jnp.float32, "canny", (1.0, 0.0, 1.0))
    >>> control = control_inputs(pipe.controlnets, chain, jnp.float32, ["a.png", "b.png"], (1.0, 0.0, 1.0), 2)
    """
    scale, start, end = settings
    count = len(controlnets)
    if not count:
        if control_image is not None:
            raise RivalError("control_image given but no ControlNet is loaded: pass controlnet= (--controlnet)")
        return None
    if control_image is None:
        raise RivalError("a ControlNet is loaded: pass control_image= (--control-image FILE or --control canny)")

    def per_controlnet(value: Any, name: str) -> list:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * count
        if len(values) != count:
            raise RivalError(f"{name} has {len(values)} entries for {count} ControlNets: give one per ControlNet")
        return values

    several = isinstance(control_image, (list, tuple)) and len(control_image) > 1
    maps = [list(control_image)] if count == 1 and several else per_controlnet(control_image, "control_image")
    for k, entry in enumerate(maps):
        if isinstance(entry, (list, tuple)) and len(entry) != variations:
            raise RivalError(
                f"control_image has {len(entry)} maps for {variations} variations (ControlNet {k + 1} of {count}): "
                "give one map per ControlNet, each one map for all variations or a list of one per variation"
            )
    bounds = [np.asarray(per_controlnet(v, n), np.float32) for v, n in ((start, "start"), (end, "end"))]
    if not all(0.0 <= a < b <= 1.0 for a, b in zip(*bounds, strict=True)):
        raise RivalError("control_guidance_start/end must satisfy 0 <= start < end <= 1 for every ControlNet")
    pixels = [np.stack([_pixels(chain, m) for m in (e if isinstance(e, (list, tuple)) else [e])]) for e in maps]
    return ControlInputs(
        params=tuple(loaded.params for loaded in controlnets),
        images=tuple(jnp.asarray(p.transpose(0, 3, 1, 2) / 255.0, dtype) for p in pixels),
        scales=jnp.asarray(per_controlnet(scale, "controlnet_conditioning_scale"), jnp.float32),
        starts=jnp.asarray(bounds[0]),
        ends=jnp.asarray(bounds[1]),
    )
