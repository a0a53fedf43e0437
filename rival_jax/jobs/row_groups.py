"""An augmentation job's rows in flight together: compatible exemplars inverted, passed and generated as one batch.

Rows whose exemplars come out the same size, with the same steps, prompt contexts (inversion
prompt empty or not) and method settings, are gathered `RunOptions.exemplar_batch` at a time
(default: one per local device) and run through `RivalPipeline.invert_many` / `generate_many`; other
rows (ControlNet maps, or an exemplar batch of 1) run one at a time. Every image is still variation i of its row's
seed, whatever it was batched with. If a batch fails, its rows are retried one at a time, so only a
bad row is reported as failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from PIL import Image

from rival_jax.errors import RivalError
from rival_jax.jobs.common import read_exemplar
from rival_jax.jobs.settings import generation_arguments
from rival_jax.pipeline import ExemplarGroup, Request
from rival_jax.pipeline.inputs import context_count

# save(row, variation index, image); report(row number, "skipped" | "failed", message)
Save = Callable[[Any, int, Image.Image], None]
Report = Callable[[int, str, str], None]


@dataclasses.dataclass
class Pending:
    """A row read and waiting for its batch: the variations still to make and what has been saved."""

    row: Any
    indices: list[int]
    exemplar: Image.Image
    mask: Image.Image | None
    control_maps: list | None
    done: set[int] = dataclasses.field(default_factory=set)


def exemplar_batch(pipe: Any) -> int:
    """How many exemplars a job batches: the run option, or one per local device."""
    return pipe.options.exemplar_batch or pipe.mesh.size


def group_key(pipe: Any, pending: Pending) -> tuple | None:
    """Rows with equal keys can share a batch; None runs the row on its own (ControlNet maps)."""
    if pending.control_maps is not None or pipe.controlnets:
        return None
    settings = pending.row.settings
    contexts = context_count(settings["inversion_prompt"])
    return (pipe.image_size(pending.exemplar.size), settings["steps"], contexts, settings["config"])


def run_rows(pipe: Any, work: list[tuple[Any, list[int]]], batch_size: int, save: Save, report: Report) -> None:
    """Generate `work` ((row, variation indices) in order) in batches of compatible rows.

    Unreadable rows are reported "skipped" (their variations count as handled); rows whose
    generation raises are reported "failed" and the job goes on.
    """
    count = exemplar_batch(pipe)
    waiting: dict[tuple, list[Pending]] = {}
    for row, indices in work:
        try:
            settings = row.settings
            exemplar, mask, control_maps = read_exemplar(
                row.image, settings["mask"], settings["control_image"], pipe.options
            )
        except RivalError as error:
            report(row.number, "skipped", str(error))
            continue
        pending = Pending(row, indices, exemplar, mask, control_maps)
        key = group_key(pipe, pending) if count > 1 else None
        if key is None:
            _run_alone(pipe, pending, batch_size, save, report)
            continue
        waiting.setdefault(key, []).append(pending)
        if len(waiting[key]) == count:
            _run_group(pipe, waiting.pop(key), batch_size, count, save, report)
    for group in waiting.values():
        _run_group(pipe, group, batch_size, count, save, report)


def _save(pending: Pending, save: Save, index: int, image: Image.Image) -> None:
    save(pending.row, index, image)
    pending.done.add(index)


def _run_alone(pipe: Any, pending: Pending, batch_size: int, save: Save, report: Report) -> None:
    try:
        settings = {**pending.row.settings, "control_image": pending.control_maps}
        chain = pipe.invert(pending.exemplar, settings["inversion_prompt"], settings["steps"])
        todo = [index for index in pending.indices if index not in pending.done]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            arguments = generation_arguments(settings)
            out = pipe.generate(chain, **arguments, mask=pending.mask, variation_indices=chunk, batch_size=batch_size)
            for index, image in zip(chunk, out.images, strict=True):
                _save(pending, save, index, image)
    except Exception as error:  # one bad exemplar must not stop a long job
        report(pending.row.number, "failed", f"{type(error).__name__}: {error}".splitlines()[0])


def _run_group(pipe: Any, group: list[Pending], batch_size: int, count: int, save: Save, report: Report) -> None:
    """One exemplar batch; on any error its rows are retried alone, each keeping what it saved."""
    try:
        settings = [pending.row.settings for pending in group]
        prompts = [s["inversion_prompt"] for s in settings]
        chains = pipe.invert_many([pending.exemplar for pending in group], prompts, settings[0]["steps"])
        exemplars = ExemplarGroup(chains)
        chunks = max(-(-len(pending.indices) // batch_size) for pending in group)
        for chunk in range(chunks):
            requests = [
                Request(
                    pending.indices[chunk * batch_size : (chunk + 1) * batch_size],
                    s["seed"],
                    s["prompt"],
                    s["negative_prompt"],
                    pending.mask,
                )
                for pending, s in zip(group, settings, strict=True)
            ]
            config = settings[0]["config"]
            outs = pipe.generate_many(exemplars, requests, config, batch_size=batch_size, exemplar_count=count)
            for pending, request, out in zip(group, requests, outs, strict=True):
                for index, image in zip(request.variation_indices, out.images, strict=True):
                    _save(pending, save, index, image)
    except Exception:  # retried row by row below, so only a bad row fails
        for pending in group:
            _run_alone(pipe, pending, batch_size, save, report)
