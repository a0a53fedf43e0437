"""ControlNet residuals for the generated entries (docs/method.md, "ControlNet").

As in the authors' release, the ControlNets see only the generated images' two guidance halves,
with the generated images' conditioning; the exemplar's entries (inversion, reference pass, or the
recomputed exemplar in the batch) get none. Several ControlNets add up, as diffusers' multi-
ControlNet does; each has a conditioning scale and an active range of the steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rival_jax.core.parallel import DATA, pad_to
from rival_jax.core.unet import Conditioning


@struct.dataclass
class Residuals:
    """What a ControlNet adds to the UNet: per down-block output and the mid block, NHWC as diffusers' Flax UNet."""

    down: tuple[jnp.ndarray, ...]
    mid: jnp.ndarray

    def __add__(self, other: Residuals) -> Residuals:
        return Residuals(tuple(a + b for a, b in zip(self.down, other.down, strict=True)), self.mid + other.mid)

    def after_zeros(self, count: int) -> Residuals:
        """The residuals with `count` all-zero entries in front (for entries that must get none)."""

        def padded(x: jnp.ndarray) -> jnp.ndarray:
            return jnp.concatenate([jnp.zeros((count, *x.shape[1:]), x.dtype), x])

        return Residuals(tuple(padded(x) for x in self.down), padded(self.mid))


@struct.dataclass
class ControlInputs:
    """What the ControlNets of one generation read, one entry per ControlNet.

    params: each ControlNet's params.
    images: each ControlNet's conditioning images in [0, 1] at the generated images' size: (1, 3, H, W),
        one map for every variation, or (L, 3, H, W), one per variation of the whole padded batch
        (replicated; each device takes its own variations' maps).
    scales: (K,) conditioning scales (traced: changing them does not recompile).
    starts, ends: (K,) the fraction of the steps where each ControlNet starts and stops acting, as
        diffusers' `control_guidance_start` / `control_guidance_end`.
    """

    params: tuple[Any, ...]
    images: tuple[jnp.ndarray, ...]
    scales: jnp.ndarray
    starts: jnp.ndarray
    ends: jnp.ndarray

    def padded(self, length: int) -> ControlInputs:
        """Per-variation maps padded to the batch's `length` variations (`parallel.pad_to`); shared ones as they are."""
        images = tuple(x if x.shape[0] == 1 else jnp.asarray(pad_to(x, length)) for x in self.images)
        return self.replace(images=images)


def _own_maps(image: jnp.ndarray, count: int) -> jnp.ndarray:
    """The maps of the `count` variations this device generates, for both guidance halves (2 * count, 3, H, W)."""
    if image.shape[0] == 1:
        return jnp.broadcast_to(image, (2 * count, *image.shape[1:]))
    own = jax.lax.dynamic_slice_in_dim(image, jax.lax.axis_index(DATA) * count, count)
    return jnp.concatenate([own, own])


def control_residuals(
    controlnets: tuple[Any, ...],
    control: ControlInputs,
    latents: jnp.ndarray,
    t: jnp.ndarray,
    cond: Conditioning,
    step: jnp.ndarray,
    steps: int,
) -> Residuals:
    """The summed residuals of every ControlNet for the entries `latents` (B, 4, h, w) at step `step` of `steps`.

    The entries are the [unconditional, conditional] halves of this device's variations; per-variation
    maps are taken by the device's place on the mesh's data axis (inside `parallel.sharded`).

    >>> residuals = control_residuals(controlnets, control, latents, t, batch_cond, jnp.int32(0), 50)
    """
    # SDXL ControlNets take the added conditioning (pooled text embeddings, time ids) as the SDXL UNet does.
    added = {} if cond.added is None else {"added_cond_kwargs": cond.added}
    total = None
    for k, (controlnet, params, image) in enumerate(zip(controlnets, control.params, control.images, strict=True)):
        active = (step / steps >= control.starts[k]) & ((step + 1) / steps <= control.ends[k])
        down, mid = controlnet.apply(
            {"params": params},
            latents,
            t,
            cond.text,
            _own_maps(image, latents.shape[0] // 2),
            conditioning_scale=control.scales[k] * active,
            return_dict=False,
            **added,
        )
        residuals = Residuals(tuple(down), mid)
        total = residuals if total is None else total + residuals
    return total
