"""The README's plan table: full architectures compiled ahead of time for TPU targets, both reference modes.

Each (model, target) gets one `Planner`, so inversion, VAE decode and plain SD compile once and serve both
reference modes. Keep's reference pass, when it alone does not fit, is measured in smaller UNet batches,
as `rival-jax plan` tries them (the mode cell names the batch). A Markdown row is appended to `--out` as
each (model, target, mode) finishes: a long run that is stopped keeps what it measured. Compiling one full
program takes minutes to an hour on a small CPU; run it once, in the background:

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python scripts/plan_table.py --out plan-table.md \\
        --runs sd1:512:16 sd2:768:8 sdxl:1024:8 --targets v5e:1x1 v5e:2x4 v6e:2x4

Attention is `xla` unless `--attention pallas` (XLA counts the attention's FLOPs; a Pallas kernel's are
invisible to it, so pallas rows give memory only, their mode cell names the kernel), steps 50, a prompt
(two guidance contexts), one exemplar, bfloat16. Columns are per device of the target's first host.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax.numpy as jnp

from rival_jax.options import resolve_reference_batch
from rival_jax.tpu.plan import MODES, Outcome, Planner, Work
from rival_jax.tpu.report import variations_per_chip_hour
from rival_jax.tpu.shapes import REFERENCE_LABEL, model_shapes
from rival_jax.tpu.targets import GIB, resolve_target

FAMILIES = ("sd1", "sd2", "sdxl")
DEFAULT_BATCH = resolve_reference_batch(None, "tpu")
HEADER = (
    "| model | target | mode | N | inversion GiB | reference GiB | generation GiB | decode GiB | peak of HBM "
    "| s / variation | variations / chip-hour | RIVAL / plain SD | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(
    label: str, target: str, outcome: Outcome, chips: float, attention: str = "xla", batch: int = DEFAULT_BATCH
) -> str:
    """One Markdown row: memory per program, the peak against the device's memory, roofline figures (xla
    attention only: the FLOPs of any other kernel are not counted); `batch`: keep's reference batch per
    device in a default run (the mode cell names any other)."""
    by_label = {m.label.split(" (")[0]: m for m in outcome.measurements}

    def gib(name: str) -> str:
        if name not in by_label:
            return "-"
        m = by_label[name]
        return f"out of memory ({m.temporaries / GIB:.2f} temp.)" if m.out_of_memory else f"{m.total / GIB:.2f}"

    if any(m.out_of_memory for m in outcome.measurements):
        peak = "over 100%"
    else:
        largest = max(m.total for m in outcome.measurements) / outcome.memory
        peak = f"{largest:.0%}" + ("" if outcome.fits else " (does not fit)")
    rival, plain = outcome.seconds_per_variation, outcome.plain_seconds_per_image
    estimates = (
        ("-",) * 3
        if rival is None or attention != "xla"
        else (f"{rival:.3g}", f"{variations_per_chip_hour(rival, chips):,.0f}", f"{rival / plain:.2f}")
    )
    compile_s = sum(m.compile_s for m in outcome.measurements)
    cells = (
        label,
        target,
        _mode(outcome, attention, batch),
        str(outcome.variations),
        gib("inversion"),
        gib(REFERENCE_LABEL),
        gib("generation"),
        gib("VAE decode"),
        peak,
        *estimates,
        f"{compile_s:,.0f}",
    )
    return "| " + " | ".join(cells) + " |"


def _mode(outcome: Outcome, attention: str, batch: int) -> str:
    """The mode, and what differs from a default run: keep's reference batch, the attention kernel."""
    notes = [f"reference batch {outcome.reference_batch}"] if outcome.reference_batch not in (None, batch) else []
    notes += [attention] if attention != "xla" else []
    return f"{outcome.mode} ({', '.join(notes)})" if notes else outcome.mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["sd1:512:16"], help="family (or built-in model):resolution:N")
    parser.add_argument("--targets", nargs="+", default=["v5e:1x1"], help="TPU targets, in order")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--attention", default="xla", choices=("xla", "pallas"), help="the injected layers' kernel")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file the rows are appended to")
    args = parser.parse_args()
    if not args.out.exists():
        args.out.write_text(HEADER + "\n")
    for run in args.runs:
        model, resolution, variations = run.split(":")
        family = model if model in FAMILIES else None
        shapes = model_shapes(None if family else model, family, jnp.bfloat16, int(resolution), False)
        for name in args.targets:
            target = resolve_target(name)
            planner = Planner(shapes, target, args.attention, DEFAULT_BATCH, target.device_memory(), print)
            for mode in args.modes:
                start, work = time.monotonic(), Work(1, int(variations), 50, 2, mode)
                outcome = planner.outcome_in_batches(work, mode)
                label = f"{shapes.label} {resolution}"
                line = row(label, name, outcome, target.local_chips, args.attention, planner.reference_batch(work))
                with args.out.open("a") as table:
                    table.write(line + "\n")
                print(line, f"({time.monotonic() - start:.0f} s wall)", flush=True)


if __name__ == "__main__":
    main()
