"""`rival-jax`: every RIVAL application on one exemplar, augmentation jobs, and the tiny-model writer."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np

from rival_jax.config import LATENT_INITS, REFERENCE_BATCH_SIZE
from rival_jax.errors import RivalError
from rival_jax.settings import ROW_FIELDS, TASKS, generation_arguments, merge_settings, read_settings_file

# Options that are not per-exemplar settings, with their defaults.
RUN_DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "dtype": "auto",
    "resolution": None,
    "attention": "xla",
    "reference_batch_size": REFERENCE_BATCH_SIZE,
    "output": "rival-output",
    "cache_dir": None,
    "compile_cache": True,
    "progress": None,
}


def bundled_exemplar() -> Path:
    return Path(str(resources.files("rival_jax") / "assets" / "exemplar.png"))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of both `generate` and `augment`; absent options stay absent so layering works."""
    add, suppress = parser.add_argument, argparse.SUPPRESS
    add("--task", choices=TASKS, default=suppress, help="application (default: variation)")
    add("--prompt", default=suppress, help="prompt of the generated images")
    add(
        "--inversion-prompt",
        default=suppress,
        help="prompt for inverting the exemplar (default: --prompt for variation, empty otherwise)",
    )
    add("--negative-prompt", default=suppress, help="negative prompt of the generated images (default: empty)")
    add("-n", "--num-variations", type=int, default=suppress, help="images per exemplar (default: 4)")
    add("--seed", type=int, default=suppress, help="random seed (default: 0)")
    add("--steps", type=int, default=suppress, help="DDIM steps for inversion and generation (default: 50)")
    add("--guidance", dest="guidance_scale", type=float, default=suppress, help="guidance scale (default: 7)")
    add("--t-align", type=int, default=suppress, help="attention replacement while t > t_align (default: 600)")
    add("--t-early", type=int, default=suppress, help="AdaIN noise alignment while t > t_early (default: 600)")
    add("--editing-start", type=int, default=suppress, help="no injection while t > this (edit default: 900)")
    add("--latent-init", choices=LATENT_INITS, default=suppress, help="start latent (default: shuffle)")
    for switch in ("attention_injection", "early_replacement", "latent_alignment", "noise_alignment"):
        flag = f"--no-{switch.replace('_', '-')}"
        add(flag, dest=switch, action="store_false", default=suppress, help=f"ablation: {switch.replace('_', ' ')} off")
    add("--model", default=suppress, help="diffusers SD 1.x folder, hub id, or 'tiny' (default, random weights)")
    add(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default=suppress,
        help="compute dtype (default auto: float32 on CPU, bfloat16 on GPU/TPU)",
    )
    add("--resolution", type=int, default=suppress, help="image size (default: the model's, 512 for SD 1.5)")
    add(
        "--attention",
        choices=("xla", "cudnn"),
        default=suppress,
        help="injected attention backend (cudnn: flash attention, NVIDIA GPUs, bf16)",
    )
    add(
        "--reference-batch-size",
        type=int,
        default=suppress,
        help=f"UNet batch of the exemplar's reference pass (default: {REFERENCE_BATCH_SIZE}; lower it to save memory)",
    )
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
        help="progress bars (default when stderr is a terminal)",
    )
    add("--no-progress", dest="progress", action="store_false", default=suppress, help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rival-jax", description="RIVAL image variation with JAX/Flax Stable Diffusion."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="invert one exemplar and generate aligned images")
    generate.add_argument("exemplar", nargs="?", default=argparse.SUPPRESS, help="exemplar image (default: bundled)")
    generate.add_argument("--mask", default=argparse.SUPPRESS, help="inpainting mask, exemplar's size, white = redo")
    _add_shared_arguments(generate)
    augment = commands.add_parser("augment", help="resumable variation job over a manifest or a folder of images")
    augment.add_argument("source", help="manifest (.csv or .jsonl with an 'image' column) or a folder of images")
    augment.add_argument("--batch-size", type=int, default=8, help="variations per compiled batch (default: 8)")
    augment.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-host runs)")
    augment.add_argument("--num-processes", type=int, help="number of processes (multi-host runs)")
    augment.add_argument("--process-id", type=int, help="this process's index (multi-host runs)")
    augment.add_argument("--distributed", action="store_true", help="jax.distributed with auto-detected cluster")
    _add_shared_arguments(augment)
    tiny = commands.add_parser("make-tiny", help="write the built-in tiny random checkpoint to a folder")
    tiny.add_argument("folder")
    tiny.add_argument("--format", choices=("flax", "safetensors"), default="flax")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def split_options(arguments: dict[str, Any], extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run options, row settings): config file < command line for both; defaults filled for run options."""
    allowed = (*RUN_DEFAULTS, *ROW_FIELDS, *extra)
    from_file = read_settings_file(arguments.pop("config"), allowed) if arguments.get("config") else {}
    arguments.pop("config", None)
    layered = {**from_file, **arguments}
    run = {**RUN_DEFAULTS, **{k: v for k, v in layered.items() if k in RUN_DEFAULTS or k in extra}}
    row = {k: v for k, v in layered.items() if k in ROW_FIELDS}
    return run, row


def _prepare_runtime(run: dict[str, Any]) -> None:
    from rival_jax.runtime import enable_compilation_cache

    if run["compile_cache"]:
        enable_compilation_cache(None if run["compile_cache"] is True else run["compile_cache"])


def _load_pipeline(run: dict[str, Any]):
    from rival_jax.pipeline import RivalPipeline

    pipe = RivalPipeline.from_pretrained(
        run["model"],
        dtype=run["dtype"],
        cache_dir=run["cache_dir"] or True,
        resolution=run["resolution"],
        attention=run["attention"],
        reference_batch_size=run["reference_batch_size"],
    )
    if pipe.random_weights:
        _log("model: built-in tiny model with RANDOM weights - its images are noise (use --model for a real SD 1.x)")
    sources = ", ".join(f"{k}: {v}" for k, v in pipe.models.sources.items())
    _log(f"model: {pipe.models.path} ({sources}); devices: {pipe.mesh.size} x {pipe.mesh.devices.flat[0].platform}")
    return pipe


def _show_progress(run: dict[str, Any]) -> bool:
    return sys.stderr.isatty() if run["progress"] is None else bool(run["progress"])


def run_generate(run: dict[str, Any], row: dict[str, Any]) -> Path:
    """Invert, generate, and write images, grid and sidecar atomically into the output folder."""
    from rival_jax import images
    from rival_jax.pipeline import exemplar_image
    from rival_jax.progress import CompileTimer

    settings = merge_settings(row)
    exemplar_path = run.get("exemplar") or str(bundled_exemplar())
    exemplar = images.as_rgb(images.open_image(exemplar_path), f"exemplar {exemplar_path}")
    mask_image = images.open_mask(settings["mask"], exemplar.size) if settings["mask"] else None
    output = Path(run["output"])
    _prepare_runtime(run)
    show = _show_progress(run)
    started = time.perf_counter()
    with CompileTimer() as compiling:
        pipe = _load_pipeline(run)
        mask = None if mask_image is None else np.asarray(images.square_resize(mask_image, pipe.resolution))
        clock = time.perf_counter()
        chain = pipe.invert(exemplar, settings["inversion_prompt"], settings["steps"], show_progress=show)
        inversion_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        result = pipe.generate(
            chain,
            **generation_arguments(settings),
            num_variations=settings["num_variations"],
            mask=mask,
            show_progress=show,
        )
        generation_seconds = time.perf_counter() - clock
    timings = {
        "compile_s": compiling.seconds,
        "inversion_s": inversion_seconds,
        "generation_s": generation_seconds,
        "total_s": time.perf_counter() - started,
    }
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
        "model": str(run["model"]),
        "model_path": str(pipe.models.path),
        "random_weights": pipe.random_weights,
        "dtype": str(np.dtype(pipe.dtype)),
        "resolution": pipe.resolution,
        "exemplar": str(exemplar_path),
        "exemplar_sha256": hashlib.sha256(Path(exemplar_path).read_bytes()).hexdigest(),
        "task": settings["task"],
        "prompt": settings["prompt"],
        "inversion_prompt": settings["inversion_prompt"],
        "negative_prompt": settings["negative_prompt"],
        "mask": settings["mask"],
        "num_inference_steps": settings["steps"],
        "seed": settings["seed"],
        "config": settings["config"].as_dict(),
        "images": files,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "devices": f"{pipe.mesh.size} x {pipe.mesh.devices.flat[0].device_kind}",
    }
    images.save_json(sidecar, output / "rival.json")
    _log(
        f"compile {timings['compile_s']:.1f} s; inversion {inversion_seconds:.1f} s, "
        f"generation {generation_seconds:.1f} s (both include compiling on first use)"
    )
    print(output / "grid.png")
    return output


def run_augment_command(run: dict[str, Any], row: dict[str, Any]) -> int:
    """`rival-jax augment`: this process's share of a manifest, resumable."""
    from rival_jax.augment import read_rows, run_augment
    from rival_jax.parallel import initialize_distributed
    from rival_jax.progress import CompileTimer

    merge_settings(row)
    if run["batch_size"] < 1:
        raise RivalError(f"--batch-size {run['batch_size']} is out of range: use an integer >= 1")
    process_index, process_count = 0, 1
    if run["coordinator"] or run["distributed"]:
        process_index, process_count = initialize_distributed(
            run["coordinator"], run["num_processes"], run["process_id"]
        )
        _log(f"process {process_index} of {process_count}")
    rows, problems = read_rows(run["source"], row, str(run["model"]))
    _prepare_runtime(run)
    with CompileTimer() as compiling:
        pipe = _load_pipeline(run)
        summary = run_augment(
            pipe,
            rows,
            run["output"],
            batch_size=run["batch_size"],
            process_index=process_index,
            process_count=process_count,
            problems=problems,
            show_progress=_show_progress(run),
        )
    _log(f"{summary.line()}; compile {compiling.seconds:.1f} s")
    print(Path(run["output"]))
    return 0


def _quiet_libraries() -> None:
    """Command-line output is ours: the libraries' notices about unused config keys are noise here."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    command = arguments.pop("command")
    _quiet_libraries()
    try:
        if command == "make-tiny":
            from rival_jax.random_models import write_tiny_checkpoint

            print(write_tiny_checkpoint(arguments["folder"], seed=arguments["seed"], weight_format=arguments["format"]))
            return 0
        if command == "augment":
            extra = ("source", "batch_size", "coordinator", "num_processes", "process_id", "distributed")
            return run_augment_command(*split_options(arguments, extra))
        run_generate(*split_options(arguments, ("exemplar",)))
        return 0
    except RivalError as error:
        print(f"rival-jax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
