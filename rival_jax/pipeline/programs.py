"""The programs of RIVAL on one checkpoint, as pure functions of params and named inputs.

Every program is a pure function `program(*arrays, statics=..., report_progress=...)` of params and
named structs: the checkpoint's modules and every static choice are fields of a frozen `Statics`,
what is split over devices is declared by the input struct (`parallel.sharded`), and a `Program`
names the function, its statics and the input fields whose buffers it may reuse. `compiled.Executables`
compiles a program once per (program, argument structure, shapes, dtypes) and keeps it (the
`plan` command compiles through it, from shapes alone, for devices it does not have). The plain
baseline RIVAL is measured against is `baseline.plain`; its inputs are `PlainInputs`, here with the others.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from rival_jax.core import parallel
from rival_jax.core.control import ControlInputs
from rival_jax.core.ddim import DDIMSchedule
from rival_jax.core.inversion import invert
from rival_jax.core.parallel import DATA, EXEMPLARS
from rival_jax.core.reference import ReferenceFeatures, reference_pass_many
from rival_jax.core.sampler import GenerationInputs, aligned_generate_many, start_latents
from rival_jax.core.unet import Conditioning


@dataclasses.dataclass(frozen=True, eq=False)
class Modules:
    """A checkpoint's Flax modules and DDIM schedule, compared by configuration: two loads of one
    architecture trace the same programs (the weights are arguments), so they share compiled programs.

    dtype: the params' dtype, which the VAE decodes in.
    """

    unet: Any
    vae: Any
    schedule: DDIMSchedule
    dtype: Any
    controlnets: tuple[Any, ...] = ()

    @functools.cached_property
    def _configuration(self) -> tuple:
        schedule = self.schedule
        return (
            tuple(_module_configuration(m) for m in (self.unet, self.vae, *self.controlnets)),
            jnp.dtype(self.dtype).name,
            (schedule.num_train_timesteps, schedule.prediction_type),
            np.asarray(schedule.alphas_cumprod).tobytes() + np.asarray(schedule.final_alpha_cumprod).tobytes(),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Modules) and self._configuration == other._configuration

    def __hash__(self) -> int:
        return hash(self._configuration)


def _module_configuration(module: Any) -> tuple:
    """A Flax module's class and fields (lists as tuples), which decide everything it traces."""
    fields = dataclasses.fields(module)
    return (type(module), tuple((f.name, _hashable(getattr(module, f.name))) for f in fields if f.name != "parent"))


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


@dataclasses.dataclass(frozen=True)
class Statics:
    """What a program is specialised on; hashable, so it keys the compiled programs.

    mesh: the devices it runs on; attention: the injected layers' kernel; latent_init,
    latent_alignment: `RivalConfig`'s settings the start latents read.
    """

    modules: Modules
    mesh: Mesh | None = None
    attention: str | None = None
    reference_batch_size: int = 8
    return_traces: bool = False
    latent_init: str = "shuffle"
    latent_alignment: bool = True


@dataclasses.dataclass(frozen=True)
class Program:
    """A program function bound to its statics; `donate`: fields of its last argument (a struct) it may reuse.

    >>> program = Program(generation, statics, donate=GenerationInputs.PER_VARIATION)
    >>> final = jax.jit(program(report_progress=False))(params["unet"], inputs)
    """

    function: Callable[..., Any]
    statics: Statics
    donate: tuple[str, ...] = ()

    def __call__(self, report_progress: bool) -> Callable[..., Any]:
        return functools.partial(self.function, statics=self.statics, report_progress=report_progress)


@struct.dataclass
class InversionInputs:
    """E exemplars to invert: x0 (E, 4, h, w), cond (E entries), timesteps (T,) shared."""

    SPLIT: ClassVar[dict[str, tuple[str, ...]]] = {"x0": (DATA,), "cond": (DATA,)}

    x0: jnp.ndarray
    cond: Conditioning
    timesteps: jnp.ndarray


@struct.dataclass
class ReferenceInputs:
    """E chains (E, T+1, 4, h, w), their contexts (E*C entries, exemplar-major) and the timesteps (T,)."""

    chains: jnp.ndarray
    contexts: Conditioning
    timesteps: jnp.ndarray


@struct.dataclass
class StartInputs:
    """Start latents of variations `indices` of the seed `key`, from x_T (4, h, w) inside `region` (h, w)."""

    key: jax.Array
    indices: jnp.ndarray
    x_t: jnp.ndarray
    region: jnp.ndarray


@struct.dataclass
class PlainInputs:
    """Plain text-to-image (`baseline.plain`): start (N, 4, h, w), conditioning [negative, prompt], timesteps
    (T,), guidance; control: the ControlNets' inputs (one map for every image), or None without ControlNet."""

    SPLIT: ClassVar[dict[str, tuple[str, ...]]] = {"start": (DATA,)}

    start: jnp.ndarray
    conditioning: Conditioning
    timesteps: jnp.ndarray
    guidance_scale: jnp.ndarray
    control: ControlInputs | None = None


def inversion(params: Any, inputs: InversionInputs, *, statics: Statics, report_progress: bool) -> jax.Array:
    """`invert` of E exemplars, their batch split over `statics.mesh`: chains (E, T+1, 4, h, w)."""
    modules = statics.modules

    def run(params: Any, inputs: InversionInputs) -> jax.Array:
        cond, timesteps = inputs.cond, inputs.timesteps
        return invert(
            modules.unet, params, modules.schedule, inputs.x0, cond, timesteps, report_progress=report_progress
        )

    return parallel.sharded(run, statics.mesh, (DATA,))(params, inputs)


def reference(params: Any, inputs: ReferenceInputs, *, statics: Statics, report_progress: bool) -> ReferenceFeatures:
    """`reference_pass_many` over `statics.mesh`: features (E, ...) of every exemplar, step and context."""
    modules = statics.modules
    return reference_pass_many(
        modules.unet,
        params,
        modules.schedule,
        inputs.chains,
        inputs.contexts,
        inputs.timesteps,
        batch_size=statics.reference_batch_size,
        report_progress=report_progress,
        mesh=statics.mesh,
    )


def generation(params: Any, inputs: GenerationInputs, *, statics: Statics, report_progress: bool) -> Any:
    """`aligned_generate_many` on `statics.mesh` (`parallel.exemplar_mesh`): final latents (E, N, 4, h, w).

    With `statics.return_traces`, also the `traces.StepTraces` (E, N, ...).
    """
    modules = statics.modules

    def run(params: Any, inputs: GenerationInputs) -> Any:
        return aligned_generate_many(
            modules.unet,
            params,
            modules.schedule,
            inputs,
            report_progress=report_progress,
            attention_implementation=statics.attention,
            controlnets=modules.controlnets,
            return_traces=statics.return_traces,
        )

    return parallel.sharded(run, statics.mesh, (EXEMPLARS, DATA))(params, inputs)


def start(inputs: StartInputs, *, statics: Statics, report_progress: bool) -> jax.Array:
    """`start_latents` with the statics' initialisation: (N, 4, h, w)."""
    init = {"latent_init": statics.latent_init, "latent_alignment": statics.latent_alignment}
    return start_latents(inputs.key, inputs.indices, inputs.x_t, inputs.region, **init)


def encode(params: Any, pixels: jnp.ndarray, *, statics: Statics, report_progress: bool) -> jnp.ndarray:
    """VAE posterior mean of pixels (N, 3, H, W) in [-1, 1], scaled: latents (N, 4, h, w)."""
    vae = statics.modules.vae
    posterior = vae.apply({"params": params}, pixels, method=vae.encode).latent_dist
    latents = posterior.mean.transpose(0, 3, 1, 2).astype(jnp.float32)
    return (latents - _vae_shift(vae)) * vae.config.scaling_factor


def decode(params: Any, latents: jnp.ndarray, *, statics: Statics, report_progress: bool) -> jnp.ndarray:
    """Latents (N, 4, h, w) to images (N, H, W, 3) in [0, 1]."""
    vae = statics.modules.vae
    scaled = (latents / vae.config.scaling_factor + _vae_shift(vae)).astype(statics.modules.dtype)
    decoded = vae.apply({"params": params}, scaled, method=vae.decode)
    return jnp.clip(decoded.sample.astype(jnp.float32).transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)


def _vae_shift(vae: Any) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)
