"""Resumable dataset-augmentation jobs: many exemplars, many variations each, any number of hosts.

A job reads a manifest (CSV or JSONL; columns `image` plus any row setting of `settings.ROW_FIELDS`)
or a folder of images, and writes `images/r<row>_<stem>_v<index>.png` plus one JSONL record per
image into the output folder. Every image file is written atomically and carries its job key in a
PNG text chunk; its record is appended (and fsynced) afterwards. A restarted job skips every image
that has a record or a file carrying the right key, so killing it at any moment loses, duplicates
or truncates nothing and regenerates nothing that was finished.

Work is split into contiguous blocks of (row, variation) items, one block per process, so hosts
share nothing but the output folder; each process's records go to its own file.

Manifests are read by `jobs.manifest`.
With `overwrite` a job starts over: the images its records list are removed and generated again.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rival_jax import files
from rival_jax.jobs.common import (
    Interrupted,
    check_control,
    load_pipeline,
    log,
    one_line,
    prepare_runtime,
    show_progress,
)
from rival_jax.jobs.hosts import initialize_distributed, process_share
from rival_jax.jobs.locks import check_output, output_lock
from rival_jax.jobs.manifest import Row, read_rows
from rival_jax.jobs.options import DEFAULT_BATCH_SIZE, AugmentOptions
from rival_jax.jobs.records import RecordLog, finished_items, new_record, remove_stale_temporaries
from rival_jax.jobs.row_groups import run_rows
from rival_jax.jobs.settings import merge_settings
from rival_jax.options import RunOptions
from rival_jax.progress import CompileTimer


@dataclasses.dataclass
class Summary:
    generated: int = 0
    already_done: int = 0
    skipped_rows: int = 0
    failed_rows: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Generation rate, compile time excluded."""
        running = self.seconds - self.compile_seconds
        return self.generated / running if running > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every row was done, 1 when any row was skipped or failed."""
        return 1 if self.skipped_rows or self.failed_rows else 0

    def line(self) -> str:
        return (
            f"done: {self.generated} generated ({self.images_per_second:.2f} img/s, compile "
            f"{self.compile_seconds:.1f} s excluded), {self.already_done} already done; "
            f"rows skipped: {self.skipped_rows}, rows failed: {self.failed_rows}"
        )


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
) -> Summary:
    """Generate every missing (row, variation) of this process's share into `output`.

    `problems` are the rows `read_rows` could not use; process 0 reports and counts them. With
    `overwrite` the images this process's records list, and the records, are removed first: the
    job starts over (files no record lists are never removed; images of the same names are replaced).
    Interrupted (Ctrl-C), it raises `Interrupted` saying how many images are finished: every one of
    them is whole and recorded, so a rerun resumes after them.
    """
    output = Path(output)
    image_dir = output / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(image_dir)
    records = RecordLog(output / f"records-{process_index:04d}.jsonl")
    if overwrite:
        log(f"--overwrite: removed {records.start_over(output)} images the earlier run recorded in {output}")
    done = set() if overwrite else finished_items(output)
    summary = Summary()
    if process_index == 0:
        summary.skipped_rows, summary.problems = len(problems), list(problems)
        for problem in problems:
            log(problem)
    items = process_share(
        [(row, i) for row in rows for i in range(row.settings["num_variations"])], process_index, process_count
    )
    todo: dict[int, list[int]] = {}
    by_number = {row.number: row for row in rows}
    for row, index in items:
        if (row.key, index) in done:
            summary.already_done += 1
        elif not overwrite and (files.png_metadata(image_dir / row.file_name(index)) or {}).get("key") == row.key:
            records.append(new_record(row, index, pipe.random_weights, adopted=True))
            summary.already_done += 1
        else:
            todo.setdefault(row.number, []).append(index)
    started = time.perf_counter()
    bar = tqdm(
        total=sum(map(len, todo.values())), unit="img", desc="augment", disable=not show_progress, file=sys.stderr
    )

    def save(row: Row, index: int, image: Any) -> None:
        files.save_png(image, image_dir / row.file_name(index), {"key": row.key, "variation_index": index})
        records.append(new_record(row, index, pipe.random_weights))
        summary.generated += 1
        bar.update(1)

    def report(number: int, kind: str, message: str) -> None:
        if kind == "skipped":
            summary.skipped_rows += 1
            bar.update(len(todo[number]))
        else:
            summary.failed_rows += 1
        summary.problems.append(one_line(f"row {number} {kind}: {message}"))
        log(summary.problems[-1])

    try:
        with CompileTimer() as compiling, bar:
            work = [(by_number[number], indices) for number, indices in todo.items()]
            run_rows(pipe, work, batch_size, save, report)
    except KeyboardInterrupt:
        finished = summary.generated + summary.already_done
        raise Interrupted(f"{finished} of {len(items)} images finished in {output}") from None
    summary.seconds, summary.compile_seconds = time.perf_counter() - started, compiling.seconds
    return summary


def run_job(job: AugmentOptions, options: RunOptions, row: dict[str, Any]) -> int:
    """`rival-jax augment`: this process's share of a manifest or image folder, resumable.

    Every input and the output folder are checked, and the folder locked for this process index,
    before a model loads.

    Args:
        job: the job options (source, batch size, output, the multi-host options, ...).
        options: the pipeline's run options.
        row: settings every row starts from (a manifest row overrides them).

    Returns:
        The exit code: 0 when every row was done, 1 when any row was skipped or failed.

    >>> run_job(AugmentOptions(source="photos/", output="augmented"), RunOptions(), {"steps": 50})
    """
    check_control(options, merge_settings(row))
    output = check_output(job.output)
    rows, problems = read_rows(job.source, row, str(job.model))
    process_index, process_count = 0, 1
    if job.multi_host:
        process_index, process_count = initialize_distributed(job.coordinator, job.num_processes, job.process_id)
        log(f"process {process_index} of {process_count}")
    with output_lock(output, process_index):
        prepare_runtime(job)
        pipe = load_pipeline(job, options)
        summary = run_augment(
            pipe,
            rows,
            output,
            batch_size=job.batch_size,
            process_index=process_index,
            process_count=process_count,
            problems=problems,
            show_progress=show_progress(job),
            overwrite=job.overwrite,
        )
    log(summary.line())
    print(output)
    return summary.exit_code
