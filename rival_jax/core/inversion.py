"""DDIM inversion of the exemplar latent: the reference chain x_0 .. x_T (docs/method.md, inversion)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rival_jax import progress
from rival_jax.core.ddim import DDIMSchedule, ddim_step
from rival_jax.core.unet import Conditioning, unet_output


def invert(
    unet: Any,
    params: Any,
    schedule: DDIMSchedule,
    x0: jnp.ndarray,
    cond: Conditioning,
    timesteps: jnp.ndarray,
    report_progress: bool = False,
) -> jnp.ndarray:
    """Run DDIM backwards from x0 (4, h, w) conditioned on `cond` (one entry), no guidance.

    `timesteps` is the generation order (descending); inversion walks it upwards. Step i evaluates
    the UNet at t on the latent at s = t - stride; a v-prediction is turned into noise with abar(s),
    the level of that latent. Returns the chain (T+1, 4, h, w), x_0 first. `report_progress`
    (static) ticks `progress` every step. Several exemplars invert together as one UNet batch:
    x0 (E, 4, h, w) and E entries of `cond` give chains (E, T+1, 4, h, w).

    >>> chain = invert(unet, params["unet"], schedule, x0, cond, jnp.asarray(schedule.timesteps(50)))
    """
    ascending = timesteps[::-1]
    stride = schedule.stride(timesteps.shape[0])

    single = x0.ndim == 3
    batch = x0[None] if single else x0

    def step(x: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        alpha_from = schedule.alpha(t - stride)
        output = unet_output(unet, params, x, t, cond).astype(jnp.float32)
        eps = schedule.epsilon(output, x, alpha_from)
        x_next = ddim_step(x, eps, alpha_from, schedule.alpha(t))
        if report_progress:
            progress.tick(t)
        return x_next, x_next

    _, later = jax.lax.scan(step, batch, ascending)
    chains = jnp.concatenate([batch[None], later], axis=0).swapaxes(0, 1)
    return chains[0] if single else chains
