"""Per-device cost of RIVAL against plain Stable Diffusion on D devices, without an accelerator.

Every program is lowered on shapes alone (no weights are made) for D host devices and compiled;
XLA's cost analysis of the compiled, partitioned program gives FLOPs and bytes accessed per device.
XLA counts a loop body once, so each program's figure is multiplied by its trip count: the
inversion and generation by the steps T, the reference pass by its UNet batches per device (the
few operations outside the loop are multiplied with it: an overestimate well under 1%). A
`lax.switch`/`lax.cond` counts its most expensive branch: every generation step is costed as a
fusion step with AdaIN (an upper bound for RIVAL). The injected layers' query blocks are set to one
block (the same FLOPs; their `lax.map` would otherwise be counted once).

RIVAL's critical path is the busiest device's inversion + reference pass + generation; plain SD
(CFG + DDIM, diffusers' UNet as it is) generates the same images on the same devices.

    python scripts/cost_analysis.py --devices 8 --family sd1 --resolution 256 --steps 3
    python scripts/cost_analysis.py --devices 8 --tiny --resolution 64 --steps 2
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="host devices to partition for")
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture instead of the full one")
    parser.add_argument("--resolution", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--contexts", type=int, choices=(1, 2), default=2, help="2: exemplar prompt, 1: null")
    parser.add_argument("--counts", default="8,16,64", help="variations of one exemplar, comma-separated")
    parser.add_argument("--exemplars", type=int, default=8, help="exemplars of the augment batch")
    parser.add_argument("--variations", type=int, default=16, help="variations per exemplar of the augment batch")
    parser.add_argument("--reference-batch-size", type=int, default=8)
    return parser.parse_args(argv)


ARGS = parse_arguments() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"

import dataclasses  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rival_jax.config import RivalConfig  # noqa: E402
from rival_jax.core import attention, parallel  # noqa: E402
from rival_jax.core.ddim import DDIMSchedule  # noqa: E402
from rival_jax.core.reference import reference_batches  # noqa: E402
from rival_jax.core.sampler import GenerationInputs  # noqa: E402
from rival_jax.core.unet import Conditioning  # noqa: E402
from rival_jax.models.architectures import FULL, TINY  # noqa: E402
from rival_jax.models.checkpoints import params_layout  # noqa: E402
from rival_jax.pipeline import programs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import table  # noqa: E402


class Costs:
    """The UNet, shapes and compiled-program costs of one architecture on the local devices."""

    def __init__(self, args: argparse.Namespace) -> None:
        from diffusers import FlaxUNet2DConditionModel

        arch = (TINY if args.tiny else FULL)[args.family]
        self.unet = FlaxUNet2DConditionModel(**arch.unet, dtype=jnp.float32)
        self.params = params_layout(self.unet)
        self.schedule = DDIMSchedule.from_scheduler_config(arch.scheduler)
        self.steps, self.contexts, self.batch = args.steps, args.contexts, args.reference_batch_size
        self.timesteps = jnp.asarray(self.schedule.timesteps(args.steps))
        side = args.resolution // 2 ** (len(arch.vae["block_out_channels"]) - 1)
        self.latent = (4, side, side)
        self.text_dim = self.unet.config.cross_attention_dim
        self.mesh = parallel.local_mesh()
        modules = programs.Modules(self.unet, None, self.schedule, jnp.float32)
        self.statics = programs.Statics(modules, self.mesh, reference_batch_size=self.batch)
        self.xl = self.unet.config.addition_embed_type == "text_time"
        attention.QUERY_BLOCK = 1 << 30  # one query block: the same FLOPs, no loop counted once

    def cond(self, *leading: int) -> Conditioning:
        text = jax.ShapeDtypeStruct((*leading, 77, self.text_dim), jnp.float32)
        if not self.xl:
            return Conditioning(text)
        pooled = self.unet.config.projection_class_embeddings_input_dim - 6 * self.unet.config.addition_time_embed_dim
        added = {
            "text_embeds": jax.ShapeDtypeStruct((*leading, pooled), jnp.float32),
            "time_ids": jax.ShapeDtypeStruct((*leading, 6), jnp.float32),
        }
        return Conditioning(text, added)

    def latents(self, *leading: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((*leading, *self.latent), jnp.float32)

    def measure(self, function: Any, inputs: Any, **statics: Any) -> tuple[float, float]:
        """(FLOPs, bytes accessed) per device of one pass of program `function` on `inputs`, compiled."""
        program = programs.Program(function, dataclasses.replace(self.statics, **statics))(False)
        analysis = jax.jit(program).lower(self.params, inputs).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return float(analysis["flops"]), float(analysis["bytes accessed"])

    def inversion(self, exemplars: int) -> tuple[float, float]:
        used, per_device = parallel.spread(exemplars, self.mesh.size)
        inputs = programs.InversionInputs(self.latents(used * per_device), self.cond(used * per_device), self.timesteps)
        flops, bytes_ = self.measure(programs.inversion, inputs, mesh=parallel.sub_mesh(self.mesh, used))
        return flops * self.steps, bytes_ * self.steps

    def reference(self, exemplars: int) -> tuple[float, float]:
        per_device = parallel.spread(exemplars * self.steps * self.contexts, self.mesh.size)[1]
        batches = reference_batches(per_device, self.batch)[0]
        inputs = programs.ReferenceInputs(
            self.latents(exemplars, self.steps + 1), self.cond(exemplars * self.contexts), self.timesteps
        )
        flops, bytes_ = self.measure(programs.reference, inputs)
        return flops * batches, bytes_ * batches

    def features(self, exemplars: int) -> Any:
        program = programs.Program(programs.reference, self.statics)(False)
        inputs = programs.ReferenceInputs(
            self.latents(exemplars, self.steps + 1), self.cond(exemplars * self.contexts), self.timesteps
        )
        return jax.eval_shape(program, self.params, inputs)

    def generation(self, exemplars: int, variations: int) -> tuple[float, float]:
        """E exemplars' variations on their `exemplar_mesh` (one exemplar: one row)."""
        mesh = parallel.exemplar_mesh(self.mesh, exemplars, variations)
        rows, columns = mesh.devices.shape
        padded = parallel.padded_length(exemplars, rows)
        inputs = GenerationInputs(
            start=self.latents(padded, parallel.padded_length(variations, columns)),
            chain=self.latents(padded, self.steps + 1),
            conditioning=self.cond(padded, 2),
            contexts=self.cond(padded, self.contexts),
            reference=self.features(padded),
            region=jax.ShapeDtypeStruct((padded, *self.latent[1:]), jnp.bool_),
            settings=RivalConfig().as_arrays(),
            timesteps=self.timesteps,
        )
        flops, bytes_ = self.measure(programs.generation, inputs, mesh=mesh)
        return flops * self.steps, bytes_ * self.steps

    def plain(self, images: int) -> tuple[float, float]:
        start = self.latents(parallel.padded_length(images, self.mesh.size))
        inputs = programs.PlainInputs(start, self.cond(2), self.timesteps, jnp.float32(7.0))
        flops, bytes_ = self.measure(programs.plain, inputs)
        return flops * self.steps, bytes_ * self.steps


def main(args: argparse.Namespace) -> None:
    costs = Costs(args)
    kind = "tiny" if args.tiny else "full"
    print(f"{kind} {args.family} architecture, {args.resolution}x{args.resolution}, {args.steps} steps, ", end="")
    print(f"C = {args.contexts}, {costs.mesh.size} x {jax.devices()[0].platform} devices; per device, GFLOP / GB")
    cases = [(1, int(n)) for n in args.counts.split(",")] + [(args.exemplars, args.variations)]
    rows = []
    for exemplars, variations in cases:
        inversion, reference = costs.inversion(exemplars), costs.reference(exemplars)
        generation = costs.generation(exemplars, variations)
        plain = costs.plain(exemplars * variations)
        rival = [inversion[k] + reference[k] + generation[k] for k in (0, 1)]
        rows.append(
            (
                exemplars,
                variations,
                inversion[0] / 1e9,
                reference[0] / 1e9,
                generation[0] / 1e9,
                plain[0] / 1e9,
                rival[0] / plain[0],
                rival[1] / plain[1],
                (inversion[0] + plain[0]) / plain[0],
            )
        )
        print(
            f"E={exemplars} x N={variations}: FLOP ratio {rows[-1][6]:.3f}, bytes ratio {rows[-1][7]:.3f}", flush=True
        )
    print()
    header = ("exemplars", "N each", "inv GF", "ref GF", "gen GF", "plain GF", "ratio", "bytes ratio", "inv floor")
    print(table(header, rows))
    print("\nratio = busiest device's (inversion + reference pass + generation) / plain SD's, FLOPs (bytes: the same")
    print("for bytes accessed); inv floor = (plain + the batch-1 inversion) / plain: no layout goes below it")


if __name__ == "__main__":
    main(ARGS)
