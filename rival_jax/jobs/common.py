"""What every job does around the pipeline: runtime, model, exemplars, logging, interruption.

A job that loads a model receives its job options (`jobs.options`), the run options (`RunOptions`)
and per-exemplar settings (`jobs.settings`), already layered by the CLI or a config file.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from rival_jax import images
from rival_jax.errors import RivalError
from rival_jax.jobs.options import CommonOptions, JobOptions
from rival_jax.options import RunOptions


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job, saying what was finished (kept: rerunning the same command resumes from it)."""

    def __init__(self, finished: str) -> None:
        super().__init__(finished)
        self.finished = finished


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(message: object) -> str:
    """A message on one line: line breaks that came in with file names or values are shown escaped."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def prepare_runtime(job: JobOptions) -> None:
    """Process-wide settings: the persistent compilation cache unless switched off."""
    from rival_jax.runtime import enable_compilation_cache

    if job.compile_cache:
        enable_compilation_cache(None if job.compile_cache is True else job.compile_cache)


def load_pipeline(job: JobOptions, options: RunOptions) -> Any:
    """The job's `RivalPipeline`, with a line about the model and devices on stderr."""
    from rival_jax.pipeline import RandomWeightsWarning, RivalPipeline, random_weights_notice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # said below, in the job's words
        pipe = RivalPipeline.from_pretrained(job.model, options=options, cache_dir=job.cache_dir or True)
    if pipe.random_weights:
        log(f"model: {random_weights_notice(job.model, pipe.models.family)} (use --model for a real checkpoint)")
    sources = ", ".join(f"{k}: {v}" for k, v in pipe.models.sources.items())
    devices = f"{pipe.mesh.size} x {pipe.mesh.devices.flat[0].platform}"
    log(f"model: {pipe.models.path} ({pipe.models.family}; {sources}); devices: {devices}")
    return pipe


def show_progress(job: CommonOptions) -> bool:
    """The job's --progress/--no-progress, else whether stderr is a terminal."""
    return sys.stderr.isatty() if job.progress is None else job.progress


def check_control(options: RunOptions, settings: dict[str, Any]) -> None:
    """ControlNets and their maps must come together, in `control_entries`' shape (before anything loads)."""
    control_entries(settings["control_image"], len(options.controlnet), settings["num_variations"])


def control_entries(maps: Any, controlnets: int, variations: int) -> list | None:
    """`control_image` as one entry per ControlNet, each one map for every variation or a list of one per variation.

    The shape settings and manifest rows give: with one ControlNet, a map or a list of `variations`
    maps (one per variation, in order); with K ControlNets, a list of K entries (a single entry is
    used by all K), each a map or a list of `variations` maps. A list of one map is that map. A map is
    a path, an image or "canny" (the exemplar's edges: one map for every variation). Anything else is
    one `RivalError` line naming the fix.

    Args:
        maps: the `control_image` setting (None: no map).
        controlnets: how many ControlNets are loaded (`--controlnet`).
        variations: the row's number of variations.

    >>> control_entries(["e0.png", "e1.png"], 1, 2), control_entries(["canny", ["d0.png", "d1.png"]], 2, 2)
    ([['e0.png', 'e1.png']], ['canny', ['d0.png', 'd1.png']])
    """
    if maps is None or maps == []:
        if controlnets:
            raise RivalError(
                "--controlnet needs a map: add --control-image FILE (at the exemplar's size) or --control canny"
            )
        return None
    if not controlnets:
        raise RivalError("a control image needs a ControlNet: add --controlnet PATH_OR_HUB_ID")
    entries = maps if isinstance(maps, list) else [maps]
    if controlnets == 1 and len(entries) > 1 and not any(isinstance(entry, list) for entry in entries):
        entries = [entries]  # one ControlNet: a flat list is one map per variation
    entries = entries * controlnets if len(entries) == 1 else entries
    if len(entries) != controlnets:
        raise RivalError(
            f"{len(entries)} control images for {controlnets} ControlNets: give one entry per --controlnet, "
            f"each a map or a list of {variations} maps (one per variation)"
        )
    return [_entry(entry, k, controlnets, variations) for k, entry in enumerate(entries)]


def _entry(entry: Any, k: int, controlnets: int, variations: int) -> Any:
    """One ControlNet's entry: a map, or a list of one map per variation."""
    if not isinstance(entry, list):
        return entry
    whose = f" (ControlNet {k + 1} of {controlnets})" if controlnets > 1 else ""
    if any(isinstance(m, list) for m in entry):
        raise RivalError(
            f"control_image nests a list in a list of maps{whose}: give each ControlNet one map or one flat list "
            f"of {variations} maps (one per variation)"
        )
    if len(entry) not in (1, variations):
        raise RivalError(
            f"control_image has {len(entry)} maps for {variations} variations{whose}: "
            f"give one map for all variations or a list of {variations} maps (one per variation)"
        )
    if any(isinstance(m, str) and m == "canny" for m in entry) and len(entry) > 1:
        raise RivalError(
            f'control_image lists "canny" among maps per variation{whose}: the exemplar\'s edges are one map '
            'for every variation: give "canny" alone as its entry'
        )
    return entry[0] if len(entry) == 1 else entry


def read_exemplar(
    path: str | Path, mask: str | Path | None, control_images: Any = None, options: RunOptions | None = None
) -> tuple[Image.Image, Image.Image | None, list | None]:
    """An exemplar as RGB, its optional mask and ControlNet maps (files at the exemplar's size, or "canny").

    Every file is opened and checked here, before a model is loaded, the exemplar's size against
    `images.check_exemplar_size` under `options`' geometry; errors are one line.
    """
    exemplar = images.as_rgb(images.open_image(path), f"exemplar {path}")
    return (exemplar, *read_extras(exemplar, mask, control_images, options or RunOptions(), f"exemplar {path}"))


def read_extras(
    exemplar: Image.Image, mask: str | Path | None, control_images: Any, options: RunOptions, name: str = "exemplar"
) -> tuple[Image.Image | None, list | None]:
    """An opened exemplar's size checked (`images.check_exemplar_size`), its mask and ControlNet maps opened.

    Maps are files at the exemplar's size or "canny", in `control_images`' shape (one entry, a list, or
    lists of maps per variation inside it); errors are one line.

    >>> mask, maps = read_extras(exemplar, "mask.png", ["edges.png"], RunOptions())
    """
    images.check_exemplar_size(exemplar.size, options.size, options.square_crop, name)

    def opened(entry: Any) -> Any:
        if isinstance(entry, list):
            return [opened(m) for m in entry]
        if isinstance(entry, str) and entry == "canny":
            return entry
        entry = images.open_image(entry, "control image")
        if entry.size != exemplar.size:
            raise RivalError(
                f"control image {entry.filename or ''} is {entry.size[0]}x{entry.size[1]} but the exemplar "
                f"is {exemplar.size[0]}x{exemplar.size[1]}: make the map at the exemplar's size"
            )
        return entry

    maps = None
    if control_images is not None:
        maps = opened(control_images if isinstance(control_images, list) else [control_images])
    return images.open_mask(mask, exemplar.size) if mask else None, maps
