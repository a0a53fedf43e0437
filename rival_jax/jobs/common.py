"""What every job (`generate`, `augment`) does around the pipeline: runtime, model, exemplars, logging.

A job receives the run options (`RunOptions`), the job options (`JOB_DEFAULTS`) and per-exemplar
settings (`settings`), already layered by the CLI or a config file.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from rival_jax import images
from rival_jax.errors import RivalError
from rival_jax.options import RunOptions

# Options of a job that are neither run options of the pipeline nor per-exemplar settings.
JOB_DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "output": "rival-output",
    "cache_dir": None,
    "compile_cache": True,
    "progress": None,
    "overwrite": False,
}


# Accepted types of job options (those of `JOB_DEFAULTS` and the commands' own), as a config file may give them.
_PATH, _NONE = (str, os.PathLike), type(None)
JOB_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": (_PATH, "a path or hub id"),
    "output": (_PATH, "a folder path"),
    "cache_dir": ((*_PATH, _NONE), "a folder path"),
    "compile_cache": ((bool, *_PATH), "a folder path or a boolean"),
    "progress": ((bool, _NONE), "a boolean"),
    "overwrite": ((bool,), "a boolean"),
    "traces": ((bool,), "a boolean"),
    "exemplar": ((*_PATH, _NONE), "a file path"),
    "source": (_PATH, "a manifest or folder path"),
    "batch_size": ((int,), "an integer"),
    "coordinator": ((str, _NONE), "host:port text"),
    "num_processes": ((int, _NONE), "an integer"),
    "process_id": ((int, _NONE), "an integer"),
    "distributed": ((bool,), "a boolean"),
}


def check_job(job: dict[str, Any]) -> None:
    """Job options of the wrong type (say from a config file) are one-line errors, not tracebacks later."""
    for name, value in job.items():
        accepted, kind = JOB_TYPES.get(name, ((object,), ""))
        wrong_bool = isinstance(value, bool) and bool not in accepted
        if wrong_bool or not isinstance(value, accepted) or (str in accepted and value == ""):
            raise RivalError(f"{name}={value!r} is not {kind}: fix it in the config file or on the command line")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(message: object) -> str:
    """A message on one line: line breaks that came in with file names or values are shown escaped."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def prepare_runtime(job: dict[str, Any]) -> None:
    """Process-wide settings: the persistent compilation cache unless switched off."""
    from rival_jax.runtime import enable_compilation_cache

    if job["compile_cache"]:
        enable_compilation_cache(None if job["compile_cache"] is True else job["compile_cache"])


def load_pipeline(job: dict[str, Any], options: RunOptions) -> Any:
    """The job's `RivalPipeline`, with a line about the model and devices on stderr."""
    from rival_jax.pipeline import RandomWeightsWarning, RivalPipeline, random_weights_notice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # said below, in the job's words
        pipe = RivalPipeline.from_pretrained(job["model"], options=options, cache_dir=job["cache_dir"] or True)
    if pipe.random_weights:
        log(f"model: {random_weights_notice(job['model'], pipe.models.family)} (use --model for a real checkpoint)")
    sources = ", ".join(f"{k}: {v}" for k, v in pipe.models.sources.items())
    devices = f"{pipe.mesh.size} x {pipe.mesh.devices.flat[0].platform}"
    log(f"model: {pipe.models.path} ({pipe.models.family}; {sources}); devices: {devices}")
    return pipe


def show_progress(job: dict[str, Any]) -> bool:
    return sys.stderr.isatty() if job["progress"] is None else bool(job["progress"])


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
