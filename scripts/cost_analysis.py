"""Per-device cost of RIVAL against plain Stable Diffusion on D host devices, without an accelerator.

A thin caller of the `plan` command's library (`rival_jax.tpu.plan`, target `cpu:D`): every
program is built from shapes alone (no weights are made) as a run builds it, compiled for D host
devices, and XLA's cost analysis gives FLOPs and bytes accessed per device, loop trips multiplied
in. Here the injected layers' query blocks are set to one block (the same FLOPs; their `lax.map`
would otherwise be counted once), so the figures are the programs' FLOPs, not their memory.

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
    parser.add_argument(
        "--reference-batch-size",
        type=int,
        help="keep's reference pass UNet batch (default: what `generate` picks on an accelerator)",
    )
    return parser.parse_args(argv)


ARGS = parse_arguments() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"

import jax.numpy as jnp  # noqa: E402

from rival_jax.core import attention  # noqa: E402
from rival_jax.options import resolve_reference_batch  # noqa: E402
from rival_jax.tpu.plan import Planner, Work  # noqa: E402
from rival_jax.tpu.shapes import model_shapes  # noqa: E402
from rival_jax.tpu.targets import GIB, resolve_target  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import table  # noqa: E402


def main(args: argparse.Namespace) -> None:
    attention.QUERY_BLOCK = 1 << 30  # one query block: the same FLOPs, no loop counted once
    shapes = model_shapes(
        "tiny-" + args.family if args.tiny else None,
        None if args.tiny else args.family,
        jnp.float32,
        args.resolution,
        True,
    )
    batch = resolve_reference_batch(args.reference_batch_size, "tpu")
    planner = Planner(shapes, resolve_target(f"cpu:{args.devices}"), "xla", batch, 1024 * GIB)
    kind = "tiny" if args.tiny else "full"
    print(f"{kind} {args.family} architecture, {args.resolution}x{args.resolution}, {args.steps} steps, ", end="")
    print(f"C = {args.contexts}, {args.devices} x cpu devices; per device, GFLOP / GB")
    cases = [(1, int(n)) for n in args.counts.split(",")] + [(args.exemplars, args.variations)]
    rows = []
    for exemplars, variations in cases:
        outcome = planner.outcome(Work(exemplars, variations, args.steps, args.contexts, "keep"), "keep")
        inversion, reference, generation = outcome.rival
        plain = outcome.plain
        rival = [sum(m.flops for m in outcome.rival), sum(m.bytes_accessed for m in outcome.rival)]
        gigaflops = [m.flops / 1e9 for m in (inversion, reference, generation, plain)]
        ratios = (
            rival[0] / plain.flops,
            rival[1] / plain.bytes_accessed,
            (inversion.flops + plain.flops) / plain.flops,
        )
        rows.append((exemplars, variations, *gigaflops, *ratios))
        print(f"E={exemplars} x N={variations}: FLOP ratio {ratios[0]:.3f}, bytes ratio {ratios[1]:.3f}", flush=True)
    print()
    header = ("exemplars", "N each", "inv GF", "ref GF", "gen GF", "plain GF", "ratio", "bytes ratio", "inv floor")
    print(table(header, rows))
    print("\nratio = busiest device's (inversion + reference pass + generation) / plain SD's, FLOPs (bytes: the same")
    print("for bytes accessed); inv floor = (plain + the batch-1 inversion) / plain: no layout goes below it")


if __name__ == "__main__":
    main(ARGS)
