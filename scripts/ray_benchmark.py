"""Images per second of an augment job on the tiny model: the local engine, and Ray Data at 1 and 2 workers.

Every engine writes PNG files through the job's sinks. The local figure is the mean of two warm
runs (programs compiled) of `jobs.augment.run_augment`, one before and one after Ray's. The Ray
figures are `RivalVariations` actors fed as `augment --engine ray` feeds them (pickled rows,
`4 x batch size` images per Ray batch): each actor's steady rate is timed from its first batch's
results to its last (actor start, model load and compilation excluded; the time to the first
results is reported apart as "start"), and the actors' rates are added; Ray's
per-item overhead is the time per image at one worker minus the local engine's, and what Ray Data
alone costs is timed on a no-op actor in the same pipeline shape. A local Ray of `--cpus` CPUs is
started here.

    python scripts/ray_benchmark.py --rows 48 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rival_jax.data.sinks import OutputSpec
from rival_jax.data.sources import list_rows
from rival_jax.jobs.augment import run_augment
from rival_jax.models.random_models import write_tiny_checkpoint

SETTINGS = {"steps": 2, "num_variations": 2}
BATCH = 2


def exemplars(folder: Path, rows: int, side: int) -> Path:
    for index in range(rows):
        pixels = np.random.default_rng(index).integers(0, 255, (side, side, 3), dtype=np.uint8)
        (folder / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"class{index % 2}" / f"{index:04d}.png")
    return folder


def local_rate(pipe: Any, model: Path, source: Path, output: Path) -> float:
    """Images per second of a warm `run_augment` over every row into a new `output`."""
    rows = list_rows(str(source), SETTINGS, model=str(model)).rows
    started = time.perf_counter()
    summary = run_augment(pipe, rows, output, batch_size=BATCH, show_progress=False, model=str(model))
    return summary.generated / (time.perf_counter() - started)


def ray_rate(model: Path, source: Path, output: Path, workers: int, cache: str) -> tuple[float, float]:
    """(steady images per second, seconds to the first batch's results) of `workers` actors."""
    import ray

    from rival_jax.jobs.ray_engine import RivalVariations, process_counter

    rows = list_rows(str(source), SETTINGS, model=str(model)).rows
    kwargs = {"model": str(model), "batch_size": BATCH, "spec": OutputSpec(), "output": str(output)}
    kwargs |= {"processes": process_counter(), "compile_cache": cache}
    data = ray.data.from_items([{"row": pickle.dumps(row)} for row in rows])
    out = data.map_batches(
        RivalVariations,
        fn_constructor_kwargs=kwargs,
        batch_size=4 * BATCH // SETTINGS["num_variations"],
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    started, arrivals = time.perf_counter(), []
    for batch in out.iter_batches(batch_size=None):
        made = np.asarray(batch["status"]) == "generated"
        arrivals.append((time.perf_counter(), batch["key"][made][0], batch["variation_index"][made][0], made.sum()))
    owner = {}  # (key, variation index) -> the actor (sink process) that wrote it
    for path in output.glob("records-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            owner[record["key"], record["variation_index"]] = path.stem
    actors: dict[str, list[tuple[float, int]]] = {}
    for arrived, key, index, count in arrivals:
        actors.setdefault(owner[key, index], []).append((arrived, int(count)))
    steady = sum(
        sum(count for _, count in batches[1:]) / (batches[-1][0] - batches[0][0])
        for batches in actors.values()
        if len(batches) > 1
    )
    return steady, arrivals[0][0] - started


class Echo:
    """A stand-in for `RivalVariations` that generates nothing: each row's variations come back at once."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        count = len(batch["row"]) * SETTINGS["num_variations"]
        return {"status": ["generated"] * count, "metadata": ["{}"] * count, "image": [None] * count}


def ray_cost(rows: int, workers: int) -> float:
    """Milliseconds per image that Ray Data alone spends: the same pipeline shape, no generation."""
    import ray

    data = ray.data.from_items([{"row": pickle.dumps(index)} for index in range(rows)])
    out = data.map_batches(
        Echo, batch_size=4 * BATCH // SETTINGS["num_variations"], compute=ray.data.ActorPoolStrategy(size=workers)
    )
    arrivals = [(time.perf_counter(), len(batch["status"])) for batch in out.iter_batches(batch_size=None)]
    count = sum(count for _, count in arrivals[1:])  # from the first results: the actors' start left out
    return 1000 * (arrivals[-1][0] - arrivals[0][0]) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="exemplars (2 variations each)")
    parser.add_argument("--side", type=int, default=64, help="exemplar side in pixels")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="ray-benchmark-"))
    cache = str(work / "xla")
    model = write_tiny_checkpoint(work / "tiny", seed=0)
    source = exemplars(work / "train", args.rows, args.side)
    from rival_jax.pipeline import RivalPipeline
    from rival_jax.runtime import enable_compilation_cache

    enable_compilation_cache(cache)
    pipe = RivalPipeline.from_pretrained(model, cache_dir=None)
    local_rate(pipe, model, exemplars(work / "warm", 2, args.side), work / "warm-out")  # compiles
    before = local_rate(pipe, model, source, work / "local-before")
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {workers: ray_rate(model, source, work / f"ray{workers}", workers, cache) for workers in (1, 2)}
    machinery = ray_cost(2000, 1)
    ray.shutdown()
    local = (before + local_rate(pipe, model, source, work / "local-after")) / 2  # the machine's load drifts
    images = args.rows * SETTINGS["num_variations"]
    print(f"tiny model, {images} images of {args.side}x{args.side}, {SETTINGS['steps']} steps, batch {BATCH}")
    print(f"local engine: {local:.2f} img/s (mean of a run before and one after Ray's)")
    for workers, (rate, start) in results.items():
        print(f"ray, {workers} worker{'s' * (workers > 1)}: {rate:.2f} img/s steady (start {start:.1f} s)")
    overhead = 1000 * (1 / results[1][0] - 1 / local)
    print(f"ray per-item overhead at 1 worker: {overhead:.1f} ms per image (1/rate difference, in the noise)")
    print(f"ray data alone (a no-op actor, 2000 rows, 1 worker): {machinery:.2f} ms per image")


if __name__ == "__main__":
    main()
