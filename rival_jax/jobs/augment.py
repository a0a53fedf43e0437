"""Resumable dataset-augmentation jobs: many exemplars, many variations each, any number of hosts.

A job lists its source's rows (`data.sources.list_rows`: folders, manifests, Parquet, WebDataset,
`datasets`; no image is read yet), takes this process's share of the (row, variation) items by
stable row id, reads and hashes only those exemplars (`load_row`: the job key changes whenever the
output would), and hands every variation to a sink (`data.sinks.open_sink`: image files with a
Hugging Face `metadata.jsonl`, WebDataset shards or Parquet) that commits it atomically and records
it. A restarted job skips every item the sink reports finished, so a kill loses, duplicates or
truncates nothing and regenerates nothing that was finished; names and seeds come from row ids, so
inserting, removing or reordering sources generates only what is new.

With `--keep-best`/`--min-clip-image` (`jobs.filtering`) a variation is scored by CLIP against its
exemplar; dropped variations are recorded too (image-less), so a rerun does not make them again.
Work is split into contiguous blocks, one per process (`--shard I/N` or jax.distributed; whole rows
with `--keep-best`), so hosts share nothing but the output; each process's records go to its own file.
With `overwrite` a job starts over: what this process's records list is removed and generated again.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from rival_jax.data.sinks import OutputSpec, open_sink
from rival_jax.data.sources import Row, list_rows
from rival_jax.errors import RivalError
from rival_jax.jobs.common import Interrupted, check_control, load_pipeline, log, one_line, prepare_runtime
from rival_jax.jobs.common import show_progress as progress_wanted
from rival_jax.jobs.filtering import ClipFilter
from rival_jax.jobs.hosts import job_position, process_share
from rival_jax.jobs.locks import check_output, output_lock
from rival_jax.jobs.options import DEFAULT_BATCH_SIZE, AugmentOptions
from rival_jax.jobs.outcomes import Summary
from rival_jax.jobs.row_groups import Exemplar
from rival_jax.jobs.row_work import augment_rows
from rival_jax.jobs.settings import merge_settings
from rival_jax.options import RunOptions
from rival_jax.progress import CompileTimer


def _shares(rows: list[Row], index: int, count: int, whole_rows: bool) -> list[tuple[Row, list[int]]]:
    """This process's (row, variation indices): a contiguous block of items, or of whole rows."""
    if whole_rows:
        return [(row, list(range(row.settings["num_variations"]))) for row in process_share(rows, index, count)]
    shares: dict[str, tuple[Row, list[int]]] = {}
    items = [(row, i) for row in rows for i in range(row.settings["num_variations"])]
    for row, i in process_share(items, index, count):
        shares.setdefault(row.id, (row, []))[1].append(i)
    return list(shares.values())


def run_augment(
    pipe: Any,
    rows: list[Row],
    output: str | os.PathLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
    process_index: int = 0,
    process_count: int = 1,
    problems: list[str] | tuple[str, ...] = (),
    show_progress: bool = True,
    log: Callable[[str], None] = log,
    overwrite: bool = False,
    *,
    spec: OutputSpec | None = None,
    model: str | None = None,
    clip_filter: ClipFilter | None = None,
) -> Summary:
    """Generate every missing (row, variation) of this process's share into `output`.

    Args:
        pipe: the loaded `RivalPipeline`.
        rows: `list_rows(...).rows`, sorted by id; `problems`: its problem lines (process 0 reports and counts them).
        output: folder or fsspec URL; `spec` says how it is written (default: PNG files + metadata.jsonl).
        model: the model's name in every row's job key (default: the pipeline's folder).
        clip_filter: `--keep-best`/`--min-clip-image`; a row below its `keep_best` is skipped.
        overwrite: remove what this process's records list, and start over.

    Interrupted (Ctrl-C), it commits what is finished and raises `Interrupted` saying how much: every
    item is whole and recorded, so a rerun resumes after them.

    >>> listing = list_rows("train/", {"steps": 50}, model="tiny")
    >>> run_augment(pipe, listing.rows, "out", problems=listing.problems, spec=OutputSpec("webdataset"))
    """
    model = str(pipe.models.path) if model is None else model
    sink = open_sink(os.fspath(output), spec or OutputSpec(), process=process_index, overwrite=overwrite, log=log)
    done = sink.finished()
    summary = Summary()
    usable = []
    for row in rows:
        try:
            if clip_filter is not None:
                clip_filter.check_row(row.settings["num_variations"])
            usable.append(row)
        except RivalError as error:
            problems = [*problems, one_line(f"row {row.id} skipped: {error}")]
    if process_index == 0:
        summary.skipped_rows, summary.problems = len(problems), list(problems)
        for problem in problems:
            log(problem)
    whole_rows = clip_filter is not None and clip_filter.keep_best is not None
    shares = _shares(usable, process_index, process_count, whole_rows)
    total = sum(len(indices) for _, indices in shares)
    bar = tqdm(total=total, unit="img", desc="augment", disable=not show_progress, file=sys.stderr)
    wanted = {row.id: len(indices) for row, indices in shares}  # a row's items still to make or skip

    def report(row_id: str, kind: str, message: str) -> None:
        if kind == "skipped":
            summary.skipped_rows += 1
            bar.update(wanted.pop(row_id, 0))
        else:
            summary.failed_rows += 1
        summary.problems.append(one_line(f"row {row_id} {kind}: {message}"))
        log(summary.problems[-1])

    def loaded(row: Row, key: str, converted: bool, finished: list[int]) -> None:
        summary.converted += converted
        summary.already_done += len(finished)
        wanted[row.id] -= len(finished)
        bar.update(len(finished))

    def made(exemplar: Exemplar, index: int, image: Image.Image | None, described: dict, kept: bool) -> None:
        summary.generated += 1
        summary.dropped += not kept
        bar.update(1)

    started = time.perf_counter()
    try:
        with CompileTimer() as compiling, bar:
            work = {"model": model, "batch_size": batch_size, "sink": sink, "clip_filter": clip_filter}
            augment_rows(pipe, shares, done, **work, report=report, loaded=loaded, made=made)
    except KeyboardInterrupt:
        sink.close()
        finished = summary.generated + summary.already_done
        raise Interrupted(f"{finished} of {total} images finished in {output}") from None
    sink.close()
    summary.seconds, summary.compile_seconds = time.perf_counter() - started, compiling.seconds
    if summary.converted:
        log(f"{summary.converted} exemplars were converted to RGB (grayscale, CMYK or palette; alpha over white)")
    return summary


def _clip_filter(job: AugmentOptions) -> ClipFilter | None:
    from rival_jax.metrics.clip import load_clip

    if not job.filters:
        return None
    clip = load_clip(job.scoring_clip, job.cache_dir or True)
    weights = " (random weights: the scores mean nothing)" if clip.random_weights else ""
    log(f"filters: CLIP {job.scoring_clip}{weights}; keep best {job.keep_best}, min clip_image {job.min_clip_image}")
    return ClipFilter(clip, job.keep_best, job.min_clip_image)


def run_job(job: AugmentOptions, options: RunOptions, row: dict[str, Any]) -> int:
    """`rival-jax augment`: this process's share of a dataset, resumable.

    Every input and the output are checked, and a local output folder locked for this process index,
    before a model loads.

    Args:
        job: the job options (source, output and its format, filters, batch size, the multi-host options, ...).
        options: the pipeline's run options.
        row: settings every row starts from (a manifest row overrides them).

    Returns:
        The exit code: 0 when every row was done, 1 when any row was skipped or failed.

    >>> run_job(AugmentOptions(source="photos/", output="augmented"), RunOptions(), {"steps": 50})
    """
    from rival_jax.metrics.clip import check_clip_name

    defaults = merge_settings(row)
    if job.filters:
        check_clip_name(job.scoring_clip)
        ClipFilter(None, job.keep_best).check_row(defaults["num_variations"])
    output = check_output(job.output)
    listing = list_rows(job.source, row, model=str(job.model), split=job.split, prompt_column=job.prompt_column)
    for listed in listing.rows:  # every row's maps fit its ControlNets and variations, before anything runs
        try:
            check_control(options, listed.settings)
        except RivalError as error:
            raise RivalError(one_line(f"row {listed.id}: {error}")) from None
    if listing.extra_columns:
        log(f"columns carried into the metadata (not settings): {', '.join(listing.extra_columns)}")
    process_index, process_count = job_position(job)
    if process_count > 1:
        log(f"process {process_index} of {process_count}")
    with output_lock(output, process_index):
        if job.engine == "ray":  # Ray Data actors load the model; this process hands out the rows
            from rival_jax.jobs.ray_job import run_ray

            summary = run_ray(job, options, listing, output)
        else:
            prepare_runtime(job)
            pipe = load_pipeline(job, options)
            summary = run_augment(
                pipe,
                listing.rows,
                output,
                batch_size=job.batch_size,
                process_index=process_index,
                process_count=process_count,
                problems=listing.problems,
                show_progress=progress_wanted(job),
                overwrite=job.overwrite,
                spec=job.output_spec,
                model=str(job.model),
                clip_filter=_clip_filter(job),
            )
    log(summary.line())
    print(output)
    return summary.exit_code
