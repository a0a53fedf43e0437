"""`rival-jax`: parses the command line and hands it to a job (`jobs.generate`, `augment`, `evaluate`) or `make-tiny`.

Nothing here computes: options are layered (defaults < task defaults < config file < command line)
and split into job options, run options (`RunOptions`) and per-exemplar settings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from rival_jax.config import LATENT_INITS
from rival_jax.errors import RivalError
from rival_jax.jobs.common import JOB_DEFAULTS, one_line
from rival_jax.jobs.settings import ROW_FIELDS, TASKS, read_settings_file
from rival_jax.options import FIELDS as RUN_OPTION_FIELDS
from rival_jax.options import RunOptions, add_run_option_arguments

FAMILIES = ("sd1", "sd2", "sdxl")


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
    add("--editing-start", type=int, default=suppress, help="no injection while t > this (edit default: 901)")
    add("--latent-init", choices=LATENT_INITS, default=suppress, help="start latent (default: shuffle)")
    for switch in ("attention_injection", "early_replacement", "latent_alignment", "noise_alignment"):
        flag = f"--no-{switch.replace('_', '-')}"
        add(flag, dest=switch, action="store_false", default=suppress, help=f"ablation: {switch.replace('_', ' ')} off")
    add(
        "--control-image",
        action="append",
        default=suppress,
        help="ControlNet map at the exemplar's size, or canny (repeat: one per --controlnet)",
    )
    add("--control", dest="control_image", action="append", choices=("canny",), default=suppress, help="computed map")
    add("--control-scale", type=float, action="append", default=suppress, help="conditioning scale (default: 1)")
    add("--control-start", type=float, action="append", default=suppress, help="fraction of steps where it starts")
    add("--control-end", type=float, action="append", default=suppress, help="fraction of steps where it ends")
    add("--canny-sigma", type=float, default=suppress, help="Canny edges: Gaussian sigma (default: 2)")
    add("--canny-low", type=float, default=suppress, help="Canny edges: low hysteresis threshold")
    add("--canny-high", type=float, default=suppress, help="Canny edges: high hysteresis threshold")
    add("--model", default=suppress, help="diffusers folder (SD 1.x/2.x/SDXL), hub id, or tiny, tiny-sd2, tiny-sdxl")
    add_run_option_arguments(parser)
    add("-o", "--output", default=suppress, help="output folder (default: rival-output)")
    add(
        "--overwrite",
        action="store_true",
        default=suppress,
        help="replace the earlier result in the output folder (only the files it recorded are removed)",
    )
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
    generate.add_argument(
        "--traces",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also write traces.json: per step, the exemplar's attention share and the latents' statistic distance",
    )
    _add_shared_arguments(generate)
    augment = commands.add_parser("augment", help="resumable variation job over a manifest or a folder of images")
    augment.add_argument("source", help="manifest (.csv or .jsonl with an 'image' column) or a folder of images")
    augment.add_argument("--batch-size", type=int, default=8, help="variations per compiled batch (default: 8)")
    augment.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-host runs)")
    augment.add_argument("--num-processes", type=int, help="number of processes (multi-host runs)")
    augment.add_argument("--process-id", type=int, help="this process's index (multi-host runs)")
    augment.add_argument("--distributed", action="store_true", help="jax.distributed with auto-detected cluster")
    _add_shared_arguments(augment)
    evaluate = commands.add_parser("evaluate", help="score a generate/augment output folder: metrics and a report")
    evaluate.add_argument("folder", help="the -o folder of generate or augment")
    evaluate.add_argument(
        "--clip", default="openai/clip-vit-large-patch14", help="CLIP folder, hub id or tiny (default: %(default)s)"
    )
    evaluate.add_argument("--inception", help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth) for KID")
    evaluate.add_argument(
        "--kid-features", choices=("inception", "clip"), help="KID features (default: inception with --inception)"
    )
    evaluate.add_argument("--cache-dir", help="cache folder for converted weights and the tiny CLIP")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds palettes and KID subsets (default: 0)")
    ablate = commands.add_parser("ablate", help="the paper's ablation and a t_align/t_early sweep, scored")
    ablate.add_argument("source", help="manifest (.csv or .jsonl with an 'image' column) or a folder of images")
    ablate.add_argument("--t-align-values", type=int, nargs="+", help="swept t_align values (default: 400 600 800)")
    ablate.add_argument("--t-early-values", type=int, nargs="+", help="swept t_early values (default: 400 600 800)")
    ablate.add_argument("--clip", help="CLIP for the scores (default: tiny with --model tiny*, else ViT-L/14)")
    ablate.add_argument("--inception", help="FID Inception weights file for KID (default: CLIP features)")
    ablate.add_argument("--batch-size", type=int, default=8, help="variations per compiled batch (default: 8)")
    _add_shared_arguments(ablate)
    tiny = commands.add_parser("make-tiny", help="write the built-in tiny random checkpoint to a folder")
    tiny.add_argument("folder")
    tiny.add_argument("--format", choices=("flax", "safetensors"), default="flax")
    tiny.add_argument("--family", choices=FAMILIES, default="sd1", help="model family (default: sd1)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--controlnet", action="store_true", help="also a random ControlNet in FOLDER/controlnet")
    return parser


def split_options(
    arguments: dict[str, Any], extra: tuple[str, ...] = ()
) -> tuple[dict[str, Any], RunOptions, dict[str, Any]]:
    """(job options, run options, row settings): config file < command line for each; job defaults filled."""
    allowed = (*JOB_DEFAULTS, *RUN_OPTION_FIELDS, *ROW_FIELDS, *extra)
    from_file = read_settings_file(arguments.pop("config"), allowed) if arguments.get("config") else {}
    arguments.pop("config", None)
    layered = {**from_file, **arguments}
    job = {**JOB_DEFAULTS, **{k: v for k, v in layered.items() if k in JOB_DEFAULTS or k in extra}}
    options = RunOptions(**{k: v for k, v in layered.items() if k in RUN_OPTION_FIELDS})
    row = {k: v for k, v in layered.items() if k in ROW_FIELDS}
    return job, options, row


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
            from rival_jax.models.random_controlnet import write_tiny_controlnet
            from rival_jax.models.random_models import write_tiny_checkpoint

            folder, seed, weight_format, family = (arguments[k] for k in ("folder", "seed", "format", "family"))
            folder = write_tiny_checkpoint(folder, seed=seed, weight_format=weight_format, family=family)
            if arguments["controlnet"]:
                write_tiny_controlnet(folder / "controlnet", folder, seed=seed, weight_format=weight_format)
            print(folder)
            return 0
        if command == "evaluate":
            from rival_jax.jobs.evaluate import run_evaluate

            run_evaluate(arguments)
            return 0
        if command == "augment":
            from rival_jax.jobs.augment import run_augment_job

            extra = ("source", "batch_size", "coordinator", "num_processes", "process_id", "distributed")
            return run_augment_job(*split_options(arguments, extra))
        if command == "ablate":
            from rival_jax.jobs.ablate import run_ablate_job

            extra = ("source", "batch_size", "t_align_values", "t_early_values", "clip", "inception")
            return run_ablate_job(*split_options(arguments, extra))
        from rival_jax.jobs.generate import run_generate

        run_generate(*split_options(arguments, ("exemplar", "traces")))
        return 0
    except RivalError as error:
        print(f"rival-jax: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # the run itself failed (a full disk, a folder removed): nothing half-written
        print(f"rival-jax: failed: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
