"""An augmentation job's rows in flight together: compatible exemplars inverted, passed and generated as one batch.

Rows whose exemplars come out the same size, with the same steps, prompt contexts (inversion
prompt empty or not) and method settings, are gathered `RunOptions.exemplar_batch` at a time
(default: one per local device) and run through `RivalPipeline.invert_many` / `generate_many`; other
rows (ControlNet maps, or an exemplar batch of 1) run one at a time. Every image is still variation i of its row's
seed, whatever it was batched with. If a batch fails, its rows are retried one at a time, so only a
bad row is reported as failed. With `whole_rows` (the job's CLIP filters) a row's images are
held until all of its variations are made and saved together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from PIL import Image

from rival_jax.errors import RivalError
from rival_jax.jobs.common import control_entries, read_extras
from rival_jax.jobs.settings import generation_arguments
from rival_jax.pipeline import ExemplarGroup, Request
from rival_jax.pipeline.inputs import context_count


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """A row as its process read it: the source's row (`data.sources.Row`), its RGB image and its job key."""

    row: Any
    image: Image.Image
    key: str


# save(exemplar, [(variation index, image), ...]); report(row id, "skipped" | "failed", message)
Save = Callable[[Exemplar, list[tuple[int, Image.Image]]], None]
Report = Callable[[str, str, str], None]


@dataclasses.dataclass
class Pending:
    """A row read and waiting for its batch: the variations still to make and the images made so far."""

    exemplar: Exemplar
    indices: list[int]
    mask: Image.Image | None
    control_maps: list | None
    whole_row: bool
    made: dict[int, Image.Image] = dataclasses.field(default_factory=dict)

    @property
    def row(self) -> Any:
        return self.exemplar.row

    def add(self, index: int, image: Image.Image, save: Save) -> None:
        """Keep variation `index`; save it now, or the whole row once its last variation is made."""
        self.made[index] = image
        if not self.whole_row:
            save(self.exemplar, [(index, image)])
        elif len(self.made) == len(self.indices):
            save(self.exemplar, sorted(self.made.items()))


def read_controls(pipe: Any, exemplar: Image.Image, settings: dict[str, Any]) -> tuple[Image.Image | None, list | None]:
    """A row's mask and its maps, one entry per ControlNet (`jobs.common.control_entries`), opened and checked."""
    maps = control_entries(settings["control_image"], len(pipe.controlnets), settings["num_variations"])
    return read_extras(exemplar, settings["mask"], maps, pipe.options)


def maps_of(entries: list | None, indices: list[int]) -> list | None:
    """The maps of variations `indices`: an entry's list of maps per variation narrowed to them, in order."""
    if entries is None:
        return None
    return [[entry[i] for i in indices] if isinstance(entry, list) else entry for entry in entries]


def exemplar_batch(pipe: Any) -> int:
    """How many exemplars a job batches: the run option, or one per local device."""
    return pipe.options.exemplar_batch or pipe.mesh.size


def group_key(pipe: Any, pending: Pending) -> tuple | None:
    """Rows with equal keys can share a batch; None runs the row on its own (ControlNet maps)."""
    if pending.control_maps is not None or pipe.controlnets:
        return None
    settings = pending.row.settings
    contexts = context_count(settings["inversion_prompt"])
    return (pipe.image_size(pending.exemplar.image.size), settings["steps"], contexts, settings["config"])


def run_rows(
    pipe: Any,
    work: Iterable[tuple[Exemplar, list[int]]],
    batch_size: int,
    save: Save,
    report: Report,
    whole_rows: bool = False,
) -> None:
    """Generate `work` ((exemplar, variation indices), read lazily, in order) in batches of compatible rows.

    Rows whose mask, maps or size are unusable are reported "skipped" (their variations count as
    handled); rows whose generation raises are reported "failed" and the job goes on. With
    `whole_rows` each row is saved once, all its variations together.
    """
    count = exemplar_batch(pipe)
    waiting: dict[tuple, list[Pending]] = {}
    for exemplar, indices in work:
        try:
            mask, control_maps = read_controls(pipe, exemplar.image, exemplar.row.settings)
        except RivalError as error:
            report(exemplar.row.id, "skipped", str(error))
            continue
        pending = Pending(exemplar, indices, mask, control_maps, whole_rows)
        key = group_key(pipe, pending) if count > 1 else None
        if key is None:
            _run_alone(pipe, pending, batch_size, save, report)
            continue
        waiting.setdefault(key, []).append(pending)
        if len(waiting[key]) == count:
            _run_group(pipe, waiting.pop(key), batch_size, count, save, report)
    for group in waiting.values():
        _run_group(pipe, group, batch_size, count, save, report)


def _run_alone(pipe: Any, pending: Pending, batch_size: int, save: Save, report: Report) -> None:
    try:
        settings = pending.row.settings
        chain = pipe.invert(pending.exemplar.image, settings["inversion_prompt"], settings["steps"])
        todo = [index for index in pending.indices if index not in pending.made]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            arguments = generation_arguments({**settings, "control_image": maps_of(pending.control_maps, chunk)})
            out = pipe.generate(chain, **arguments, mask=pending.mask, variation_indices=chunk, batch_size=batch_size)
            for index, image in zip(chunk, out.images, strict=True):
                pending.add(index, image, save)
    except Exception as error:  # one bad exemplar must not stop a long job
        report(pending.row.id, "failed", f"{type(error).__name__}: {error}".splitlines()[0])


def _run_group(pipe: Any, group: list[Pending], batch_size: int, count: int, save: Save, report: Report) -> None:
    """One exemplar batch; on any error its rows are retried alone, each keeping what it made."""
    try:
        settings = [pending.row.settings for pending in group]
        prompts = [s["inversion_prompt"] for s in settings]
        chains = pipe.invert_many([pending.exemplar.image for pending in group], prompts, settings[0]["steps"])
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
                    pending.add(index, image, save)
    except Exception:  # retried row by row below, so only a bad row fails
        for pending in group:
            _run_alone(pipe, pending, batch_size, save, report)
