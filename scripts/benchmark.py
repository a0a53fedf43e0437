"""Side-by-side cost of RIVAL variations against plain Stable Diffusion images on one device.

For each N it compiles and times, on the same UNet, steps, guidance, resolution and batch:
plain text-to-image (classifier-free guidance, DDIM), and RIVAL's inversion + reference pass +
aligned generation of N variations. It prints time per variation / time per plain image (the
figure we steer by), UNet evaluations per variation, compile times and peak device memory.

    python scripts/benchmark.py                                  # tiny model, CPU-friendly
    python scripts/benchmark.py --sd15-random --resolution 256 --steps 4 --counts 1,4
    python scripts/benchmark.py --sd15-random --resolution 512 --steps 50 --dtype bfloat16   # GPU/TPU
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax import RivalConfig, RivalPipeline
from rival_jax.attention import unet_eps
from rival_jax.cli import bundled_exemplar
from rival_jax.ddim import DDIMSchedule, ddim_step
from rival_jax.parallel import batch_sharding, pad_to
from rival_jax.pipeline import resolve_dtype
from rival_jax.random_models import random_sd15_models


def plain_generate(unet, params, schedule: DDIMSchedule, start, texts, guidance, timesteps):
    """Plain SD text-to-image: CFG + DDIM over the same UNet (what FlaxStableDiffusionPipeline does)."""
    count, stride = start.shape[0], schedule.stride(timesteps.shape[0])
    batch_texts = jnp.repeat(texts, count, axis=0)

    def step(x, t):
        eps = unet_eps(unet, params, jnp.concatenate([x, x]), t, batch_texts)
        eps_uncond, eps_cond = jnp.split(eps, 2)
        guided = eps_uncond + guidance * (eps_cond - eps_uncond)
        return ddim_step(x, guided, schedule.alpha(t), schedule.alpha(t - stride)).astype(x.dtype), None

    return jax.lax.scan(step, start, timesteps)[0]


def compile_and_time(function: Callable, args: tuple, repeats: int) -> tuple[float, float, Any]:
    """(compile seconds, median run seconds, result) of jit(function)(*args)."""
    clock = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    compile_seconds = time.perf_counter() - clock
    runs, result = [], None
    for _ in range(repeats):
        clock = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - clock)
    return compile_seconds, statistics.median(runs), result


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return f"{peak / 2**30:.2f} GiB" if peak else "n/a (backend does not report)"


def tree_gib(tree: Any) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="diffusers SD 1.x folder, hub id, or 'tiny'")
    parser.add_argument("--sd15-random", action="store_true", help="full SD 1.5 architecture with random weights")
    parser.add_argument("--resolution", type=int, help="image size (default: the model's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla", help="injected attention backend")
    parser.add_argument("--counts", default="1,4,16", help="numbers of variations N")
    parser.add_argument("--prompt", default="a photo", help="exemplar prompt (empty = null inversion, one context)")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per program (median)")
    args = parser.parse_args()

    dtype = resolve_dtype(args.dtype)
    if args.sd15_random:
        pipe = RivalPipeline(random_sd15_models(dtype), dtype, args.resolution, args.attention)
    else:
        pipe = RivalPipeline.from_pretrained(
            args.model, dtype=dtype, resolution=args.resolution, attention=args.attention
        )
    device = jax.devices()[0]
    name = "SD 1.5 architecture, random weights" if args.sd15_random else str(pipe.models.path)
    print(f"model: {name}; device: {device.device_kind} ({device.platform}) x {pipe.mesh.size}; dtype {dtype.__name__}")
    print(f"resolution {pipe.resolution}x{pipe.resolution} (latent {pipe.latent_size}), {args.steps} steps")

    unet, params, schedule = pipe.models.unet, pipe.params["unet"], pipe.models.schedule
    timesteps = jnp.asarray(schedule.timesteps(args.steps))
    _, x0 = pipe.encode_image(str(bundled_exemplar()))
    contexts = pipe.encode_prompt([""] if args.prompt == "" else ["", args.prompt])
    texts = pipe.encode_prompt(["", args.prompt])
    invert = pipe.program("invert")
    inv_compile, inv_time, chain = compile_and_time(
        lambda p, x, t, ts: invert(p, schedule, x, t, ts), (params, x0, contexts[-1:], timesteps), args.repeats
    )
    reference_program = pipe.program("reference_pass")
    ref_compile, ref_time, reference = compile_and_time(
        reference_program, (params, chain, contexts, timesteps), args.repeats
    )
    print(f"inversion: compile {inv_compile:.1f} s, run {inv_time:.3f} s")
    print(f"reference pass: compile {ref_compile:.1f} s, run {ref_time:.3f} s; features {tree_gib(reference):.3f} GiB")

    settings = RivalConfig(guidance_scale=args.guidance).as_arrays()
    region = jnp.ones((pipe.latent_size, pipe.latent_size), bool)
    generate = pipe.program("generate")
    plain = functools.partial(plain_generate, unet)
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (count, 4, pipe.latent_size, pipe.latent_size)))
        start = jax.device_put(pad_to(noise, count), batch_sharding(pipe.mesh))
        plain_compile, plain_time, _ = compile_and_time(
            lambda p, s, x, c, ts: plain(p, s, x, c, args.guidance, ts),
            (params, schedule, start, texts, timesteps),
            args.repeats,
        )
        gen_compile, gen_time, _ = compile_and_time(
            generate,
            (params, schedule, reference, chain, start, texts, region, settings, timesteps),
            args.repeats,
        )
        per_variation = (inv_time + ref_time + gen_time) / count
        per_plain = plain_time / count
        unet_per_variation = (args.steps * (1 + contexts.shape[0]) + 2 * args.steps * count) / count
        rows.append(
            (
                count,
                per_variation / per_plain,
                unet_per_variation,
                2 * args.steps,
                per_variation,
                per_plain,
                gen_time,
                plain_time,
                gen_compile,
                plain_compile,
            )
        )
    print()
    header = (
        "N",
        "ratio",
        "UNet/var",
        "UNet/plain",
        "s/var",
        "s/plain",
        "gen s",
        "plain s",
        "gen compile",
        "plain compile",
    )
    print(" | ".join(f"{h:>11}" for h in header))
    for row in rows:
        print(" | ".join(f"{v:>11}" if isinstance(v, int) else f"{v:>11.3f}" for v in row))
    print("\nratio = (inversion + reference pass + generation of N) / N  /  (plain batch of N / N)")
    print(f"peak device memory: {peak_memory()}")


if __name__ == "__main__":
    main()
