"""`rival-jax` command line: every RIVAL application on one exemplar, and the tiny-model writer."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np

from rival_jax.config import LATENT_INITS, RivalConfig
from rival_jax.errors import RivalError

TASKS = ("variation", "text", "edit", "inpaint")
JOB_DEFAULTS: dict[str, Any] = {
    "exemplar": None,
    "task": "variation",
    "prompt": "",
    "inversion_prompt": None,
    "negative_prompt": "",
    "num_variations": 4,
    "seed": 0,
    "steps": 50,
    "model": "tiny",
    "dtype": "float32",
    "output": "rival-output",
    "mask": None,
    "cache_dir": None,
    "compile_cache": True,
    "progress": None,
}
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RivalConfig))
# The authors' release: variation inverts with the exemplar prompt, every other task with the empty one.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "variation": {},
    "text": {"inversion_prompt": ""},
    "edit": {"inversion_prompt": "", "latent_init": "exemplar", "editing_start": 900},
    "inpaint": {"inversion_prompt": ""},
}


def bundled_exemplar() -> Path:
    return Path(str(resources.files("rival_jax") / "assets" / "exemplar.png"))


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    suppress = argparse.SUPPRESS
    add("exemplar", nargs="?", default=suppress, help="exemplar image (default: the bundled example)")
    add("--task", choices=TASKS, default=suppress, help="application (default: variation)")
    add("--prompt", default=suppress, help="prompt of the generated images")
    add(
        "--inversion-prompt",
        default=suppress,
        help="prompt for inverting the exemplar (default: --prompt for variation, empty otherwise)",
    )
    add("--negative-prompt", default=suppress, help="negative prompt of the generated images (default: empty)")
    add("-n", "--num-variations", type=int, default=suppress, help="images to generate (default: 4)")
    add("--seed", type=int, default=suppress, help="random seed (default: 0)")
    add("--steps", type=int, default=suppress, help="DDIM steps for inversion and generation (default: 50)")
    add("--guidance", dest="guidance_scale", type=float, default=suppress, help="guidance scale (default: 7)")
    add("--t-align", type=int, default=suppress, help="attention replacement while t > t_align (default: 600)")
    add("--t-early", type=int, default=suppress, help="AdaIN noise alignment while t > t_early (default: 600)")
    add("--editing-start", type=int, default=suppress, help="no injection while t > this (edit default: 900)")
    add("--latent-init", choices=LATENT_INITS, default=suppress, help="start latent (default: shuffle)")
    for switch in ("attention_injection", "early_replacement", "latent_alignment", "noise_alignment"):
        add(
            f"--no-{switch.replace('_', '-')}",
            dest=switch,
            action="store_false",
            default=suppress,
            help=f"ablation: turn {switch.replace('_', ' ')} off",
        )
    add("--mask", default=suppress, help="inpainting mask, same size as the exemplar, white = regenerate")
    add("--model", default=suppress, help="diffusers SD 1.x folder, hub id, or 'tiny' (default, random weights)")
    add("--dtype", choices=("float32", "bfloat16"), default=suppress, help="compute dtype (default: float32)")
    add("-o", "--output", default=suppress, help="output folder (default: rival-output)")
    add("--config", help="JSON or YAML file of settings (same names as these options, with underscores)")
    add("--cache-dir", default=suppress, help="cache folder for converted weights and the tiny model")
    add("--compile-cache", default=suppress, help="folder of the persistent XLA compilation cache")
    add(
        "--no-compile-cache",
        dest="compile_cache",
        action="store_false",
        default=suppress,
        help="do not keep compiled programs on disk",
    )
    add(
        "--progress",
        dest="progress",
        action="store_true",
        default=suppress,
        help="per-step progress bars (default when stderr is a terminal; such programs skip the disk cache)",
    )
    add("--no-progress", dest="progress", action="store_false", default=suppress, help="no per-step progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rival-jax", description="RIVAL image variation with JAX/Flax Stable Diffusion."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="invert one exemplar and generate aligned images")
    _add_generate_arguments(generate)
    tiny = commands.add_parser("make-tiny", help="write the built-in tiny random checkpoint to a folder")
    tiny.add_argument("folder")
    tiny.add_argument("--format", choices=("flax", "safetensors"), default="flax")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a JSON or YAML mapping."""
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
        raise RivalError(
            f"config file {file} is not valid {file.suffix[1:].upper()} ({error}): fix its syntax"
        ) from None
    if not isinstance(values, dict):
        raise RivalError(f"config file {file} must hold a mapping of setting names to values")
    known = set(JOB_DEFAULTS) | set(CONFIG_FIELDS)
    unknown = sorted(set(values) - known)
    if unknown:
        raise RivalError(
            f"config file {file}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return values


def resolve_settings(cli: dict[str, Any]) -> dict[str, Any]:
    """Defaults < task defaults < config file < command-line options."""
    from_file = read_config_file(cli.pop("config")) if cli.get("config") else {}
    cli.pop("config", None)
    task = cli.get("task", from_file.get("task", JOB_DEFAULTS["task"]))
    settings = {**JOB_DEFAULTS, **RivalConfig().as_dict(), **TASK_DEFAULTS[task], **from_file, **cli}
    if settings["inversion_prompt"] is None:
        settings["inversion_prompt"] = settings["prompt"]
    if settings["exemplar"] is None:
        settings["exemplar"] = str(bundled_exemplar())
    if task == "inpaint" and not settings["mask"]:
        raise RivalError("--task inpaint needs --mask: an image the exemplar's size, white where to regenerate")
    if not isinstance(settings["num_variations"], int) or settings["num_variations"] < 1:
        raise RivalError(f"num_variations={settings['num_variations']!r} is out of range: use an integer >= 1")
    if not isinstance(settings["steps"], int) or not 1 <= settings["steps"] <= 1000:
        raise RivalError(f"steps={settings['steps']!r} is out of range: use an integer in 1..1000")
    return settings


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_generate(settings: dict[str, Any]) -> Path:
    """Invert, generate, and write images, grid and sidecar atomically into the output folder."""
    from rival_jax import images
    from rival_jax.pipeline import RivalPipeline, exemplar_image
    from rival_jax.progress import CompileTimer
    from rival_jax.runtime import enable_compilation_cache

    if settings["compile_cache"]:
        enable_compilation_cache(None if settings["compile_cache"] is True else settings["compile_cache"])
    config = RivalConfig.from_dict({k: settings[k] for k in CONFIG_FIELDS})
    exemplar = images.as_rgb(images.open_image(settings["exemplar"]), f"exemplar {settings['exemplar']}")
    mask_image = images.open_mask(settings["mask"], exemplar.size) if settings["mask"] else None
    output = Path(settings["output"])
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    with CompileTimer() as compiling:
        pipe = RivalPipeline.from_pretrained(
            settings["model"], dtype=settings["dtype"], cache_dir=settings["cache_dir"] or True
        )
        if pipe.is_random_tiny:
            log("model: built-in tiny model with RANDOM weights - its images are noise (use --model for a real SD 1.x)")
        log(f"model: {pipe.models.path} ({', '.join(f'{k}: {v}' for k, v in pipe.models.sources.items())})")
        mask = None if mask_image is None else np.asarray(images.square_resize(mask_image, pipe.resolution))
        show = sys.stderr.isatty() if settings["progress"] is None else bool(settings["progress"])
        timings = {}
        clock = time.perf_counter()
        chain = pipe.invert(exemplar, settings["inversion_prompt"], settings["steps"], show_progress=show)
        timings["inversion_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        result = pipe.generate(
            chain,
            prompt=settings["prompt"],
            negative_prompt=settings["negative_prompt"],
            num_variations=settings["num_variations"],
            seed=settings["seed"],
            config=config,
            mask=mask,
            show_progress=show,
        )
        timings["generation_s"] = time.perf_counter() - clock
    timings["compile_s"] = compiling.seconds
    timings["total_s"] = time.perf_counter() - started
    files = []
    for index, image in zip(result.indices, result.images, strict=True):
        name = f"variation-{int(index):03d}.png"
        images.save_png(image, output / name)
        files.append({"file": name, "variation_index": int(index), "seed": settings["seed"]})
    exemplar_png = exemplar_image(chain)
    images.save_png(exemplar_png, output / "exemplar.png")
    images.save_png(images.grid([exemplar_png, *result.images]), output / "grid.png")
    sidecar = {
        "rival_jax_version": metadata.version("rival-jax"),
        "model": str(settings["model"]),
        "model_path": str(pipe.models.path),
        "random_weights": pipe.is_random_tiny,
        "dtype": settings["dtype"],
        "exemplar": str(settings["exemplar"]),
        "exemplar_sha256": _file_sha256(settings["exemplar"]),
        "mask": settings["mask"],
        "task": settings["task"],
        "prompt": settings["prompt"],
        "inversion_prompt": settings["inversion_prompt"],
        "negative_prompt": settings["negative_prompt"],
        "num_inference_steps": settings["steps"],
        "seed": settings["seed"],
        "config": config.as_dict(),
        "images": files,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "device": str(__import__("jax").devices()[0].device_kind),
    }
    images.save_json(sidecar, output / "rival.json")
    log(
        f"compile {timings['compile_s']:.1f} s, inversion {timings['inversion_s']:.1f} s, "
        f"generation {timings['generation_s']:.1f} s (both include compiling on first use)"
    )
    print(output / "grid.png")
    return output


def _quiet_libraries() -> None:
    """Command-line output is ours: the libraries' notices about unused config keys are noise here."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    _quiet_libraries()
    command = arguments.pop("command")
    try:
        if command == "make-tiny":
            from rival_jax.tiny import write_tiny_checkpoint

            print(write_tiny_checkpoint(arguments["folder"], seed=arguments["seed"], weight_format=arguments["format"]))
            return 0
        run_generate(resolve_settings(arguments))
        return 0
    except RivalError as error:
        print(f"rival-jax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
