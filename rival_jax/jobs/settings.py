"""Job settings shared by `rival-jax generate`, `rival-jax augment` and manifests.

A job's settings are layered: defaults < the task's defaults < config file < command line <
manifest row. The task's defaults follow the authors' release: variation inverts with the prompt,
every other task with the empty prompt; editing starts from x_T and injects from the step their
editing script does (its `--editing_early_steps 900` on their step counter, `authors.from_step_counter`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rival_jax.config import RivalConfig
from rival_jax.errors import RivalError
from rival_jax.images import CannyEdges
from rival_jax.jobs.authors import from_step_counter, inference_settings, is_inference_config

TASKS = ("variation", "text", "edit", "inpaint")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RivalConfig))
# Settings that can differ per exemplar (manifest columns), with their defaults.
ROW_DEFAULTS: dict[str, Any] = {
    "task": "variation",
    "prompt": "",
    "inversion_prompt": None,
    "negative_prompt": "",
    "num_variations": 4,
    "seed": 0,
    "steps": 50,
    "mask": None,
    "control_image": None,
    "control_scale": 1.0,
    "control_start": 0.0,
    "control_end": 1.0,
    "canny_sigma": 2.0,
    "canny_low": None,
    "canny_high": None,
    # The authors' `t_align` that `t_align` was read from (their config); a record, dropped when t_align is set later.
    "authors_t_align": None,
}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "variation": {},
    "text": {"inversion_prompt": ""},
    "edit": {"inversion_prompt": "", "latent_init": "exemplar", "editing_start": from_step_counter(900, 1000)},
    "inpaint": {"inversion_prompt": ""},
}
ROW_FIELDS = (*ROW_DEFAULTS, *CONFIG_FIELDS)
# Numeric row settings whose default is None, and those that take one number per ControlNet.
NUMBER_FIELDS = ("canny_low", "canny_high")
PER_CONTROLNET = ("control_scale", "control_start", "control_end")
CONTROL_FIELDS = ("control_image", *PER_CONTROLNET, "canny_sigma", *NUMBER_FIELDS)


def merge_settings(*layers: dict[str, Any]) -> dict[str, Any]:
    """Resolve layered row settings (later layers win) and validate them; adds `config` (a RivalConfig)."""
    given: dict[str, Any] = {}
    for layer in layers:
        given.update({k: v for k, v in layer.items() if k in ROW_FIELDS})
    task = given.get("task", ROW_DEFAULTS["task"])
    if task not in TASKS:
        raise RivalError(f"task {task!r} is unknown: use one of {', '.join(TASKS)}")
    settings = {**ROW_DEFAULTS, **RivalConfig().as_dict(), **TASK_DEFAULTS[task], **given}
    if settings["inversion_prompt"] is None:
        settings["inversion_prompt"] = settings["prompt"]
    theirs = settings["authors_t_align"]
    if not isinstance(theirs, int) or settings["t_align"] != from_step_counter(theirs, 999):
        settings["authors_t_align"] = None
    if task == "inpaint" and not settings["mask"]:
        raise RivalError("task inpaint needs a mask: an image the exemplar's size, white where to regenerate")
    for name in ("num_variations", "steps", "seed"):
        if not isinstance(settings[name], int) or isinstance(settings[name], bool):
            raise RivalError(f"{name}={settings[name]!r} is not an integer")
    if not 0 <= settings["seed"] < 2**32:
        raise RivalError(f"seed={settings['seed']!r} is out of range: use an integer in 0..{2**32 - 1}")
    for name in ("prompt", "negative_prompt", "inversion_prompt"):
        if not isinstance(settings[name], str):
            raise RivalError(f"{name}={settings[name]!r} is not text: quote it")
    for name in ("mask", "control_image"):
        paths = settings[name] if isinstance(settings[name], list) and name == "control_image" else [settings[name]]
        paths = [p for entry in paths for p in (entry if isinstance(entry, list) else [entry])]  # per-variation lists
        if not all(isinstance(p, str) and p for p in paths if p is not None):
            raise RivalError(f"{name}={settings[name]!r} is not a file path: give a path (text)")
    for name in CONFIG_FIELDS:
        if isinstance(getattr(RivalConfig, name), bool) and not isinstance(settings[name], bool):
            raise RivalError(f"{name}={settings[name]!r} is not a boolean: use true or false")
    count = settings["num_variations"]
    if count < 1:
        raise RivalError(f"num_variations={count!r} is out of range: use an integer >= 1")
    steps = settings["steps"]
    if not 1 <= steps <= 1000:
        raise RivalError(f"steps={steps!r} is out of range: use an integer in 1..1000")
    for name in (*PER_CONTROLNET, "canny_sigma", *NUMBER_FIELDS):
        values = settings[name] if isinstance(settings[name], list) else [settings[name]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None):
            raise RivalError(f"{name}={settings[name]!r} is not a number")
    settings["config"] = RivalConfig.from_dict({k: settings[k] for k in CONFIG_FIELDS})
    return settings


def generation_arguments(settings: dict[str, Any]) -> dict[str, Any]:
    """The `RivalPipeline.generate` keyword arguments that resolved job settings fix.

    A control image "canny" becomes `images.CannyEdges` with the row's thresholds.
    """
    canny = CannyEdges(settings["canny_sigma"], settings["canny_low"], settings["canny_high"])
    maps = settings["control_image"]
    if maps is not None:
        maps = [canny if m == "canny" else m for m in (maps if isinstance(maps, list) else [maps])]
    return {
        "prompt": settings["prompt"],
        "negative_prompt": settings["negative_prompt"],
        "seed": settings["seed"],
        "config": settings["config"],
        "control_image": maps,
        "controlnet_conditioning_scale": settings["control_scale"],
        "control_guidance_start": settings["control_start"],
        "control_guidance_end": settings["control_end"],
    }


def read_settings_file(path: str | Path, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A JSON or YAML mapping of settings; names outside `allowed` are an error.

    A file in the authors' inference format (`self_attn`/`inference` sections, see `jobs.authors`)
    is mapped to the settings it stands for.
    """
    file = Path(path)
    if not file.is_file():
        raise RivalError(f"config file {file} does not exist: check the path")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:
        kind = "YAML" if file.suffix in (".yaml", ".yml") else "JSON"
        message = str(error).splitlines()[0]
        raise RivalError(f"config file {file} is not valid {kind} ({message}): fix its syntax") from None
    if not isinstance(values, dict):
        raise RivalError(f"config file {file} must hold a mapping of setting names to values")
    if is_inference_config(values):
        return inference_settings(values, file)
    unknown = sorted(map(str, set(values) - set(allowed)))
    if unknown:
        raise RivalError(f"config file {file}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    return values


def parse_text_value(name: str, text: str) -> Any:
    """A manifest cell (CSV text) to the type of the setting `name`."""
    default = {**ROW_DEFAULTS, **RivalConfig().as_dict()}[name]
    if isinstance(default, bool):
        if text.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if text.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise RivalError(f"{name}={text!r} is not a boolean: use true or false")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float) or name in NUMBER_FIELDS:
            return float(text)
    except ValueError:
        raise RivalError(f"{name}={text!r} is not a number") from None
    return text
