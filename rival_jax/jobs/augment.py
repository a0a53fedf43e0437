"""Resumable dataset-augmentation jobs: many exemplars, many variations each, any number of hosts.

A job reads a manifest (CSV or JSONL; columns `image` plus any row setting of `settings.ROW_FIELDS`)
or a folder of images, and writes `images/r<row>_<stem>_v<index>.png` plus one JSONL record per
image into the output folder. Every image file is written atomically and carries its job key in a
PNG text chunk; its record is appended (and fsynced) afterwards. A restarted job skips every image
that has a record or a file carrying the right key, so killing it at any moment loses, duplicates
or truncates nothing and regenerates nothing that was finished.

Work is split into contiguous blocks of (row, variation) items, one block per process, so hosts
share nothing but the output folder; each process's records go to its own file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rival_jax import images
from rival_jax.core.parallel import initialize_distributed, process_share
from rival_jax.errors import RivalError
from rival_jax.jobs.batches import run_rows
from rival_jax.jobs.common import check_control, load_pipeline, log, prepare_runtime, show_progress
from rival_jax.jobs.settings import ROW_FIELDS, merge_settings, parse_text_value
from rival_jax.options import RunOptions
from rival_jax.progress import CompileTimer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Row:
    """One exemplar of a job with its resolved settings; `key` changes whenever its output would."""

    number: int
    image: Path
    settings: dict[str, Any]
    key: str

    def file_name(self, index: int) -> str:
        return f"r{self.number:06d}_{self.image.stem}_v{index:04d}.png"


@dataclasses.dataclass
class Summary:
    generated: int = 0
    already_done: int = 0
    skipped_rows: int = 0
    failed_rows: int = 0
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        rate = self.generated / self.seconds if self.seconds else 0.0
        return (
            f"done: {self.generated} generated ({rate:.2f} img/s), {self.already_done} already done; "
            f"rows skipped: {self.skipped_rows}, rows failed: {self.failed_rows}"
        )


def _row_key(image: Path, settings: dict[str, Any], model: str) -> str:
    digest = hashlib.sha256(image.read_bytes() if image.is_file() else b"missing")
    described = {k: settings[k] for k in ROW_FIELDS} | {"model": model}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _manifest_entries(source: Path) -> Iterator[tuple[int, dict[str, Any] | RivalError]]:
    """(row number, raw values or the reason the row is unusable) for a manifest file or image folder."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        yield from ((n, {"image": p.name}) for n, p in enumerate(files))
        return
    if not source.is_file():
        raise RivalError(f"manifest {source} does not exist: pass a CSV/JSONL manifest or a folder of images")
    if source.suffix.lower() == ".csv":
        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise RivalError(f"manifest {source} has no 'image' column: its header must name one")
            for n, record in enumerate(reader):
                yield n, {k: v for k, v in record.items() if k and v not in (None, "")}
        return
    if source.suffix.lower() not in (".jsonl", ".ndjson"):
        raise RivalError(f"manifest {source} must be .csv or .jsonl (or a folder of images)")
    for n, line in enumerate(line for line in source.read_text().splitlines() if line.strip()):
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            yield n, RivalError(f"not valid JSON ({error.msg})")
            continue
        yield n, values if isinstance(values, dict) else RivalError("a JSONL row must be an object")


def read_rows(source: str | os.PathLike, defaults: dict[str, Any], model: str) -> tuple[list[Row], list[str]]:
    """Rows with settings layered over `defaults`, and one message per unusable row.

    Relative image paths are relative to the manifest's folder. A row without a `seed` uses
    `defaults['seed'] + row number`, so rows get different noise.
    """
    source = Path(source)
    base = source if source.is_dir() else source.parent
    rows, problems = [], []
    for number, entry in _manifest_entries(source):
        try:
            if isinstance(entry, RivalError):
                raise entry
            unknown = sorted(set(entry) - {"image", *ROW_FIELDS})
            if unknown:
                raise RivalError(f"unknown column(s) {', '.join(unknown)}")
            if "image" not in entry:
                raise RivalError("no image given")
            values = {k: parse_text_value(k, v) if isinstance(v, str) else v for k, v in entry.items() if k != "image"}
            values.setdefault("seed", defaults.get("seed", 0) + number)
            if values.get("mask"):
                values["mask"] = str(base / values["mask"])
            if values.get("control_image"):
                maps = values["control_image"]
                values["control_image"] = [m if m == "canny" else str(base / m) for m in _as_list(maps)]
            settings = merge_settings(defaults, values)
            image = base / str(entry["image"])
            rows.append(Row(number, image, settings, _row_key(image, settings, model)))
        except RivalError as error:
            problems.append(f"row {number} skipped: {error}")
    return rows, problems


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _read_records(output: Path) -> set[tuple[str, int]]:
    done = set()
    for path in output.glob("records-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                done.add((record["key"], int(record["variation_index"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by a kill
    return done


class RecordLog:
    """Append-only JSONL of finished images; each line is flushed and fsynced before the next image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as handle:
                handle.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _remove_stale_temporaries(folder: Path) -> None:
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def run_augment(
    pipe: Any,
    rows: list[Row],
    output: str | os.PathLike,
    batch_size: int = 8,
    process_index: int = 0,
    process_count: int = 1,
    problems: list[str] | tuple[str, ...] = (),
    show_progress: bool = True,
    log: Callable[[str], None] = log,
) -> Summary:
    """Generate every missing (row, variation) of this process's share into `output`.

    `problems` are the rows `read_rows` could not use; process 0 reports and counts them.
    """
    output = Path(output)
    image_dir = output / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(image_dir)
    records = RecordLog(output / f"records-{process_index:04d}.jsonl")
    done = _read_records(output)
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
        elif (images.png_metadata(image_dir / row.file_name(index)) or {}).get("key") == row.key:
            records.append(_record(row, index, adopted=True))
            summary.already_done += 1
        else:
            todo.setdefault(row.number, []).append(index)
    started = time.perf_counter()
    bar = tqdm(
        total=sum(map(len, todo.values())), unit="img", desc="augment", disable=not show_progress, file=sys.stderr
    )

    def save(row: Row, index: int, image: Any) -> None:
        images.save_png(image, image_dir / row.file_name(index), {"key": row.key, "variation_index": index})
        records.append(_record(row, index))
        summary.generated += 1
        bar.update(1)

    def report(number: int, kind: str, message: str) -> None:
        if kind == "skipped":
            summary.skipped_rows += 1
            bar.update(len(todo[number]))
        else:
            summary.failed_rows += 1
        summary.problems.append(f"row {number} {kind}: {message}")
        log(summary.problems[-1])

    with bar:
        run_rows(pipe, [(by_number[number], indices) for number, indices in todo.items()], batch_size, save, report)
    summary.seconds = time.perf_counter() - started
    return summary


def _record(row: Row, index: int, adopted: bool = False) -> dict[str, Any]:
    settings = {k: v for k, v in row.settings.items() if k != "config"}
    return {
        "key": row.key,
        "row": row.number,
        "image": str(row.image),
        "variation_index": index,
        "file": f"images/{row.file_name(index)}",
        "settings": settings,
        "adopted": adopted,
    }


def run_augment_job(job: dict[str, Any], options: RunOptions, row: dict[str, Any]) -> int:
    """`rival-jax augment`: this process's share of a manifest or image folder, resumable.

    Args:
        job: `jobs.JOB_DEFAULTS` keys plus "source", "batch_size" and the multi-host options
            ("coordinator", "num_processes", "process_id", "distributed").
        options: the pipeline's run options.
        row: settings every row starts from (a manifest row overrides them).

    >>> run_augment_job({**JOB_DEFAULTS, "source": "photos/", "batch_size": 8, ...}, RunOptions(), {})
    """
    check_control(options, merge_settings(row))
    if job["batch_size"] < 1:
        raise RivalError(f"--batch-size {job['batch_size']} is out of range: use an integer >= 1")
    process_index, process_count = 0, 1
    if job["coordinator"] or job["distributed"]:
        process_index, process_count = initialize_distributed(
            job["coordinator"], job["num_processes"], job["process_id"]
        )
        log(f"process {process_index} of {process_count}")
    rows, problems = read_rows(job["source"], row, str(job["model"]))
    prepare_runtime(job)
    with CompileTimer() as compiling:
        pipe = load_pipeline(job, options)
        summary = run_augment(
            pipe,
            rows,
            job["output"],
            batch_size=job["batch_size"],
            process_index=process_index,
            process_count=process_count,
            problems=problems,
            show_progress=show_progress(job),
        )
    log(f"{summary.line()}; compile {compiling.seconds:.1f} s")
    print(Path(job["output"]))
    return 0
