"""Side-by-side cost of RIVAL variations against plain Stable Diffusion images on one device.

For each N it compiles and times, on the same UNet, steps, guidance, image size and batch: plain
text-to-image (classifier-free guidance, DDIM, as diffusers' Flax pipelines), and RIVAL's
inversion + reference pass (reference mode "keep" only) + aligned generation of N variations.
Plain and RIVAL runs alternate and each keeps its fastest of `--repeats`. It prints time per
variation / time per plain image (the figure we steer by), UNet evaluations per variation, compile
times, the exemplar's feature size and the reference mode picked, the memory XLA assigned to each
program and the device's peak memory where the backend reports it. `--stages` also times the
generation program with every step forced into one attention stage, to show where the time goes.
The run-option flags (--dtype, --resolution, --attention, --reference-mode, ...) are the CLI's.
With ControlNets (`--controlnet`, or `--random-controlnet`: random weights shaped for the UNet) both
sides run them on the exemplar's Canny edges (the plain side as diffusers' ControlNet pipelines),
and a plain program without them gives the ControlNets' share of a plain step.

    python scripts/benchmark.py                                   # tiny SD 1.x model, CPU-friendly
    python scripts/benchmark.py --model tiny-sdxl --reference-mode recompute --steps 3 --counts 2
    python scripts/benchmark.py --family sdxl --resolution 256 --steps 3 --counts 2
    python scripts/benchmark.py --family sdxl --resolution 1024 --steps 30 --dtype bfloat16 --counts 4,8   # GPU
    python scripts/benchmark.py --family sdxl --random-controlnet \
        --resolution 256 --steps 3 --counts 2,4 --repeats 1       # SDXL + ControlNet, both random (23 GB)

`--devices D` prints instead the per-device cost table of `scripts/cost_analysis.py` (XLA's cost
analysis of the sharded programs on D host devices; no accelerator, no weights):

    python scripts/benchmark.py --devices 8 --family sd1 --resolution 256 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax import InversionChain, RivalConfig, RivalError, RunOptions, example_image
from rival_jax.core import parallel
from rival_jax.core.reference import reference_batches
from rival_jax.core.sampler import GenerationInputs
from rival_jax.models.families import FAMILIES
from rival_jax.options import add_arguments
from rival_jax.pipeline import baseline, programs
from rival_jax.pipeline.control_maps import control_inputs
from rival_jax.pipeline.inputs import entry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_models import load_pipeline

# `--stages`: the RivalConfig switches that put every step in one attention stage (AdaIN off).
STAGES = {
    "plain": {"attention_injection": False, "noise_alignment": False},
    "replacement": {"t_align": 0, "noise_alignment": False},
    "fusion": {"early_replacement": False, "noise_alignment": False},
}


class Timed:
    """One jit-compiled program: its compile time, the memory XLA assigned it, its fastest run."""

    def __init__(self, function: Any, *args: Any) -> None:
        clock = time.perf_counter()
        self.compiled = jax.jit(function).lower(*args).compile()
        self.compile_seconds = time.perf_counter() - clock
        self.args = args
        self.seconds = float("inf")
        memory = self.compiled.memory_analysis()
        self.gib = (
            (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes) / 2**30
            if memory
            else float("nan")
        )

    def run(self, *args: Any) -> Any:
        """Run on `args` (default: the compile-time ones); keeps the fastest time."""
        clock = time.perf_counter()
        result = jax.block_until_ready(self.compiled(*(args or self.args)))
        self.seconds = min(self.seconds, time.perf_counter() - clock)
        return result


def peak_memory() -> str:
    """The first device's peak memory in use, where the backend reports it."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return f"{peak / 2**30:.2f} GiB" if peak else "n/a (backend does not report)"


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """Right-aligned columns: integers as they are, other numbers to 3 decimals."""
    lines = [" | ".join(f"{h:>12}" for h in header)]
    lines += [" | ".join(f"{v:>12}" if isinstance(v, int) else f"{v:>12.3f}" for v in row) for row in rows]
    return "\n".join(lines)


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def counts(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1."""
    return [positive(value) for value in text.split(",")]


def parse_arguments() -> argparse.Namespace:
    """The benchmark's flags; the run options' flags come from `RunOptions` as in the CLI."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", default="tiny", help="diffusers folder (SD 1.x/2.x/SDXL), hub id, or tiny, tiny-sd2, tiny-sdxl"
    )
    source.add_argument("--family", choices=FAMILIES, help="full SD 1.5/2.1/SDXL base architecture, random weights")
    add_arguments(parser, RunOptions)
    parser.add_argument(
        "--random-controlnet",
        action="store_true",
        help="add a random ControlNet shaped for the UNet (full SDXL: controlnet-canny-sdxl-1.0), on Canny edges",
    )
    parser.add_argument("--steps", type=positive, default=10)
    parser.add_argument("--counts", type=counts, default="1,4,16", help="numbers of variations N, comma-separated")
    parser.add_argument("--prompt", default="a photo", help="exemplar prompt (empty = null inversion, one context)")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--repeats", type=positive, default=2, help="timed runs per program (fastest kept)")
    parser.add_argument("--stages", action="store_true", help="also time each attention stage at the last N")
    parser.add_argument("--devices", type=positive, help="per-device cost table on this many host devices instead")
    return parser.parse_args()


def cost_table(args: argparse.Namespace) -> int:
    """Run `cost_analysis.py` for `--devices` with this run's architecture, size and steps; its exit code."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_analysis.py")
    tiny = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
    if not args.family and args.model not in tiny:
        raise RivalError("--devices takes --family sd1|sd2|sdxl or a built-in tiny model: it needs no weights")
    command = [sys.executable, script, "--devices", str(args.devices), "--steps", str(args.steps)]
    command += ["--family", args.family] if args.family else ["--tiny", "--family", tiny[args.model]]
    if getattr(args, "resolution", None):
        command += ["--resolution", str(args.resolution)]
    if getattr(args, "reference_batch_size", None):
        command += ["--reference-batch-size", str(args.reference_batch_size)]
    return subprocess.run(command, check=False).returncode


def main() -> None:
    """Load, invert the bundled exemplar, then time plain and RIVAL per N and print the tables."""
    args = parse_arguments()
    if args.devices:
        sys.exit(cost_table(args))
    pipe = load_pipeline(args)
    options, models, device = pipe.options, pipe.models, jax.devices()[0]
    weights = "random weights" if pipe.random_weights else "trained weights"
    print(f"model: {models.path} ({models.family}, {weights}); ", end="")
    print(f"device: {device.device_kind} ({device.platform}) x {pipe.mesh.size}; dtype {pipe.dtype.__name__}")
    for controlnet in pipe.controlnets:
        kind = f"{controlnet.path} ({controlnet.source}), params {pipe.dtype.__name__}"
        print(f"ControlNet: {kind}, on Canny edges", flush=True)

    params = pipe.params["unet"]
    timesteps = models.schedule.timesteps(args.steps)
    pixels, x0, source_size = pipe.encode_image(str(example_image()))
    size = (pixels.shape[1], pixels.shape[0])
    one_device = dataclasses.replace(pipe.statics, mesh=parallel.sub_mesh(pipe.mesh, 1))
    # What the text encoders give, read first (the chain's shape is all the reference mode needs):
    # then their weights go, as no timed program reads them (SDXL in float32: 3.3 GB of host memory).
    shaped = InversionChain(jnp.zeros((args.steps + 1, *x0.shape)), timesteps, args.prompt, pixels, source_size)
    contexts, mode, feature_bytes = (
        pipe.contexts(shaped),
        pipe.reference_mode(shaped),
        pipe.reference_feature_bytes(shaped),
    )
    exemplar = programs.InversionInputs(x0[None], pipe.encode_prompt([args.prompt], size), jnp.asarray(timesteps))
    conditioning = pipe.encode_prompt(["", args.prompt], size)
    for name in [name for name in pipe.params if name.startswith("text_encoder")]:
        del pipe.params[name]
    inversion = Timed(programs.Program(programs.inversion, one_device)(False), params, exemplar)
    for _ in range(args.repeats):
        chain = InversionChain(inversion.run()[0], timesteps, args.prompt, pixels, source_size)
    latent_height, latent_width = chain.latents.shape[-2:]
    print(f"image {size[0]}x{size[1]} (latent {latent_width}x{latent_height}), {args.steps} steps, ", end="")
    print(f"exemplar prompt {args.prompt!r}, guidance {args.guidance}, attention {options.attention}")
    print(f"inversion: compile {inversion.compile_seconds:.1f} s, run {inversion.seconds:.3f} s", flush=True)

    print(f"reference mode {mode} (option {options.reference_mode}); exemplar features ", end="")
    print(f"{feature_bytes / 2**30:.3f} GiB", end="")
    exemplar_programs = {"inversion": inversion}
    if mode == "keep":
        passes = programs.ReferenceInputs(chain.latents[None], contexts, jnp.asarray(timesteps))
        reference = Timed(programs.Program(programs.reference, pipe.statics)(False), params, passes)
        for _ in range(args.repeats):
            chain.reference = entry(reference.run(), 0)
        exemplar_programs["reference pass"] = reference
        batch = pipe.statics.reference_batch_size  # the option, or its default for this backend
        batches, per_batch = reference_batches(args.steps * contexts.size, batch)
        exemplar_evals = batches * per_batch
        print(", kept")
        print(f"reference pass: compile {reference.compile_seconds:.1f} s, run {reference.seconds:.3f} s ", end="")
        print(f"({exemplar_evals} UNet evaluations in batches of <= {batch})", flush=True)
    else:
        exemplar_evals = args.steps * contexts.size
        print(f", not stored: {contexts.size} exemplar entries recomputed in every generation step", flush=True)

    config = RivalConfig(guidance_scale=args.guidance)
    control = control_inputs(pipe.controlnets, chain, pipe.dtype, "canny" if pipe.controlnets else None, (1, 0, 1))
    # Plain programs: diffusers' attention, RIVAL's kernel (plain*), and with ControlNets one without them.
    kinds = [(pipe.statics, None, control), (pipe.statics, options.attention, control)]
    if control is not None:
        modules = dataclasses.replace(pipe.statics.modules, controlnets=())
        kinds.append((dataclasses.replace(pipe.statics, modules=modules), None, None))
    rows, memory = [], []
    for count in args.counts:
        mesh = parallel.exemplar_mesh(pipe.mesh, 1, count)
        length = parallel.padded_length(count, pipe.mesh.size)
        noise = jax.random.normal(jax.random.PRNGKey(0), (length, *chain.latents.shape[1:]))
        guidance = jnp.float32(args.guidance)
        plain_inputs = parallel.place(
            programs.PlainInputs(noise, conditioning, jnp.asarray(timesteps), guidance, control), pipe.mesh
        )
        plains = [
            Timed(
                programs.Program(baseline.plain, dataclasses.replace(statics, attention=kernel))(False),
                params,
                plain_inputs.replace(control=controls),
            )
            for statics, kernel, controls in kinds
        ]
        one = jax.tree_util.tree_map(lambda x: x[None], (noise, chain.latents, conditioning, contexts, chain.reference))
        inputs = GenerationInputs(
            start=one[0],
            chain=one[1],
            conditioning=one[2],
            contexts=one[3],
            reference=one[4],
            region=jnp.ones((1, latent_height, latent_width), bool),
            settings=config.as_arrays(),
            timesteps=jnp.asarray(timesteps),
            control=control,
        )
        inputs = parallel.place(inputs, mesh)
        statics = dataclasses.replace(pipe.statics, mesh=mesh)
        generation = Timed(programs.Program(programs.generation, statics)(False), params, inputs)
        for _ in range(args.repeats):
            for program in (*plains, generation):
                program.run()
        rival_seconds = sum(program.seconds for program in exemplar_programs.values()) + generation.seconds
        plain_seconds = [program.seconds for program in plains]
        rows.append(
            (
                count,
                rival_seconds / plain_seconds[0],
                rival_seconds / plain_seconds[1],
                (args.steps + exemplar_evals + 2 * args.steps * count) / count,
                2 * args.steps,
                rival_seconds / count,
                generation.seconds,
                *plain_seconds[:2],
                generation.compile_seconds,
                plains[0].compile_seconds,
                *((plain_seconds[2], 1 - plain_seconds[2] / plain_seconds[0]) if control else ()),
            )
        )
        memory.append((count, generation.gib, plains[0].gib))
        share = f", ControlNet share of a plain step {rows[-1][-1]:.3f}" if control else ""
        print(f"N={count}: ratio {rows[-1][1]:.3f}, like-for-like {rows[-1][2]:.3f}{share}", flush=True)

    print()
    header = ("N", "ratio", "ratio*", "UNet/var", "UNet/plain", "s/var", "gen s", "plain s", "plain* s")
    print(table((*header, "gen compile", "plain compile", *(("plain-CN s", "CN share") if control else ())), rows))
    print(f"\nratio = ({' + '.join(exemplar_programs)} + generation of N) / N  /  (plain batch of N / N)")
    print("plain: diffusers' UNet as is; plain*: its self-attention layers computed by the kernel of RIVAL's")
    print(f"injected layers ({options.attention}), so ratio* is the cost of the method alone")
    if mode == "recompute":
        print(f"UNet/var counts the {contexts.size} exemplar entries each generation step recomputes")
    if control:
        print("with ControlNet: RIVAL and both plains run it on the generated images' 2 guidance halves every step;")
        print("plain-CN: plain without it; CN share = 1 - plain-CN / plain: the ControlNet's share of a plain step")
    print(f"\nprogram memory (XLA buffer assignment: arguments + outputs + temporaries), device {device.device_kind}:")
    print("; ".join(f"{name} {program.gib:.2f} GiB" for name, program in exemplar_programs.items()))
    print(table(("N", "gen GiB", "plain GiB"), memory))
    print(f"peak device memory: {peak_memory()}")

    if args.stages:
        print(f"\nN={count}, generation with every step in one attention stage (AdaIN off) / plain*:")
        for stage, switches in STAGES.items():
            generation.seconds = float("inf")
            settings = RivalConfig(guidance_scale=args.guidance, **switches).as_arrays()
            for _ in range(args.repeats):
                generation.run(params, inputs.replace(settings=settings))
            print(f"{stage:>12} | {generation.seconds / plains[1].seconds:.3f}")


if __name__ == "__main__":
    try:
        main()
    except RivalError as error:
        sys.exit(f"benchmark: error: {error}")
