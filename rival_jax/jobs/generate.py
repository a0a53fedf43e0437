"""`rival-jax generate`: one exemplar, every application; images, grid and a JSON sidecar written atomically."""

from __future__ import annotations

import hashlib
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from rival_jax import files, images
from rival_jax.data.entries import IMAGE_SUFFIXES
from rival_jax.errors import RivalError
from rival_jax.jobs.common import (
    Interrupted,
    check_control,
    load_pipeline,
    log,
    prepare_runtime,
    read_exemplar,
    show_progress,
)
from rival_jax.jobs.locks import SIDECAR, check_generate_output, output_lock, recorded_files, remove_files
from rival_jax.jobs.options import GenerateOptions
from rival_jax.jobs.settings import CONTROL_FIELDS, generation_arguments, merge_settings
from rival_jax.options import RunOptions
from rival_jax.progress import CompileTimer


def run_job(job: GenerateOptions, options: RunOptions, row: dict[str, Any]) -> int:
    """Invert the exemplar, generate, and write the variations, `exemplar.png`, `grid.png` and the sidecar.

    Every input and the output folder are checked before a model loads. A folder holding an earlier
    result is refused unless `job.overwrite`; then the files its sidecar (`SIDECAR`) recorded are
    removed right before the new ones are written (see `jobs.locks`). Interrupted while writing, the
    files this run wrote are removed again, so the folder never holds half a result.

    Args:
        job: the job options; `exemplar` None is the bundled photograph, `traces` also writes
            `traces.json` (see `core.traces`).
        options: the pipeline's run options.
        row: per-exemplar settings (`settings.ROW_FIELDS`).

    Returns:
        The exit code, 0.

    >>> run_job(GenerateOptions(exemplar="photo.jpg"), RunOptions(), {"prompt": "a cat"})
    """
    settings = merge_settings(row)
    check_control(options, settings)
    exemplar_path = job.exemplar or str(images.example_image())
    maps = _folder_maps(settings) or settings["control_image"]
    exemplar, mask, control_maps = read_exemplar(exemplar_path, settings["mask"], maps, options)
    output = check_generate_output(job.output, job.overwrite)
    with output_lock(output):
        _generate(job, options, settings, exemplar_path, (exemplar, mask, control_maps), output)
    return 0


def _folder_maps(settings: dict[str, Any]) -> list[str] | None:
    """A folder given as the one ControlNet's map: its images sorted by name, one per variation; else None."""
    maps = settings["control_image"]
    entry = maps[0] if isinstance(maps, list) and len(maps) == 1 else maps
    if not isinstance(entry, (str, Path)) or not Path(entry).is_dir():
        return None
    found = sorted(str(path) for path in Path(entry).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if len(found) != settings["num_variations"]:
        raise RivalError(
            f"control image folder {entry} holds {len(found)} maps for {settings['num_variations']} variations: "
            f"put one map per variation in it (used in name order) or pass -n {len(found)}"
        )
    return found


def _generate(job: GenerateOptions, options, settings, exemplar_path, inputs, output: Path) -> None:
    exemplar, mask, control_maps = inputs
    prepare_runtime(job)
    show = show_progress(job)
    started = time.perf_counter()
    with CompileTimer() as compiling:
        pipe = load_pipeline(job, options)
        clock = time.perf_counter()
        chain = pipe.invert(exemplar, settings["inversion_prompt"], settings["steps"], show_progress=show)
        inversion_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        result = pipe.generate(
            chain,
            **generation_arguments({**settings, "control_image": control_maps}),
            num_variations=settings["num_variations"],
            mask=mask,
            show_progress=show,
            return_traces=job.traces,
        )
        generation_seconds = time.perf_counter() - clock
    timings = {
        "compile_s": compiling.seconds,
        "inversion_s": inversion_seconds,
        "generation_s": generation_seconds,
        "total_s": time.perf_counter() - started,
        **{f"{label.replace(' ', '_')}_run_s": t["run_s"] for label, t in pipe.executables.timings.items()},
    }
    earlier = recorded_files(output)
    if earlier:
        log(f"--overwrite: removing the {remove_files(earlier)} files of the earlier result in {output}")
    written: list[Path] = []
    try:
        _write(job, options, settings, exemplar_path, (pipe, chain, result, timings), output, written)
    except KeyboardInterrupt:
        remove_files(written)
        raise Interrupted(f"no result was written to {output}") from None
    runs = ", ".join(f"{label} {t['run_s']:.1f} s" for label, t in pipe.executables.timings.items())
    log(f"compile {timings['compile_s']:.1f} s (tracing, compiling, cache reads); run: {runs}")
    print(output / "grid.png")


def _write(job, options, settings, exemplar_path, results, output: Path, written: list[Path]) -> None:
    """The images, then the sidecar last; each file written is added to `written` (to remove on Ctrl-C)."""
    pipe, chain, result, timings = results
    images_written = []
    for index, image in zip(result.indices, result.images, strict=True):
        name = f"variation-{int(index):03d}.png"
        written.append(files.save_png(image, output / name))
        images_written.append({"file": name, "variation_index": int(index), "seed": settings["seed"]})
    exemplar_png = chain.exemplar_image()
    written.append(files.save_png(exemplar_png, output / "exemplar.png"))
    written.append(files.save_png(images.grid([exemplar_png, *result.images]), output / "grid.png"))
    sidecar = {
        "rival_jax_version": metadata.version("rival-jax"),
        "model": str(job.model),
        "model_path": str(pipe.models.path),
        "family": pipe.models.family,
        "random_weights": pipe.random_weights,
        "dtype": str(np.dtype(pipe.dtype)),
        "size": list(chain.size),
        "run_options": {k: v for k, v in vars(options).items()},
        "reference_mode": result.reference_mode,
        "exemplar": str(exemplar_path),
        "exemplar_sha256": hashlib.sha256(Path(exemplar_path).read_bytes()).hexdigest(),
        "task": settings["task"],
        "prompt": settings["prompt"],
        "inversion_prompt": settings["inversion_prompt"],
        "negative_prompt": settings["negative_prompt"],
        "mask": settings["mask"],
        **{name: settings[name] for name in CONTROL_FIELDS},
        "num_inference_steps": settings["steps"],
        "seed": settings["seed"],
        "config": settings["config"].as_dict(),
        "authors_t_align": settings["authors_t_align"],
        "images": images_written,
        "files": [*(f["file"] for f in images_written), "exemplar.png", "grid.png", SIDECAR],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "devices": f"{pipe.mesh.size} x {pipe.mesh.devices.flat[0].device_kind}",
    }
    if result.traces is not None:
        written.append(files.save_json(result.traces.as_json(), output / "traces.json"))
        sidecar["traces"] = "traces.json"
    written.append(files.save_json(sidecar, output / SIDECAR))
