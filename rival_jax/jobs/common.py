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
    """ControlNets and their maps must come together, one map per ControlNet (before anything loads)."""
    maps, count = settings["control_image"], len(options.controlnet)
    given = 0 if maps is None else len(maps) if isinstance(maps, list) else 1
    if count and not given:
        raise RivalError(
            "--controlnet needs a map: add --control-image FILE (at the exemplar's size) or --control canny"
        )
    if given and not count:
        raise RivalError("a control image needs a ControlNet: add --controlnet PATH_OR_HUB_ID")
    if given not in (1, count):
        raise RivalError(f"{given} control images for {count} ControlNets: give one per --controlnet")


def read_exemplar(
    path: str | Path, mask: str | Path | None, control_images: Any = None, options: RunOptions | None = None
) -> tuple[Image.Image, Image.Image | None, list | None]:
    """An exemplar as RGB, its optional mask and ControlNet maps (files at the exemplar's size, or "canny").

    Every file is opened and checked here, before a model is loaded, the exemplar's size against
    `images.check_exemplar_size` under `options`' geometry; errors are one line.
    """
    exemplar = images.as_rgb(images.open_image(path), f"exemplar {path}")
    options = options or RunOptions()
    images.check_exemplar_size(exemplar.size, options.size, options.square_crop, f"exemplar {path}")
    maps = None
    if control_images is not None:
        maps = []
        for entry in control_images if isinstance(control_images, list) else [control_images]:
            if entry != "canny":
                entry = images.open_image(entry, "control image")
                if entry.size != exemplar.size:
                    raise RivalError(
                        f"control image {entry.filename or ''} is {entry.size[0]}x{entry.size[1]} but the exemplar "
                        f"is {exemplar.size[0]}x{exemplar.size[1]}: make the map at the exemplar's size"
                    )
            maps.append(entry)
    return exemplar, images.open_mask(mask, exemplar.size) if mask else None, maps
