"""`rival-jax augment --engine ray`: the job's rows handed out to Ray Data actors as they finish.

The driver lists the rows (done by the caller, `data.sources.list_rows`), connects to the cluster
(`--address`; none: a Ray started here), and, when the output holds finished items, drops the rows
whose every variation is finished (Ray tasks read and hash the exemplars: the key needs the bytes).
The rest go to `--workers` actors (`jobs.ray_engine.RivalVariations`), a few rows per batch: a
shard's worth with a shard format, `4 x --batch-size` images with files. Each actor writes through
its own sink and re-checks the finished items before a batch, so a batch Ray retries after its actor
died is not written twice. The driver counts the actors' rows into the job's summary and rebuilds
`metadata.jsonl` at the end.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from tqdm.auto import tqdm

from rival_jax.data import storage
from rival_jax.data.sinks import OutputSpec, open_sink
from rival_jax.data.sources import Listing, load_row
from rival_jax.errors import RivalError
from rival_jax.jobs.common import log, show_progress
from rival_jax.jobs.outcomes import Summary
from rival_jax.jobs.ray_engine import RivalVariations, process_counter
from rival_jax.options import RunOptions

ADDRESS = re.compile(r"^(?:ray://)?(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})$")
_PROCESS_FILE = re.compile(r"^(?:records-|(?:shards|data)/)([0-9]{4})[-.]")


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (host:port, ray://host:port, auto; None: RAY_ADDRESS or a Ray started
    here); True when this call started Ray (so the caller shuts it down). Nothing loads before it answers.

    >>> connect("10.0.0.2:6379")
    True
    """
    match = ADDRESS.match(address or "")
    if address not in (None, "auto") and not match:
        raise RivalError(f"--address {address!r} is not a Ray address: use host:port, ray://host:port or auto")
    if match:
        try:
            socket.create_connection((match["host"].strip("[]"), int(match["port"])), timeout=5).close()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise RivalError(
                f"--address {address}: no Ray cluster answers ({reason}): start one (ray start --head) or fix it"
            ) from None
    if ray.is_initialized():  # a caller's own Ray (a script, the tests)
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"--address {address}: Ray cannot join it ({reason}): start a cluster or fix the address"
        raise RivalError(message) from None
    return True


def actor_resources(workers: int | None) -> tuple[int, dict[str, Any]]:
    """How many actors and what each asks for: a GPU, one TPU host's chips, else one CPU (one actor per node)."""
    total = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if total.get("GPU", 0) >= 1:
        return workers or int(total["GPU"]), {"num_gpus": 1}
    chips = max((node.get("TPU", 0) for node in nodes), default=0)
    if chips:
        return workers or int(total["TPU"] // chips), {"resources": {"TPU": chips}}
    return workers or max(1, len(nodes)), {"num_cpus": 1}


def start_over(output: str, spec: OutputSpec, log: Callable[[str], None]) -> None:
    """`--overwrite`: remove what every process's records list (and its shards), the driver's and each actor's."""
    found = {int(m[1]) for name in storage.list_files(output) if (m := _PROCESS_FILE.match(name))}
    for process in sorted(found | {0}):
        open_sink(output, spec, process=process, overwrite=True, log=log).close()


def _unfinished(row: bytes, done: Any, model: str) -> bool:
    """Whether a pickled row has a variation left to make (an unreadable row: yes, its actor reports it)."""
    row = pickle.loads(row)
    try:
        _, key, _ = load_row(row, model=model)
    except RivalError:
        return True
    finished = ray.get(done)
    return any((key, index) not in finished for index in range(row.settings["num_variations"]))


def run_ray(job: Any, options: RunOptions, listing: Listing, output: str, log: Callable[[str], None] = log) -> Summary:
    """Generate every missing (row, variation) of `listing` into `output` on Ray actors.

    Args:
        job: the `AugmentOptions` (`engine="ray"`, `address`, `workers`, and the local engine's options).
        options: the pipeline's run options.
        listing: `list_rows(job.source, ...)`; its problems are reported and counted here.
        output: the checked output folder or URL (reachable from every worker: a URL or a shared folder).
        log: where one-line notes go.

    >>> run_ray(AugmentOptions(source="s3://b/train", output="s3://b/out", engine="ray"), RunOptions(), listing, ...)
    """
    started = time.perf_counter()
    owned = connect(job.address)
    try:
        summary = _run(job, options, listing, output, log)
    finally:
        if owned:
            ray.shutdown()
    summary.seconds = time.perf_counter() - started
    return summary


def _run(job: Any, options: RunOptions, listing: Listing, output: str, log: Callable[[str], None]) -> Summary:
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = job.output_spec
    if job.overwrite:
        start_over(output, spec, log)
    summary = Summary(skipped_rows=len(listing.problems), problems=list(listing.problems))
    for problem in listing.problems:
        log(problem)
    total = sum(row.settings["num_variations"] for row in listing.rows)
    data = ray.data.from_items([{"row": pickle.dumps(row)} for row in listing.rows])
    done = open_sink(output, spec, process=0, overwrite=False, log=log).finished()
    rows = listing.rows
    if done:
        done_ref, model = ray.put(done), str(job.model)
        data = data.flat_map(lambda item: [item] if _unfinished(item["row"], done_ref, model) else []).materialize()
        rows = [pickle.loads(item["row"]) for item in data.iter_rows()]
    summary.already_done = total - sum(row.settings["num_variations"] for row in rows)
    workers, resources = actor_resources(job.workers)
    log(f"ray: {len(rows)} of {len(listing.rows)} rows to do, on {workers} workers, each with {resources}")
    if rows:
        items = spec.shard_size if spec.format != "files" else 4 * job.batch_size
        variations = max(1, round(total / len(listing.rows)))
        out = data.map_batches(
            RivalVariations,
            fn_constructor_kwargs=_constructor_kwargs(job, options, spec, output),
            batch_size=max(1, items // variations),
            compute=ray.data.ActorPoolStrategy(size=workers),
            **resources,
        )
        _count(out.iter_rows(), summary, total, show_progress(job), log)
    open_sink(output, spec, process=0, overwrite=False, log=log).close()  # metadata.jsonl from every record
    return summary


def _constructor_kwargs(job: Any, options: RunOptions, spec: OutputSpec, output: str) -> dict[str, Any]:
    """`RivalVariations`' arguments for the job's actors: the job's model, run options, output and filters; local
    paths made absolute (a worker's working folder is not the driver's)."""
    compile_cache = job.compile_cache if isinstance(job.compile_cache, bool) else _here(job.compile_cache)
    return {
        "model": _here(str(job.model)) if os.path.exists(str(job.model)) else str(job.model),
        "options": options,
        "batch_size": job.batch_size,
        "spec": spec,
        "output": output if storage.is_url(output) else _here(output),
        "processes": process_counter(),
        "clip": job.clip,
        "keep_best": job.keep_best,
        "min_clip_image": job.min_clip_image,
        "cache_dir": job.cache_dir and _here(job.cache_dir),
        "compile_cache": compile_cache,
    }


def _here(path: str | os.PathLike) -> str:
    """A local path as every worker on this machine finds it, whatever its working folder."""
    return os.path.abspath(path)


def _count(results: Any, summary: Summary, total: int, progress: bool, log: Callable[[str], None]) -> None:
    """The actors' rows counted into `summary` as they arrive; problems logged."""
    converted: set[str] = set()
    done = summary.already_done
    with tqdm(total=total, initial=done, unit="img", desc="augment", file=sys.stderr, disable=not progress) as bar:
        for row in results:
            status = row["status"]
            summary.compile_seconds = max(summary.compile_seconds, row["compile_seconds"])
            if row["converted"]:
                converted.add(row["source_id"])
            if status in ("generated", "dropped"):
                summary.generated += 1
                summary.dropped += status == "dropped"
            elif status == "done":
                summary.already_done += 1
            else:
                summary.skipped_rows += status == "skipped"
                summary.failed_rows += status == "failed"
                summary.problems.append(f"row {row['source_id']} {status}: {row['message']}")
                log(summary.problems[-1])
            bar.update(row["variation_index"] >= 0)
    summary.converted = len(converted)
    if converted:
        log(f"{len(converted)} exemplars were converted to RGB (grayscale, CMYK or palette; alpha over white)")
