"""The baseline RIVAL is measured against: plain text-to-image, with the pipeline's ControlNets when it has some.

Classifier-free guidance and DDIM as diffusers' Flax SD and SDXL pipelines; the ControlNets' residuals
come from `core.control.control_residuals`, the code that gives RIVAL's generated entries theirs, on
both guidance halves of every image, as diffusers' ControlNet pipelines.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax.core import parallel
from rival_jax.core.attention import own_reference
from rival_jax.core.control import control_residuals
from rival_jax.core.ddim import ddim_step
from rival_jax.core.parallel import DATA
from rival_jax.core.unet import unet_output
from rival_jax.pipeline.programs import PlainInputs, Statics


def plain(params: Any, inputs: PlainInputs, *, statics: Statics, report_progress: bool) -> jnp.ndarray:
    """Plain text-to-image of `inputs.start` (N, 4, h, w), split over `statics.mesh`: final latents (N, 4, h, w).

    The raw UNet output is turned into noise (`schedule.epsilon`) before guidance, which is the same
    since both are linear. `statics.attention` None: diffusers' own self-attention; else the injected
    layers' kernel ("xla" or "cudnn") computes every self-attention layer (a like-for-like baseline).
    With `statics.modules.controlnets`, `inputs.control` holds their params and maps.

    Args:
        params: the UNet's params.
        inputs: start latents, [negative, prompt] conditioning, timesteps, guidance scale, ControlNet inputs.
        statics: the checkpoint's modules, mesh and attention kernel; report_progress: unused (no ticks).

    >>> final = jax.jit(Program(plain, statics)(report_progress=False))(params["unet"], inputs)
    """
    modules, kernel = statics.modules, statics.attention
    unet, schedule, controlnets = modules.unet, modules.schedule, modules.controlnets

    def run(params: Any, inputs: PlainInputs) -> jnp.ndarray:
        x_start, steps = inputs.start, inputs.timesteps.shape[0]
        batch_cond = inputs.conditioning.repeat(x_start.shape[0])

        def step(x: jnp.ndarray, xs: tuple[jnp.ndarray, jnp.ndarray]) -> tuple[jnp.ndarray, None]:
            index, t = xs
            latents = jnp.concatenate([x, x])
            residuals = None
            if controlnets:
                residuals = control_residuals(controlnets, inputs.control, latents, t, batch_cond, index, steps)
            with own_reference(kernel) if kernel else contextlib.nullcontext():
                output = unet_output(unet, params, latents, t, batch_cond, residuals)
            alpha = schedule.alpha(t)
            eps = schedule.epsilon(output.astype(jnp.float32), latents.astype(jnp.float32), alpha)
            eps_uncond, eps_cond = jnp.split(eps, 2)
            guided = eps_uncond + inputs.guidance_scale * (eps_cond - eps_uncond)
            return ddim_step(x, guided, alpha, schedule.alpha(t - schedule.stride(steps))).astype(x.dtype), None

        return jax.lax.scan(step, x_start, (jnp.arange(steps), inputs.timesteps))[0]

    return parallel.sharded(run, statics.mesh, (DATA,))(params, inputs)
