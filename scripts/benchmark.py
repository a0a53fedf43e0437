"""Side-by-side cost of RIVAL variations against plain Stable Diffusion images on one device.

For each N it compiles and times, on the same UNet, steps, guidance, resolution and batch:
plain text-to-image (classifier-free guidance, DDIM), and RIVAL's inversion + reference pass +
aligned generation of N variations. Plain and RIVAL runs alternate and each keeps its fastest of
`--repeats`. It prints time per variation / time per plain image (the figure we steer by), UNet
evaluations per variation, compile times, the memory XLA assigned to each program and the device's
peak memory where the backend reports it. `--stages` also times the generation program with every
step forced into one attention stage, to show where the time goes.

    python scripts/benchmark.py                                  # tiny model, CPU-friendly
    python scripts/benchmark.py --sd15-random --resolution 256 --steps 3
    python scripts/benchmark.py --sd15-random --resolution 512 --steps 50 --dtype bfloat16   # GPU/TPU
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax import RivalConfig, RivalError, RivalPipeline
from rival_jax.attention import own_reference, unet_eps
from rival_jax.cli import bundled_exemplar
from rival_jax.config import REFERENCE_BATCH_SIZE
from rival_jax.ddim import DDIMSchedule, ddim_step
from rival_jax.parallel import batch_sharding, pad_to
from rival_jax.pipeline import resolve_dtype
from rival_jax.random_models import random_sd15_models
from rival_jax.sampler import reference_batches

STAGES = {
    "plain": RivalConfig(attention_injection=False, noise_alignment=False),
    "replacement": RivalConfig(t_align=0, noise_alignment=False),
    "fusion": RivalConfig(early_replacement=False, noise_alignment=False),
}


def plain_generate(unet, kernel, params, schedule: DDIMSchedule, start, texts, timesteps, guidance):
    """Plain SD text-to-image: CFG + DDIM over the same UNet (what FlaxStableDiffusionPipeline does).

    kernel: None for diffusers' own self-attention, else the injected layers' attention implementation
    ("xla" or "cudnn") computes every self-attention layer (like-for-like baseline).
    """
    count, stride = start.shape[0], schedule.stride(timesteps.shape[0])
    batch_texts = jnp.repeat(texts, count, axis=0)

    def step(x, t):
        with own_reference(kernel) if kernel else contextlib.nullcontext():
            eps = unet_eps(unet, params, jnp.concatenate([x, x]), t, batch_texts)
        eps_uncond, eps_cond = jnp.split(eps, 2)
        guided = eps_uncond + guidance * (eps_cond - eps_uncond)
        return ddim_step(x, guided, schedule.alpha(t), schedule.alpha(t - stride)).astype(x.dtype), None

    return jax.lax.scan(step, start, timesteps)[0]


class Program:
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
        clock = time.perf_counter()
        result = jax.block_until_ready(self.compiled(*(args or self.args)))
        self.seconds = min(self.seconds, time.perf_counter() - clock)
        return result


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return f"{peak / 2**30:.2f} GiB" if peak else "n/a (backend does not report)"


def tree_gib(tree: Any) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)) / 2**30


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = [" | ".join(f"{h:>12}" for h in header)]
    lines += [" | ".join(f"{v:>12}" if isinstance(v, int) else f"{v:>12.3f}" for v in row) for row in rows]
    return "\n".join(lines)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def counts(text: str) -> list[int]:
    return [positive(value) for value in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="diffusers SD 1.x folder, hub id, or 'tiny'")
    parser.add_argument("--sd15-random", action="store_true", help="full SD 1.5 architecture with random weights")
    parser.add_argument("--resolution", type=int, help="image size (default: the model's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla", help="injected attention backend")
    parser.add_argument("--reference-batch-size", type=int, default=REFERENCE_BATCH_SIZE, help="reference pass batch")
    parser.add_argument("--counts", type=counts, default="1,4,16", help="numbers of variations N, comma-separated")
    parser.add_argument("--prompt", default="a photo", help="exemplar prompt (empty = null inversion, one context)")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--repeats", type=positive, default=2, help="timed runs per program (fastest kept)")
    parser.add_argument("--stages", action="store_true", help="also time each attention stage at the last N")
    args = parser.parse_args()

    dtype = resolve_dtype(args.dtype)
    options = {
        "resolution": args.resolution,
        "attention": args.attention,
        "reference_batch_size": args.reference_batch_size,
    }
    if args.sd15_random:
        pipe = RivalPipeline(random_sd15_models(dtype), dtype, **options)
    else:
        pipe = RivalPipeline.from_pretrained(args.model, dtype=dtype, **options)
    device = jax.devices()[0]
    name = "SD 1.5 architecture, random weights" if args.sd15_random else str(pipe.models.path)
    print(f"model: {name}; device: {device.device_kind} ({device.platform}) x {pipe.mesh.size}; dtype {dtype.__name__}")
    print(f"resolution {pipe.resolution}x{pipe.resolution} (latent {pipe.latent_size}), {args.steps} steps, ", end="")
    print(f"exemplar prompt {args.prompt!r}, guidance {args.guidance}, attention {args.attention}", flush=True)

    unet, params, schedule = pipe.models.unet, pipe.params["unet"], pipe.models.schedule
    timesteps = jnp.asarray(schedule.timesteps(args.steps))
    _, x0 = pipe.encode_image(str(bundled_exemplar()))
    contexts = pipe.encode_prompt([""] if args.prompt == "" else ["", args.prompt])
    texts = pipe.encode_prompt(["", args.prompt])
    invert = pipe.program("invert")
    inversion = Program(lambda p, x, t, ts: invert(p, schedule, x, t, ts), params, x0, contexts[-1:], timesteps)
    for _ in range(args.repeats):
        chain = inversion.run()
    reference_program = Program(pipe.program("reference_pass"), params, chain, contexts, timesteps)
    for _ in range(args.repeats):
        reference = reference_program.run()
    batches, per_batch = reference_batches(args.steps * contexts.shape[0], args.reference_batch_size)
    reference_evals = batches * per_batch
    print(f"inversion: compile {inversion.compile_seconds:.1f} s, run {inversion.seconds:.3f} s")
    print(
        f"reference pass: compile {reference_program.compile_seconds:.1f} s, run {reference_program.seconds:.3f} s "
        f"({reference_evals} UNet evaluations in batches of <= {args.reference_batch_size}); "
        f"features {tree_gib(reference):.3f} GiB",
        flush=True,
    )

    settings = RivalConfig(guidance_scale=args.guidance).as_arrays()
    region = jnp.ones((pipe.latent_size, pipe.latent_size), bool)
    rows, memory = [], []
    for count in args.counts:
        noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (count, 4, pipe.latent_size, pipe.latent_size)))
        start = jax.device_put(pad_to(noise, count), batch_sharding(pipe.mesh))
        plain_args = (params, schedule, start, texts, timesteps)
        plains = [
            Program(functools.partial(plain_generate, unet, kernel, guidance=args.guidance), *plain_args)
            for kernel in (None, args.attention)
        ]
        generation_args = (params, schedule, reference, chain, start, texts, region, settings, timesteps)
        generation = Program(pipe.program("generate"), *generation_args)
        for _ in range(args.repeats):
            for program in (*plains, generation):
                program.run()
        rival_seconds = inversion.seconds + reference_program.seconds + generation.seconds
        plain_seconds = [program.seconds for program in plains]
        rows.append(
            (
                count,
                rival_seconds / plain_seconds[0],
                rival_seconds / plain_seconds[1],
                (args.steps + reference_evals + 2 * args.steps * count) / count,
                2 * args.steps,
                rival_seconds / count,
                generation.seconds,
                *plain_seconds,
                generation.compile_seconds,
                plains[0].compile_seconds,
            )
        )
        memory.append((count, generation.gib, plains[0].gib))
        print(f"N={count}: ratio {rows[-1][1]:.3f}, like-for-like {rows[-1][2]:.3f}", flush=True)

    print()
    header = ("N", "ratio", "ratio*", "UNet/var", "UNet/plain", "s/var", "gen s", "plain s", "plain* s")
    print(table((*header, "gen compile", "plain compile"), rows))
    print("\nratio = (inversion + reference pass + generation of N) / N  /  (plain batch of N / N)")
    print("plain: diffusers' UNet as is; plain*: its self-attention layers computed by the kernel of RIVAL's")
    print(f"injected layers ({args.attention}), so ratio* is the cost of the method alone")
    print(f"\nprogram memory (XLA buffer assignment: arguments + outputs + temporaries), device {device.device_kind}:")
    print(f"inversion {inversion.gib:.2f} GiB; reference pass {reference_program.gib:.2f} GiB")
    print(table(("N", "gen GiB", "plain GiB"), memory))
    print(f"peak device memory: {peak_memory()}")

    if args.stages:
        print(f"\nN={count}, generation with every step in one attention stage (AdaIN off) / plain*:")
        for stage, config in STAGES.items():
            generation.seconds = float("inf")
            for _ in range(args.repeats):
                generation.run(*generation_args[:7], config.as_arrays(), timesteps)
            print(f"{stage:>12} | {generation.seconds / plains[1].seconds:.3f}")


if __name__ == "__main__":
    try:
        main()
    except RivalError as error:
        sys.exit(f"benchmark: error: {error}")
