"""`rival-jax`: parses the command line and hands it to the command's job (`rival_jax.jobs.<command>.run_job`).

Nothing here computes: each command's options are defined once in `jobs.options` (and `RunOptions`,
`jobs.settings`), turned into flags here, layered (defaults < task defaults < config file < command
line), validated, and given to the job before it loads anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from rival_jax.config import LATENT_INITS
from rival_jax.errors import RivalError
from rival_jax.jobs.common import Interrupted, one_line
from rival_jax.jobs.options import COMMANDS, CommonOptions, GenerateOptions, JobOptions
from rival_jax.jobs.settings import ROW_FIELDS, TASKS, read_settings_file
from rival_jax.options import FIELDS as RUN_OPTION_FIELDS
from rival_jax.options import RunOptions, add_arguments


def _add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Per-exemplar settings (`jobs.settings`) of the commands that generate; absent ones stay absent."""
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


def _takes_run_options(options_class: type[CommonOptions]) -> bool:
    """The model jobs, and commands that plan one (`RUN_OPTIONS`), take run options, settings and --config."""
    return issubclass(options_class, JobOptions) or getattr(options_class, "RUN_OPTIONS", False)


def build_parser() -> argparse.ArgumentParser:
    """Every command of `jobs.options.COMMANDS` with its flags; model jobs add settings, run options and --config."""
    parser = argparse.ArgumentParser(
        prog="rival-jax", description="RIVAL image variation with JAX/Flax Stable Diffusion."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command, options_class in COMMANDS.items():
        subparser = commands.add_parser(command, help=options_class.HELP)
        add_arguments(subparser, options_class)
        if _takes_run_options(options_class):
            if options_class is GenerateOptions:
                subparser.add_argument(
                    "--mask", default=argparse.SUPPRESS, help="inpainting mask, exemplar's size, white = redo"
                )
            _add_settings_arguments(subparser)
            add_arguments(subparser, RunOptions)
            subparser.add_argument(
                "--config", help="JSON or YAML file of settings (same names as these options, with underscores)"
            )
    return parser


def layer_options(
    options_class: type[CommonOptions], arguments: dict[str, Any]
) -> tuple[CommonOptions, RunOptions, dict[str, Any]]:
    """(job options, run options, row settings): config file < command line; validated on construction.

    Args:
        options_class: the command's job options (`jobs.options`).
        arguments: the parsed command line (absent flags absent), "config" naming an optional settings file.

    >>> job, options, row = layer_options(GenerateOptions, {"prompt": "a cat", "config": None})
    """
    job_fields = [field.name for field in dataclasses.fields(options_class)]
    config = arguments.pop("config", None)
    from_file = read_settings_file(config, (*job_fields, *RUN_OPTION_FIELDS, *ROW_FIELDS)) if config else {}
    layered = {**from_file, **arguments}
    job = options_class(**{k: v for k, v in layered.items() if k in job_fields})
    options = RunOptions(**{k: v for k, v in layered.items() if k in RUN_OPTION_FIELDS})
    return job, options, {k: v for k, v in layered.items() if k in ROW_FIELDS}


def _quiet_libraries() -> None:
    """Command-line output is ours: the libraries' notices about unused config keys are noise here."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code: 0 done, 1 failed or rows not done, 2 bad input, 130 interrupted."""
    arguments = vars(build_parser().parse_args(argv))
    command = arguments.pop("command")
    _quiet_libraries()
    try:
        options_class: type[CommonOptions] = COMMANDS[command]
        if _takes_run_options(options_class):
            inputs: tuple = layer_options(options_class, arguments)
        else:
            inputs = (options_class(**arguments),)
        job = importlib.import_module(f"rival_jax.jobs.{command.replace('-', '_')}")
        return job.run_job(*inputs)
    except RivalError as error:
        print(f"rival-jax: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # the run itself failed (a full disk, a folder removed): nothing half-written
        print(f"rival-jax: failed: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C: every file is whole, finished work is kept
        finished = interrupt.finished if isinstance(interrupt, Interrupted) else "nothing new was finished"
        print(f"rival-jax: interrupted: {one_line(finished)}; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
