"""The compiled programs of RIVAL on one checkpoint, and the cache that compiles each once and times it.

Every program is a pure function `program(*arrays, statics=..., report_progress=...)` of params and
named structs: the checkpoint's modules and every static choice are fields of a frozen `Statics`,
what is split over devices is declared by the input struct (`parallel.sharded`), and a `Program`
names the function, its statics and the input fields whose buffers it may reuse. `Executables`
compiles a program once per (program, argument structure, shapes, dtypes) and keeps it (the
`plan` command compiles through it, from shapes alone, for devices it does not have). The plain
baseline RIVAL is measured against is `baseline.plain`; its inputs are `PlainInputs`, here with the others.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from rival_jax import progress
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
    """A checkpoint's Flax modules and DDIM schedule, compared by identity (one object per loaded checkpoint).

    dtype: the params' dtype, which the VAE decodes in.
    """

    unet: Any
    vae: Any
    schedule: DDIMSchedule
    dtype: Any
    controlnets: tuple[Any, ...] = ()


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


class Executables:
    """Compiled programs, each compiled on first use for its argument shapes and kept, with their seconds.

    Keyed by the program (a `Program`, or any hashable `make_program(report_progress)`), whether it
    ticks, and its arguments' structure, shapes and dtypes. `timings[label]`: compile and run seconds.

    >>> runs = Executables()
    >>> chains = runs.run("inversion", Program(inversion, statics), steps=50, show=True, args=(params, inputs))
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple, Any] = {}
        self.timings: defaultdict[str, dict[str, float]] = defaultdict(lambda: {"compile_s": 0.0, "run_s": 0.0})

    def compile(self, label: str, program: Callable[[bool], Callable], show: bool, args: tuple) -> Any:
        """`program(report_progress)` compiled for `args` (arrays, or shapes with shardings: `parallel.abstract`).

        Args:
            label: the program's name in progress lines and `timings`.
            program: a `Program`, or a hashable function of report_progress (ticks every step only
                when progress is shown and the persistent cache is off, `progress.step_ticks`).
            show: progress on stderr; args: the program's arguments.

        >>> runs.compile("generation", Program(generation, statics), False, (params, inputs)).memory_analysis()
        """
        ticks = progress.step_ticks(show)
        args, kwargs = _donated_apart(program, args)
        leaves, structure = jax.tree_util.tree_flatten((args, kwargs))
        key = (program, ticks, structure, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if key not in self._compiled:
            function = _rejoining(program(ticks)) if kwargs else program(ticks)
            with progress.compiling(label, show) as clock:
                self._compiled[key] = jax.jit(function, donate_argnames=tuple(kwargs)).lower(*args, **kwargs).compile()
            self.timings[label]["compile_s"] += clock.seconds
        return self._compiled[key]

    def run(self, label: str, program: Callable[[bool], Callable], steps: int, show: bool, args: tuple) -> Any:
        """Run `program(report_progress)(*args)`, compiled on first use (`compile`, which takes the same
        arguments); `steps`: ticks one run makes (the bar's length), shown after the compile line."""
        compiled = self.compile(label, program, show, args)
        args, kwargs = _donated_apart(program, args)
        started = time.perf_counter()
        ticks = progress.step_ticks(show)
        shown = progress.progress_bar(label, steps, show) if ticks else progress.activity(f"running {label}", show)
        with shown:
            result = jax.block_until_ready(compiled(*args, **kwargs))
        self.timings[label]["run_s"] += time.perf_counter() - started
        return result


def _donated_apart(program: Any, args: tuple) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs): the fields of the last argument that `program` donates travel apart (only theirs donated)."""
    donated = getattr(program, "donate", ())
    if not donated:
        return args, {}
    *rest, inputs = args
    fields = {name: getattr(inputs, name) for name in donated}
    return (*rest, inputs.replace(**dict.fromkeys(donated))), {"donated": fields}


def _rejoining(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function(*rest, inputs)` called as `(*rest, inputs without the donated fields, donated=those fields)`."""

    def call(*args: Any, donated: dict[str, Any]) -> Any:
        *rest, inputs = args
        return function(*rest, inputs.replace(**donated))

    return call
