"""A plan as text: one table row per program, per device, then the run's cost per variation against plain SD."""

from __future__ import annotations

from rival_jax.tpu.plan import Measurement, Outcome, Plan
from rival_jax.tpu.targets import GIB, Target

COLUMNS = (
    "program",
    "args GiB",
    "temp GiB",
    "out GiB",
    "total GiB",
    "of memory",
    "GFLOP",
    "GB accessed",
    "roofline s",
    "compile s",
)


def target_line(target: Target, memory: int) -> str:
    """The devices a plan is for: chips, hosts, the chip's figures and the memory one device may hold."""
    spec, chip = target.spec, target.spec.chip
    hosts = (
        f"{spec.hosts} hosts, programs on the first's {len(target.local_devices)} devices"
        if spec.hosts > 1
        else "1 host"
    )
    if chip is None:
        return f"target {spec.name}: {spec.chips} host devices, {memory / GIB:.1f} GiB each (host memory)"
    figures = f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM"
    per_device = f", {target.devices_per_chip} devices per chip" if target.devices_per_chip > 1 else ""
    return (
        f"target {spec.name} ({spec.topology}): {spec.chips} x {chip.device_kind}, {hosts}"
        f"{per_device}; {memory / GIB:.1f} GiB per device, {figures} per chip ({chip.source})"
    )


def table(outcome: Outcome) -> list[str]:
    """The outcome's programs, one row each, per device."""
    rows = [COLUMNS] + [_row(m, outcome.memory) for m in outcome.measurements]
    widths = [max(len(row[k]) for row in rows) for k in range(len(COLUMNS))]
    return [
        "  ".join(
            cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def _row(m: Measurement, memory: int) -> tuple[str, ...]:
    if m.out_of_memory:  # the compiler's figure of its temporaries, nothing else
        unknown = ("-",) * 3
        return (m.label, "-", f"{m.temporaries / GIB:.3f}", "-", "-", "out of memory", *unknown, f"{m.compile_s:.1f}")
    roofline = "-" if m.roofline_s is None else f"{m.roofline_s:.3g}"
    return (
        m.label,
        f"{m.arguments / GIB:.3f}",
        f"{m.temporaries / GIB:.3f}",
        f"{m.outputs / GIB:.3f}",
        f"{m.total / GIB:.3f}",
        f"{m.total / memory:.0%}",
        f"{m.flops / 1e9:.4g}",
        f"{m.bytes_accessed / 1e9:.4g}",
        roofline,
        f"{m.compile_s:.1f}",
    )


def summary(outcome: Outcome, chips_per_host: float) -> str:
    """Seconds per variation, variations per chip-hour and the ratio to plain SD (roofline), or why not."""
    batch = f" (reference batch {outcome.reference_batch})" if outcome.reference_batch else ""
    head = (
        f"reference mode {outcome.mode}{batch}, N = {outcome.variations} per exemplar, {outcome.images} images per host"
    )
    rival, plain = outcome.seconds_per_variation, outcome.plain_seconds_per_image
    refused = [m.label for m in outcome.measurements if m.out_of_memory]
    if refused:
        return f"{head}: no estimate, the compiler ran out of device memory for {', '.join(refused)}"
    if rival is None or plain is None:
        return f"{head}: no roofline for host devices (no chip figures)"
    per_hour = variations_per_chip_hour(rival, chips_per_host)
    return (
        f"{head}: est. {rival:.3g} s per variation (roofline), {per_hour:,.0f} variations per chip-hour; "
        f"plain SD {plain:.3g} s per image, RIVAL / plain SD = {rival / plain:.2f}"
    )


def variations_per_chip_hour(seconds_per_variation: float, chips_per_host: float) -> float:
    """Variations one chip makes in an hour when a host's chips make one every `seconds_per_variation`."""
    return 3600 / (seconds_per_variation * chips_per_host)


def verdict(plan: Plan, hosts: int) -> str:
    """One line: what fits, or the program that does not and what would fit instead."""
    asked, fitting = plan.asked, plan.fitting
    if fitting is asked:
        return f"fits: reference mode {asked.mode}, N = {asked.variations}, every program within memory"
    worst = max(asked.measurements, key=lambda m: (m.out_of_memory, m.total / asked.memory))
    if worst.out_of_memory:
        figure = f" (temporaries {worst.temporaries / GIB:.2f} GiB)" if worst.temporaries else ""
        need = f"{worst.label} does not compile within {asked.memory / GIB:.2f} GiB per device{figure}"
    else:
        need = f"{worst.label} needs {worst.total / GIB:.2f} GiB of {asked.memory / GIB:.2f} GiB per device"
    if fitting is None:
        return f"does not fit: {need}; nothing fits, not even N = 1 in reference mode recompute"
    where = " per host" if hosts > 1 else ""
    batch = f" --reference-batch-size {plan.reference_batch_size}" if plan.reference_batch_size else ""
    return (
        f"does not fit: {need}; would fit: --reference-mode {fitting.mode}{batch} with N = {fitting.variations}{where}"
    )
