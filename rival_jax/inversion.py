"""DDIM inversion of the exemplar latent: the reference chain x_0 .. x_T (ALGORITHM.md section 2)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rival_jax import progress
from rival_jax.attention import unet_eps
from rival_jax.ddim import DDIMSchedule, ddim_step


def invert(
    unet: Any,
    params: Any,
    schedule: DDIMSchedule,
    x0: jnp.ndarray,
    text: jnp.ndarray,
    timesteps: jnp.ndarray,
    report_progress: bool = False,
) -> jnp.ndarray:
    """Run DDIM backwards from x0 (4, h, w) with the text embedding `text` (1, L, D), no guidance.

    `timesteps` is the generation order (descending); inversion walks it upwards. Step i evaluates
    the UNet at t on the latent at s = t - stride. Returns the chain (T+1, 4, h, w), x_0 first.
    `report_progress` (static) ticks `progress` every step.
    """
    ascending = timesteps[::-1]
    stride = schedule.stride(timesteps.shape[0])

    def step(x: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        eps = unet_eps(unet, params, x[None], t, text)[0].astype(jnp.float32)
        x_next = ddim_step(x, eps, schedule.alpha(t - stride), schedule.alpha(t))
        if report_progress:
            progress.tick(t)
        return x_next, x_next

    _, later = jax.lax.scan(step, x0, ascending)
    return jnp.concatenate([x0[None], later], axis=0)
