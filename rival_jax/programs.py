"""The pure core's programs bound to one loaded checkpoint: what `RivalPipeline` compiles and runs.

Each builder returns a function of arrays and params only (no Python state), ready for `jax.jit`;
`report_progress` makes it tick every step (see `progress.step_ticks`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax.core import parallel
from rival_jax.core.inversion import invert
from rival_jax.core.reference import ReferenceFeatures, reference_pass
from rival_jax.core.sampler import GenerationInputs, aligned_generate
from rival_jax.models.loading import LoadedModels
from rival_jax.options import RunOptions


class Programs:
    """Inversion, reference pass, generation and the VAE, for `models` on the devices of `mesh`.

    Args:
        models: the loaded checkpoint.
        options: run options (attention kernel, reference batch size).
        mesh: the local devices (`parallel.local_mesh`).
        controlnets: loaded ControlNets whose modules generation runs.
        dtype: the params' dtype, which the VAE decodes in.

    >>> programs = Programs(pipe.models, pipe.options, pipe.mesh, (), jnp.float32)
    >>> chain = jax.jit(programs.inversion())(params["unet"], schedule, x0, cond, timesteps)
    """

    def __init__(
        self, models: LoadedModels, options: RunOptions, mesh: Any, controlnets: Sequence[Any], dtype: Any
    ) -> None:
        self.models, self.options, self.mesh, self.dtype = models, options, mesh, dtype
        self.controlnets = tuple(loaded.module for loaded in controlnets)
        vae = models.vae
        self.vae_scale = float(vae.config.scaling_factor)
        self.vae_shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def inversion(self, report_progress: bool = False) -> Callable[..., jax.Array]:
        """`invert` on this UNet: (params, schedule, x0, cond, timesteps) -> chain."""
        return functools.partial(invert, self.models.unet, report_progress=report_progress)

    def reference(self, report_progress: bool = False) -> Callable[..., ReferenceFeatures]:
        """`reference_pass` over the local devices: (params, schedule, chain, contexts, timesteps) -> features."""
        batch, mesh = self.options.reference_batch_size, self.mesh
        return functools.partial(
            reference_pass, self.models.unet, batch_size=batch, report_progress=report_progress, mesh=mesh
        )

    def generation(self, report_progress: bool = False, return_traces: bool = False) -> Callable[..., Any]:
        """`aligned_generate` over the local devices: (params, per_variation, shared) -> final latents.

        The two dicts are `parallel.split_per_variation(GenerationInputs(...))`. With `return_traces`
        the program also returns `traces.StepTraces` (a separate program).
        """
        unet, schedule, implementation = self.models.unet, self.models.schedule, self.options.attention
        controlnets = self.controlnets

        def generate(params: Any, inputs: GenerationInputs) -> jax.Array:
            return aligned_generate(
                unet, params, schedule, inputs, report_progress, implementation, controlnets, return_traces
            )

        sharded = parallel.over_variations(generate, self.mesh, GenerationInputs)

        def program(params: Any, per_variation: dict, shared: dict) -> jax.Array:
            return sharded(params, per_variation, shared)

        return program

    def encode(self, params: Any, pixels: jnp.ndarray) -> jnp.ndarray:
        """VAE posterior mean of pixels (N, 3, H, W) in [-1, 1], scaled: latents (N, 4, h, w)."""
        vae = self.models.vae
        posterior = vae.apply({"params": params}, pixels, method=vae.encode).latent_dist
        latents = posterior.mean.transpose(0, 3, 1, 2).astype(jnp.float32)
        return (latents - self.vae_shift) * self.vae_scale

    def decode(self, params: Any, latents: jnp.ndarray) -> jnp.ndarray:
        """Latents (N, 4, h, w) to images (N, H, W, 3) in [0, 1]."""
        vae = self.models.vae
        scaled = (latents / self.vae_scale + self.vae_shift).astype(self.dtype)
        decoded = vae.apply({"params": params}, scaled, method=vae.decode)
        return jnp.clip(decoded.sample.astype(jnp.float32).transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)
