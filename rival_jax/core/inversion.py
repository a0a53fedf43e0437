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
    (static) ticks `progress` every step.

    >>> chain = invert(unet, params["unet"], schedule, x0, cond, jnp.asarray(schedule.timesteps(50)))
    """
    ascending = timesteps[::-1]
    stride = schedule.stride(timesteps.shape[0])

    def step(x: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        alpha_from = schedule.alpha(t - stride)
        output = unet_output(unet, params, x[None], t, cond)[0].astype(jnp.float32)
        eps = schedule.epsilon(output, x, alpha_from)
        x_next = ddim_step(x, eps, alpha_from, schedule.alpha(t))
        if report_progress:
            progress.tick(t)
        return x_next, x_next

    _, later = jax.lax.scan(step, x0, ascending)
    return jnp.concatenate([x0[None], later], axis=0)
