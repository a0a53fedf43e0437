"""`rival-jax generate`: one exemplar, every application; images, grid and a JSON sidecar written atomically."""

from __future__ import annotations

import hashlib
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from rival_jax import example_image, images
from rival_jax.jobs.common import (
    check_control,
    check_job,
    load_pipeline,
    log,
    prepare_runtime,
    read_exemplar,
    show_progress,
)
from rival_jax.jobs.outputs import check_generate_output, output_lock, recorded_files, remove_files
from rival_jax.jobs.settings import CONTROL_FIELDS, generation_arguments, merge_settings
from rival_jax.options import RunOptions
from rival_jax.progress import CompileTimer


def run_generate(job: dict[str, Any], options: RunOptions, row: dict[str, Any]) -> Path:
    """Invert the exemplar, generate, and write the variations, `exemplar.png`, `grid.png` and `rival.json`.

    Every input and the output folder are checked before a model loads. A folder holding an earlier
    result is refused unless `job["overwrite"]`; then the files its `rival.json` recorded are removed
    right before the new ones are written (see `jobs.outputs`).

    Args:
        job: `jobs.JOB_DEFAULTS` keys plus "exemplar" (a path; default: the bundled photograph) and
            "traces" (also write `traces.json`, see `core.traces`; default off).
        options: the pipeline's run options.
        row: per-exemplar settings (`settings.ROW_FIELDS`).

    >>> run_generate({**JOB_DEFAULTS, "exemplar": "photo.jpg"}, RunOptions(), {"prompt": "a cat"})
    """
    check_job(job)
    settings = merge_settings(row)
    check_control(options, settings)
    exemplar_path = job.get("exemplar") or str(example_image())
    exemplar, mask, control_maps = read_exemplar(exemplar_path, settings["mask"], settings["control_image"], options)
    output = check_generate_output(job["output"], job["overwrite"])
    with output_lock(output):
        return _generate(job, options, settings, exemplar_path, (exemplar, mask, control_maps), output)


def _generate(job, options, settings, exemplar_path, inputs, output: Path) -> Path:
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
            return_traces=bool(job.get("traces", False)),
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
    files = []
    for index, image in zip(result.indices, result.images, strict=True):
        name = f"variation-{int(index):03d}.png"
        images.save_png(image, output / name)
        files.append({"file": name, "variation_index": int(index), "seed": settings["seed"]})
    exemplar_png = chain.exemplar_image()
    images.save_png(exemplar_png, output / "exemplar.png")
    images.save_png(images.grid([exemplar_png, *result.images]), output / "grid.png")
    sidecar = {
        "rival_jax_version": metadata.version("rival-jax"),
        "model": str(job["model"]),
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
        "images": files,
        "files": [*(f["file"] for f in files), "exemplar.png", "grid.png", "rival.json"],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "devices": f"{pipe.mesh.size} x {pipe.mesh.devices.flat[0].device_kind}",
    }
    if result.traces is not None:
        images.save_json(result.traces.as_json(), output / "traces.json")
        sidecar["traces"] = "traces.json"
    images.save_json(sidecar, output / "rival.json")
    runs = ", ".join(f"{label} {t['run_s']:.1f} s" for label, t in pipe.executables.timings.items())
    log(f"compile {timings['compile_s']:.1f} s (tracing, compiling, cache reads); run: {runs}")
    print(output / "grid.png")
    return output
