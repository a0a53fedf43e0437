"""Plan a run for a machine this process does not have: every program compiled ahead of time, per chip.

`plan` builds each program a run uses (`tpu.shapes`: inversion, reference pass, generation, VAE
decode, and plain SD's generation as the baseline) from shapes alone, on the target's first host's
devices (`parallel.local_mesh`), compiles it through the pipeline's own `Executables.compile`, and
reads XLA's memory and cost analyses: bytes per device (arguments, temporaries, outputs), FLOPs and
bytes accessed per device, each multiplied by the program's loop trips (XLA counts a loop body once).
The roofline time of a program is max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per device.

It tries the asked reference mode and N first; when a program does not fit, both modes at N, then
at N halved, until something fits (or nothing does at N = 1). In keep, a reference pass that does not
fit is tried again with its UNet batch halved (its memory falls with the batch; N does not change it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax.core import parallel
from rival_jax.core.reference import KEEP_MEMORY_FRACTION, device_batches, feature_bytes
from rival_jax.pipeline import compiled, programs
from rival_jax.tpu import gpus
from rival_jax.tpu import shapes as build
from rival_jax.tpu.shapes import REFERENCE_LABEL, Call, ModelShapes
from rival_jax.tpu.targets import Target

MODES = ("keep", "recompute")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One compiled program, per device: bytes (arguments, temporaries, outputs, of which aliased to
    donated arguments), FLOPs and bytes accessed (loop trips multiplied in), roofline and compile seconds.
    `out_of_memory`: the compiler refused it for the device's memory; `temporaries` is then what it said
    the program needs (0 when it did not say), nothing else is known."""

    label: str
    arguments: int
    temporaries: int
    outputs: int
    aliased: int
    flops: float
    bytes_accessed: float
    roofline_s: float | None
    compile_s: float
    out_of_memory: bool = False

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries + self.outputs - self.aliased


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A run's programs for one reference mode and N, measured; `fits`: every one within `memory` per device.
    `reference_batch`: keep's reference pass's UNet batch on one device (None in recompute)."""

    mode: str
    variations: int
    rival: tuple[Measurement, ...]
    decode: Measurement
    plain: Measurement
    memory: int
    images: int
    reference_batch: int | None

    @property
    def measurements(self) -> tuple[Measurement, ...]:
        return (*self.rival, self.decode, self.plain)

    def within(self, measured: Measurement) -> bool:
        return measured.total <= self.memory and not measured.out_of_memory

    @property
    def fits(self) -> bool:
        return all(self.within(m) for m in self.measurements)

    @property
    def only_reference_too_big(self) -> bool:
        """Keep's reference pass does not fit and is the one program that does not."""
        return not self.fits and all(self.within(m) for m in self.measurements if m.label != REFERENCE_LABEL)

    @property
    def seconds_per_variation(self) -> float | None:
        """Roofline seconds of the host's run (inversion, reference, generation, decode) per variation."""
        times = [m.roofline_s for m in (*self.rival, self.decode)]
        return None if None in times else sum(times) / self.images

    @property
    def plain_seconds_per_image(self) -> float | None:
        times = [self.plain.roofline_s, self.decode.roofline_s]
        return None if None in times else sum(times) / self.images


@dataclasses.dataclass(frozen=True)
class Work:
    """What one host of the target runs: `exemplars` x `variations` of `steps` steps, `contexts` (1 or 2)
    guidance contexts per exemplar, `mode` "auto", "keep" or "recompute"."""

    exemplars: int
    variations: int
    steps: int
    contexts: int
    mode: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """`asked`: the run as asked (its mode: as given, or what "auto" picks); `fitting`: the first outcome that
    fits (`asked` itself when it does), None when nothing does at N = 1; `reference_batch_size`: the
    `--reference-batch-size` that `fitting` needs, None when the run's own serves."""

    asked: Outcome
    fitting: Outcome | None
    reference_batch_size: int | None = None


class Planner:
    """Compiles and measures a run's programs on `target`'s first host (one `Executables`: each program once).

    Args:
        shapes: the checkpoint as shapes (`tpu.shapes.model_shapes`).
        target: the resolved target (`targets.resolve_target`).
        attention: the injected layers' kernel; reference_batch_size: as `RunOptions`.
        memory: bytes one device may hold (a chip's HBM over its devices, unless given).
        report: called with each program's label before it compiles (progress).

    >>> planner = Planner(model_shapes(None, "sd1", jnp.bfloat16, None, True), resolve_target("v5e:1x1"), ...)
    >>> plan = planner.plan(Work(1, 8, 50, 2, "auto"))
    """

    def __init__(
        self,
        shapes: ModelShapes,
        target: Target,
        attention: str,
        reference_batch_size: int,
        memory: int,
        report: Callable[[str], None] = lambda label: None,
    ) -> None:
        self.shapes, self.target, self.memory, self.report = shapes, target, memory, report
        mesh = parallel.local_mesh(target.local_devices)
        self.statics = programs.Statics(shapes.modules, mesh, attention, reference_batch_size)
        self.executables = compiled.Executables()
        self._measured: dict[tuple, tuple[Measurement, Any]] = {}

    def measure(self, call: Call) -> tuple[Measurement, Any]:
        """`call` compiled (once) and measured per device; also its output shapes."""
        key = (call.label, call.program, jax.tree_util.tree_structure(call.args), _shapes(call.args))
        if key not in self._measured:
            self.report(call.label)
            start = time.perf_counter()
            compile_only = self.target.spec.chip is not None  # such programs cannot be read back from the cache
            try:
                with _persistent_cache_off() if compile_only else contextlib.nullcontext():
                    compiled = self.executables.compile(call.label, call.program, False, call.args)
            except jax.errors.JaxRuntimeError as error:
                if "RESOURCE_EXHAUSTED" not in str(error):
                    raise
                seconds = time.perf_counter() - start
                refused = Measurement(call.label, 0, _needed_bytes(str(error)), 0, 0, 0.0, 0.0, None, seconds, True)
                self._measured[key] = refused, None
                return self._measured[key]
            seconds = time.perf_counter() - start
            memory = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = (cost[0] if isinstance(cost, list) else cost) or gpus.cost_analysis(compiled)
            flops = float(cost.get("flops", 0.0)) * call.trips
            accessed = float(cost.get("bytes accessed", 0.0)) * call.trips
            measured = Measurement(
                call.label,
                int(memory.argument_size_in_bytes),
                int(memory.temp_size_in_bytes),
                int(memory.output_size_in_bytes),
                int(memory.alias_size_in_bytes),
                flops,
                accessed,
                self._roofline(flops, accessed),
                seconds,
            )
            self._measured[key] = measured, compiled.out_info
        return self._measured[key]

    def _roofline(self, flops: float, accessed: float) -> float | None:
        chip = self.target.spec.chip
        if chip is None:
            return None
        per_device = self.target.devices_per_chip
        return max(flops / (chip.peak_bf16_flops / per_device), accessed / (chip.hbm_bytes_per_s / per_device))

    def outcome(self, work: Work, mode: str, reference_batch: int | None = None) -> Outcome:
        """The run's programs in reference `mode` ("keep" or "recompute"), measured; keep's reference pass in
        UNet batches of `reference_batch` (default: the planner's `reference_batch_size`)."""
        shapes, statics, steps = self.shapes, self.statics, work.steps
        batch = self.reference_batch(work, reference_batch) if mode == "keep" else None
        rival = [self.measure(build.inversion(shapes, statics, work.exemplars, steps))[0]]
        features = None
        if batch is not None:
            measured, features = self.measure(self._reference_call(work, batch))
            rival.append(measured)
        if mode != "keep" or features is not None:  # keep's generation takes the reference pass's output
            generation = build.generation(
                shapes, statics, (work.exemplars, work.variations, steps, work.contexts), features
            )
            rival.append(self.measure(generation)[0])
        images = work.exemplars * work.variations
        decode = self.measure(build.decode(shapes, statics, images))[0]
        plain = self.measure(build.plain(shapes, statics, images, steps))[0]
        return Outcome(mode, work.variations, tuple(rival), decode, plain, self.memory, images, batch)

    def _reference_exemplars(self, work: Work) -> int:
        """The exemplars the reference pass evaluates: as `generate_many` pads them to its mesh's rows."""
        rows = parallel.exemplar_rows(self.statics.mesh.size, work.exemplars, work.variations)
        return parallel.padded_length(work.exemplars, rows) if work.exemplars > 1 else 1

    def reference_batch(self, work: Work, size: int | None = None) -> int:
        """Keep's reference-pass UNet batch per device, at most `size` (default: the planner's), as a run splits it."""
        items = work.steps * work.contexts * self._reference_exemplars(work)
        return device_batches(items, self.statics.mesh.size, size or self.statics.reference_batch_size)[1]

    def _reference_call(self, work: Work, batch: int) -> Call:
        statics = dataclasses.replace(self.statics, reference_batch_size=batch)
        return build.reference(self.shapes, statics, self._reference_exemplars(work), work.steps, work.contexts)

    def outcome_in_batches(self, work: Work, mode: str) -> Outcome:
        """`outcome`; in keep, with the reference pass's batch halved while that pass alone does not fit (and
        the features it keeps would)."""
        found = self.outcome(work, mode)
        if mode != "keep" or self.feature_bytes(work) > self.memory:
            return found
        while found.only_reference_too_big and found.reference_batch > 1:
            found = self.outcome(work, mode, found.reference_batch // 2)
        return found

    def feature_bytes(self, work: Work) -> int:
        """The exemplars' features one device keeps (as `RivalPipeline` sizes them, from one traced UNet call)."""
        contexts = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), self.shapes.cond(work.contexts))
        unet, params = self.shapes.modules.unet, self.shapes.params["unet"]
        per_exemplar = feature_bytes(unet, params, self.shapes.latent, contexts, work.steps)
        rows = parallel.exemplar_rows(self.statics.mesh.size, work.exemplars, work.variations)
        return per_exemplar * (parallel.padded_length(work.exemplars, rows) // rows)

    def auto_mode(self, work: Work) -> str:
        """What reference mode "auto" picks in a run: keep when each device's features fit its share."""
        return "keep" if self.feature_bytes(work) <= KEEP_MEMORY_FRACTION * self.memory else "recompute"

    def plan(self, work: Work) -> Plan:
        """The run as asked, and the first that fits: both modes (keep's reference pass in smaller batches
        too), then N halved, down to 1."""
        first = self.auto_mode(work) if work.mode == "auto" else work.mode
        modes = (first, *(m for m in MODES if m != first))
        asked = self.outcome(work, first)
        if asked.fits:
            return Plan(asked, asked)
        variations = work.variations
        while True:
            for mode in modes:
                smaller = dataclasses.replace(work, variations=variations)
                found = self.outcome_in_batches(smaller, mode)
                if found.fits:
                    halved = found.reference_batch is not None and found.reference_batch < self.reference_batch(smaller)
                    return Plan(asked, found, found.reference_batch if halved else None)
            if variations == 1:
                return Plan(asked, None)
            variations //= 2


def _needed_bytes(message: str) -> int:
    """The bytes a compiler's out-of-memory message says a program needs (TPU: its temporaries, or all it
    used), 0 when it names none."""
    found = re.search(r"(?:required for HLO temporaries \(|Used )([\d.]+)([KMGT]?)", message)
    return int(float(found[1]) * 1024 ** "BKMGT".index(found[2] or "B")) if found else 0


@contextlib.contextmanager
def _persistent_cache_off() -> Iterator[None]:
    """JAX decides once whether its cache is used: each switch resets that decision."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _shapes(tree: Any) -> tuple:
    return tuple((x.shape, str(x.dtype), str(getattr(x, "sharding", ""))) for x in jax.tree_util.tree_leaves(tree))
