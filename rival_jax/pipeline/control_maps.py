"""ControlNet conditioning maps: what the user gives (files, images, "canny") to the core's `ControlInputs`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from rival_jax import images
from rival_jax.core.control import ControlInputs
from rival_jax.errors import RivalError
from rival_jax.pipeline.results import InversionChain


def control_inputs(
    controlnets: tuple[Any, ...], chain: InversionChain, dtype: Any, control_image: Any, settings: tuple[Any, Any, Any]
) -> ControlInputs | None:
    """The ControlNets' inputs of a generation, checked before any work; None without ControlNets.

    Args:
        controlnets: the pipeline's loaded ControlNets (`models.controlnet.LoadedControlNet`).
        chain: the exemplar's chain (its processed image, sizes).
        dtype: the pipeline's compute dtype.
        control_image: one map per ControlNet (a list with several): a path, PIL image or uint8 array at
            the exemplar's size or its processed size, or the processed exemplar's Canny edges
            ("canny", or `images.CannyEdges(sigma, low, high)` for other thresholds).
        settings: (conditioning scale, guidance start, guidance end), each one value or one per ControlNet.

    >>> control = control_inputs(pipe.controlnets, chain, jnp.float32, "canny", (1.0, 0.0, 1.0))
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

    maps, sizes = per_controlnet(control_image, "control_image"), (chain.source_size, chain.size)
    bounds = [np.asarray(per_controlnet(v, n), np.float32) for v, n in ((start, "start"), (end, "end"))]
    if not all(0.0 <= a < b <= 1.0 for a, b in zip(*bounds, strict=True)):
        raise RivalError("control_guidance_start/end must satisfy 0 <= start < end <= 1 for every ControlNet")
    maps = [images.CannyEdges() if isinstance(m, str) and m == "canny" else m for m in maps]
    pixels = [
        images.canny(chain.image, m.sigma, m.low, m.high)
        if isinstance(m, images.CannyEdges)
        else images.control_array(m, *sizes)
        for m in maps
    ]
    return ControlInputs(
        params=tuple(loaded.params for loaded in controlnets),
        images=tuple(jnp.asarray(p.transpose(2, 0, 1)[None] / 255.0, dtype) for p in pixels),
        scales=jnp.asarray(per_controlnet(scale, "controlnet_conditioning_scale"), jnp.float32),
        starts=jnp.asarray(bounds[0]),
        ends=jnp.asarray(bounds[1]),
    )
