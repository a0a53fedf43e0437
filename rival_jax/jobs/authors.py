"""The experiment files of the authors' release (github.com/dvlab-research/RIVAL), read as rival-jax settings.

- Inference config (`configs/rival_*.json`, given to `--config`): `self_attn` {`t_align`,
  `atten_frames`} and `inference` {`invert_step`, `ddim_step`, `cfg`, `is_null_prompt`, `t_early`}.
  `atten_frames` -1 switches attention injection off (their release's switch); 1 or 2 keep it on
  (their layer overwrites the value per step: exemplar only while t > t_align, then both).
  rival-jax inverts and generates with one step count, so `invert_step` must equal `ddim_step`.
  Their attention layer compares `t_align` with a step counter that runs one below the timestep,
  so it is read as `t_align` + 1 (`from_step_counter`) and kept as `authors_t_align`.
- Image config (`assets/images/configs_*.json`, an augmentation manifest): `image_root`,
  `prompt_postfix` (appended to every prompt), `neg_prompt` (appended to the negative prompt) and
  `image_exps` rows of `prompt`, `image_path`, `exp_name`, and per task `mask_path` (inpainting),
  `control_image_path` with `mode` (ControlNet), `prompt_ori` (editing: the inversion prompt unless
  the inference config inverts with the empty prompt). Paths are relative to `image_root`, which is
  relative to the config's folder or one above it (their files sit in `assets/images/` and name
  folders from the repository root), else to the working directory.

Their masks are black where to regenerate and at the latent size (64x64 for 512x512 exemplars);
rival-jax's are white where to regenerate and at the exemplar's size, so each is converted once into
the cache (`authors-masks/`, named by content). `exp_name` is the row's id (its
output files are named after it, and its seed derives from it), and `mode` names the ControlNet their script loaded
(lllyasviel/sd-controlnet-<mode>): pass the matching `--controlnet`.

>>> settings = inference_settings(json.load(open("configs/rival_variation.json")), "rival_variation.json")
>>> entries = image_entries(Path("assets/images/configs_variation.json"), {})
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from rival_jax import files, images
from rival_jax.errors import RivalError
from rival_jax.runtime import default_cache_dir

INFERENCE_SECTIONS = {
    "self_attn": ("t_align", "atten_frames"),
    "inference": ("invert_step", "ddim_step", "cfg", "is_null_prompt", "t_early"),
}
IMAGE_CONFIG_KEYS = ("image_root", "prompt_postfix", "neg_prompt", "image_exps")
IMAGE_ROW_KEYS = ("prompt", "image_path", "exp_name", "mask_path", "control_image_path", "mode", "prompt_ori")
CONTROL_MODES = ("canny", "depth", "seg", "openpose", "normal", "hed", "mlsd", "scribble")


def from_step_counter(threshold: int, largest: int) -> int:
    """Our timestep threshold for one the authors' attention layer compares with its step counter.

    Their layer counts `init_step = 1000 - (k + 1) * (1000 // T)` in step k, which is t - 1 for
    the DDIM timesteps (`steps_offset` 1) of every step count T that divides 1000 (their 10, 20,
    25, 50), so their `init_step > threshold` is our `t > threshold + 1`. Clamped to 0..`largest`
    (999 for `t_align`, 1000 for `editing_start`): past the ends the stages are the same.

    >>> from_step_counter(600, 999), from_step_counter(900, 1000)
    (601, 901)
    """
    return min(max(threshold + 1, 0), largest)


def is_inference_config(values: dict[str, Any]) -> bool:
    """True for a mapping in the authors' inference format (it has a `self_attn` or `inference` section)."""
    return any(section in values for section in INFERENCE_SECTIONS)


def _check_keys(where: str, values: Any, known: tuple[str, ...]) -> None:
    if not isinstance(values, dict):
        raise RivalError(f"{where} must be a JSON object")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RivalError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


def inference_settings(values: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """The rival-jax settings (`settings.ROW_FIELDS` names) an authors' inference config stands for.

    Args:
        values: the parsed file.
        source: its name, for messages.

    >>> inference_settings({"self_attn": {"t_align": 600}, "inference": {"cfg": 5}}, "c.json")
    {'t_align': 601, 'authors_t_align': 600, 'guidance_scale': 5.0}
    """
    _check_keys(f"config file {source}", values, tuple(INFERENCE_SECTIONS))
    attention, inference = values.get("self_attn", {}), values.get("inference", {})
    for section, keys in INFERENCE_SECTIONS.items():
        _check_keys(f"config file {source}, section {section}", values.get(section, {}), keys)
    settings: dict[str, Any] = {}
    if "t_align" in attention:
        theirs = attention["t_align"]
        if not isinstance(theirs, int) or isinstance(theirs, bool):
            raise RivalError(f"config file {source}: t_align={theirs!r} is not an integer")
        settings["t_align"], settings["authors_t_align"] = from_step_counter(theirs, 999), theirs
    frames = attention.get("atten_frames")
    if frames is not None:
        if frames not in (-1, 1, 2) or isinstance(frames, bool):
            raise RivalError(f"config file {source}: atten_frames={frames!r} is unknown: use -1 (off), 1 or 2")
        settings["attention_injection"] = frames != -1
    steps = {inference[k] for k in ("invert_step", "ddim_step") if k in inference}
    if len(steps) > 1:
        raise RivalError(
            f"config file {source}: invert_step {inference['invert_step']} and ddim_step {inference['ddim_step']} "
            "differ: rival-jax inverts and generates with the same number of steps, make them equal"
        )
    if steps:
        settings["steps"] = steps.pop()
    if "cfg" in inference:
        cfg = inference["cfg"]
        settings["guidance_scale"] = float(cfg) if isinstance(cfg, int) and not isinstance(cfg, bool) else cfg
    if "is_null_prompt" in inference:
        null = inference["is_null_prompt"]
        if not isinstance(null, bool):
            raise RivalError(f"config file {source}: is_null_prompt={null!r} is not a boolean: use true or false")
        # None: invert with the prompt, even for tasks that default to the empty prompt.
        settings["inversion_prompt"] = "" if null else None
    if "t_early" in inference:
        settings["t_early"] = inference["t_early"]
    return settings


def is_image_config(path: Path) -> bool:
    """True for a .json file holding the authors' image config (an object with `image_exps`)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(values, dict) and "image_exps" in values


def _image_root(path: Path, root: str) -> Path:
    candidate = Path(root).expanduser()
    if candidate.is_absolute():
        bases = [Path("/")]
    else:
        folder = path.resolve().parent
        bases = [folder, *folder.parents, Path.cwd()]
    for base in bases:
        if (base / candidate).is_dir():
            return (base / candidate).resolve()
    raise RivalError(
        f"image config {path}: image_root {root!r} is not a folder under the config's folder, one above it, "
        "or the working directory: fix image_root or run from the folder it is relative to"
    )


def _converted_mask(mask: Path, exemplar: Path) -> str:
    """The authors' mask (black = regenerate, any size) as a rival-jax mask (white, exemplar's size) in the cache."""
    size = images.open_image(exemplar).size
    source = images.open_image(mask, "mask")
    digest = hashlib.sha256(mask.read_bytes() + f"{size}".encode()).hexdigest()[:20]
    target = default_cache_dir() / "authors-masks" / f"{digest}.png"
    if not target.is_file():
        converted = ImageOps.invert(source.convert("L")).resize(size, Image.Resampling.NEAREST)
        files.save_png(converted, target)
    return str(target)


def image_entries(path: Path, defaults: dict[str, Any]) -> list[tuple[int, dict[str, Any] | RivalError]]:
    """(row number, manifest row or the reason it is unusable) for each of an image config's `image_exps`.

    A row's keys are manifest columns (`image`, `id` from `exp_name`, settings); paths are absolute. Unknown keys
    anywhere are an error for the whole file (before any compute).

    Args:
        path: the image config.
        defaults: the job's settings (`negative_prompt`, `task`, `inversion_prompt` shape the rows).
    """
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RivalError(f"image config {path} is not valid JSON ({error.msg}): fix its syntax") from None
    _check_keys(f"image config {path}", values, IMAGE_CONFIG_KEYS)
    rows = values.get("image_exps")
    if not isinstance(rows, list):
        raise RivalError(f"image config {path}: image_exps must be a list of objects")
    for number, row in enumerate(rows):
        _check_keys(f"image config {path}, image_exps[{number}]", row, IMAGE_ROW_KEYS)
    root = _image_root(path, str(values.get("image_root", ".")))
    postfix, negative = str(values.get("prompt_postfix", "")), str(values.get("neg_prompt", ""))
    invert_with_original = defaults.get("task") == "edit" and defaults.get("inversion_prompt") is None
    entries: list[tuple[int, dict[str, Any] | RivalError]] = []
    for number, row in enumerate(rows):
        if "image_path" not in row:
            entries.append((number, RivalError("no image_path given")))
            continue
        image = root / str(row["image_path"])
        entry: dict[str, Any] = {"image": str(image), "prompt": str(row.get("prompt", "")) + postfix}
        if "exp_name" in row:
            entry["id"] = str(row["exp_name"])
        if negative:
            entry["negative_prompt"] = str(defaults.get("negative_prompt", "")) + negative
        if invert_with_original and "prompt_ori" in row:
            entry["inversion_prompt"] = str(row["prompt_ori"])
        if "control_image_path" in row:
            entry["control_image"] = str(root / str(row["control_image_path"]))
        mode = row.get("mode")
        if mode is not None and mode not in CONTROL_MODES:
            entries.append((number, RivalError(f"mode {mode!r} is unknown: use one of {', '.join(CONTROL_MODES)}")))
            continue
        if "mask_path" in row:
            try:
                entry["mask"] = _converted_mask(root / str(row["mask_path"]), image)
            except RivalError as error:
                entries.append((number, error))
                continue
            entry["task"] = "inpaint"
        entries.append((number, entry))
    return entries
