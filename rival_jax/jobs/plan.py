"""`rival-jax plan`: a run's programs compiled ahead of time for a target (a TPU slice, or cpu:D), from shapes.

Prints per program and per device its memory (arguments, temporaries, outputs, total against the
device's share of HBM), FLOPs and bytes accessed, roofline and compile seconds; then the run's
estimated seconds per variation, variations per chip-hour and ratio to plain SD, and which reference
mode and N fit. On a multi-host slice each host runs its share of the job as `augment` splits it
(`hosts.process_share`); the programs are compiled for the first host's devices.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from rival_jax.errors import RivalError
from rival_jax.jobs.common import log, show_progress
from rival_jax.jobs.hosts import process_share
from rival_jax.jobs.options import PlanOptions
from rival_jax.jobs.settings import merge_settings
from rival_jax.options import RunOptions, auto_attention, resolve_dtype, resolve_reference_batch
from rival_jax.tpu.targets import GIB, parse_target, resolve_target


def run_job(job: PlanOptions, options: RunOptions, row: dict[str, Any]) -> int:
    """Compile and measure the run's programs on `job.target`; print the plan.

    Args:
        job: target, model or family, and an optional per-chip memory (`chip_memory`, GiB).
        options: the run's options (dtype, resolution, attention, reference mode, exemplar batch, ...).
        row: settings as `generate` takes them (`num_variations`, `steps`, `inversion_prompt`, ...).

    Returns:
        0 when every program fits, 1 when one does not (the line says what would fit).

    >>> run_job(PlanOptions(target="v5e:1x1", family="sdxl"), RunOptions(resolution=1024), {"num_variations": 8})
    """
    from rival_jax.pipeline.inputs import context_count
    from rival_jax.tpu import report
    from rival_jax.tpu.plan import Planner, Work
    from rival_jax.tpu.shapes import model_shapes

    settings = merge_settings(row)
    if options.controlnet:
        raise RivalError("plan does not cover ControlNets yet: drop --controlnet to plan the run without them")
    spec = parse_target(job.target)
    platform = spec.chip.platform if spec.chip else "cpu"
    dtype = (jnp.bfloat16 if spec.chip else jnp.float32) if options.dtype == "auto" else resolve_dtype(options.dtype)
    attention = _attention(options.attention, platform, dtype)
    exemplars, variations = host_work(options.exemplar_batch or 1, settings["num_variations"], spec.hosts)
    target = resolve_target(job.target)
    shapes = model_shapes(job.model, job.family, dtype, options.size, options.square_crop)
    memory = target.device_memory(int(job.chip_memory * GIB) if job.chip_memory else None)
    show = show_progress(job)
    planner = Planner(
        shapes,
        target,
        attention,
        resolve_reference_batch(options.reference_batch_size, platform),
        memory,
        lambda label: show and log(f"compiling {label}"),
    )
    contexts = context_count(settings["inversion_prompt"])
    work = Work(exemplars, variations, settings["steps"], contexts, options.reference_mode)
    width, height = shapes.size
    print(
        f"plan: {shapes.label} ({shapes.family}), {width}x{height}, {work.steps} steps, {contexts} context(s), "
        f"{jnp.dtype(dtype).name}, attention {attention}; per host {exemplars} exemplar(s) x {variations} variations"
    )
    print(report.target_line(target, memory))
    plan = planner.plan(work)
    shown = [plan.asked] if plan.fitting in (None, plan.asked) else [plan.asked, plan.fitting]
    for outcome in shown:
        print()
        print("\n".join(report.table(outcome)))
        print(report.summary(outcome, target.local_chips))
    print()
    print(report.verdict(plan, target.spec.hosts))
    return 0 if plan.fitting is plan.asked else 1


def host_work(exemplars: int, variations: int, hosts: int) -> tuple[int, int]:
    """(exemplars, variations per exemplar) of the first host's share of E x N items (`process_share`).

    >>> host_work(1, 16, 4)  # one exemplar's 16 variations on 4 hosts
    (1, 4)
    """
    items = [(e, i) for e in range(exemplars) for i in range(variations)]
    share = process_share(items, 0, hosts)
    if not share or len(process_share(items, hosts - 1, hosts)) == 0:
        raise RivalError(
            f"{exemplars} exemplar(s) x {variations} variations leave hosts idle on {hosts} hosts: "
            f"ask for at least {hosts} variations (-n) or exemplars (--exemplar-batch)"
        )
    per_exemplar: dict[int, int] = {}
    for exemplar, _ in share:
        per_exemplar[exemplar] = per_exemplar.get(exemplar, 0) + 1
    return len(per_exemplar), max(per_exemplar.values())


def _attention(attention: str, platform: str, dtype: Any) -> str:
    """The injected layers' kernel on the target, "auto" as a run there picks it (`options.auto_attention`)."""
    if attention == "auto":
        return auto_attention(platform, dtype)
    if attention == "pallas" and platform != "tpu":
        raise RivalError("attention 'pallas' needs a TPU target: use attention xla (or auto)")
    if attention == "cudnn" and platform != "gpu":
        raise RivalError("attention 'cudnn' needs an NVIDIA GPU target (gpu:h100, ...): use auto, xla or pallas")
    return attention
