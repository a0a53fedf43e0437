"""Augmentation on Ray Data: `RivalVariations`, a callable class for `ray.data.Dataset.map_batches`.

Each actor loads one `RivalPipeline`; a batch of exemplar rows goes in, one row per variation comes
out. Each row is the local job's work (`jobs.row_work.augment_rows`; ids, seeds and keys from
`data.sources`; metadata from `jobs.outcomes`; the filters of `jobs.filtering`), so every image is
pixel-identical to a one-process run's.

Without `output` the variations come back in the rows as encoded images (for `write_parquet`,
`write_webdataset`). With `output` each actor writes through its own sink (`data.sinks`, a process
index of its own from `process_counter`), drops the items any process finished before generating,
and has a batch's items committed before it returns the batch: a batch Ray retries after its
actor died makes only what the dead actor had not committed, and a rerun only what is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import posixpath
from typing import Any

import numpy as np
import ray
from PIL import Image

from rival_jax.data.encoding import encode, parse_size
from rival_jax.data.entries import jsonable, make_entry, relative_id
from rival_jax.data.sinks import OutputSpec, metadata_row, open_sink
from rival_jax.data.sources import Row, row_settings
from rival_jax.data.storage import is_url
from rival_jax.errors import RivalError
from rival_jax.jobs.common import log, one_line
from rival_jax.jobs.filtering import ClipFilter
from rival_jax.jobs.options import DEFAULT_BATCH_SIZE
from rival_jax.jobs.row_groups import Exemplar
from rival_jax.jobs.row_work import augment_rows
from rival_jax.options import RunOptions
from rival_jax.progress import CompileTimer

COLUMNS = ("image", "name", "key", "variation_index", "source_id", "status", "message", "converted", "metadata")
IMAGE_COLUMNS = ("image", "png", "jpg", "jpeg", "webp")
IDENTITY_COLUMNS = ("path", "__key__", "__url__", "cls", "json")
# Tests: a file at this path is taken (removed) by the first actor to write an item, which then dies.
FAULT = "RIVAL_JAX_RAY_FAULT"


@ray.remote(num_cpus=0)
class ProcessCounter:
    """Hands out sink process indices 1, 2, ... (0 is the driver's), one per actor start, restarts included."""

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> int:
        self.last += 1
        return self.last


def process_counter() -> Any:
    """A `ProcessCounter` owned by the caller, for `RivalVariations(output=..., processes=...)`.

    >>> processes = process_counter()
    """
    return ProcessCounter.remote()


def batch_rows(
    batch: dict[str, Any], settings: dict[str, Any], root: str | None = None, prompt_column: str | None = None
) -> tuple[list[Row], list[tuple[str, str]]]:
    """A Ray batch's exemplars as `data.sources` rows, and (id, problem) for each that cannot be used.

    A batch is a `row` column of pickled `Row`s (the CLI's driver), or exemplar columns: an image
    (`image`, `png`, `jpg`, `jpeg` or `webp`: decoded pixels, encoded bytes, a {"bytes", "path"} struct,
    or a path/URL), an identity (an `id` column; else `path` relative to `root`, as `read_images(...,
    include_paths=True)` gives, labelled by its first folder; else WebDataset's `__url__`/`__key__`, with
    `cls` and `json`), and any other columns (settings override `settings`; the rest is data).

    >>> rows, problems = batch_rows({"image": pixels, "path": paths}, {"steps": 50}, root="/data/train")
    """
    if "row" in batch:
        return [pickle.loads(data) for data in batch["row"]], []
    rows, problems = [], []
    for index in range(len(next(iter(batch.values())))):
        record = {name: column[index] for name, column in batch.items()}
        id, origin, label = _identity(record, root, index)
        try:
            image = next((record[c] for c in IMAGE_COLUMNS if c in record), None)
            if image is None:
                raise RivalError(f"no image column ({', '.join(IMAGE_COLUMNS)}): name the image column image")
            columns = _columns(record)
            entry = make_entry(id, origin, label, columns, _image_bytes(image))
            rows.append(Row(entry, row_settings(entry, settings, prompt_column)))
        except RivalError as error:
            problems.append((id, str(error)))
    return rows, problems


def _identity(record: dict[str, Any], root: str | None, index: int) -> tuple[str, str, str | None]:
    """(id, origin, label) of a row: its `path` under `root`, its WebDataset sample, or its place in the batch."""
    if "path" in record:
        path = str(record["path"])
        id = relative_id(path, root) if root else path
        return id, path, id.split("/")[0] if root and "/" in id else None
    if "__key__" in record:
        shard = posixpath.basename(str(record.get("__url__", "")).rstrip("/"))
        label = record.get("cls")
        label = label.decode("utf-8", "replace").strip() if isinstance(label, bytes) else label
        return f"{posixpath.splitext(shard)[0]}/{record['__key__']}", f"{shard}#{record['__key__']}", label
    return f"row-{index}", f"row {index}", None


def _columns(record: dict[str, Any]) -> dict[str, Any]:
    """A row's data columns, JSON-able: WebDataset's `json` member spread out, images and identities left out."""
    extra = record.get("json")
    extra = json.loads(extra) if isinstance(extra, (bytes, str)) else extra
    columns = dict(extra) if isinstance(extra, dict) else {}
    for name, value in record.items():
        if name in IMAGE_COLUMNS or name in IDENTITY_COLUMNS:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist() if value.ndim <= 1 and value.size <= 256 else None
        columns[name] = jsonable(value)
    return {k: v for k, v in columns.items() if v is not None}


def _image_bytes(image: Any) -> Any:
    """What `load_row` reads: encoded bytes as they are, decoded pixels as a PNG, a struct's bytes, or a path."""
    if isinstance(image, np.ndarray) and image.dtype != object:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    if isinstance(image, dict):
        return image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, str)):
        return bytes(image) if isinstance(image, bytes) else image
    raise RivalError(f"image cell of type {type(image).__name__} is not pixels, bytes or a path: give one of those")


class RivalVariations:
    """A Ray Data callable class: one loaded pipeline per actor, exemplar rows in, variation rows out.

    Args:
        model: a diffusers folder, hub id or tiny model, as `--model`.
        options: the pipeline's run options (`RunOptions`).
        settings: settings every row starts from (a row's columns override them), as `augment`'s flags.
        batch_size: variations per compiled batch.
        spec: how images are encoded (and, with `output`, written): `data.sinks.OutputSpec`.
        output: a folder or URL every actor writes to through its own sink; None: images in the rows.
        processes: a `process_counter()`, required with `output`: each actor's sink process index.
        root: the folder the `path` column is relative to (ids, labels and seeds as a folder source's).
        prompt_column, clip, keep_best, min_clip_image: as `augment`'s flags.
        cache_dir, compile_cache: as `augment`'s flags.

    Out: one row per variation, columns `COLUMNS`: the encoded image (None with `output`, or when
    dropped by a filter), its name (`cat/c_v0003`: the output stem and shard sample key), the row's
    key, the variation index, the source id, a status (generated, dropped, done: finished before,
    skipped or failed: the whole row, with a message), whether the exemplar was converted to RGB,
    the metadata as JSON text (the fields of `metadata.jsonl`), and the batch's compile seconds.

    >>> ds = ray.data.read_images("train/", include_paths=True, mode="RGB")
    >>> out = ds.map_batches(RivalVariations, fn_constructor_kwargs={"model": "tiny", "root": "train",
    ...     "settings": {"num_variations": 4}}, batch_size=2, compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1)
    >>> out.write_parquet("variations/")
    """

    def __init__(
        self,
        model: str = "tiny",
        *,
        options: RunOptions | None = None,
        settings: dict[str, Any] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        spec: OutputSpec | None = None,
        output: str | None = None,
        processes: Any = None,
        root: str | None = None,
        prompt_column: str | None = None,
        clip: str | None = None,
        keep_best: int | None = None,
        min_clip_image: float | None = None,
        cache_dir: str | None = None,
        compile_cache: bool | str = True,
    ) -> None:
        from rival_jax.jobs.common import load_pipeline, prepare_runtime
        from rival_jax.jobs.options import AugmentOptions

        if output is not None and processes is None:
            raise RivalError("RivalVariations(output=...) needs processes=process_counter() from the driver")
        job = AugmentOptions(
            source=root or ".",
            model=str(model),
            output=output or ".",
            batch_size=batch_size,
            cache_dir=cache_dir,
            compile_cache=compile_cache,
            clip=clip,
            keep_best=keep_best,
            min_clip_image=min_clip_image,
        )
        self.model, self.settings, self.root, self.prompt_column = str(model), settings or {}, root, prompt_column
        self.batch_size, self.spec, self.output = batch_size, spec or OutputSpec(), output
        self.process = None if output is None else ray.get(processes.next.remote())
        self.open = None
        prepare_runtime(job)
        self.pipe = load_pipeline(job, options or RunOptions())
        self.filter = None
        if job.filters:
            from rival_jax.metrics.clip import load_clip

            self.filter = ClipFilter(load_clip(job.scoring_clip, cache_dir or True), keep_best, min_clip_image)

    def _sink(self) -> Any:
        """This actor's sink: one for its life where each image commits on its own (files in a local folder),
        else one per batch, closed (committed) before the batch returns."""
        if self.output is not None and self.open is None:
            self.open = open_sink(self.output, self.spec, process=self.process, overwrite=False, log=log)
        return self.open

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows, problems = batch_rows(batch, self.settings, self.root, self.prompt_column)
        out: dict[str, list] = {name: [] for name in COLUMNS}
        sink = self._sink()
        done = set() if sink is None else sink.finished()
        converted: set[str] = set()

        def add(row: Row, key: str, index: int, status: str, image: bytes | None = None, described=None, message=""):
            text = json.dumps(metadata_row(key, index, described), default=str) if described else None
            values = (image, f"{row.name}_v{index:04d}" if index >= 0 else row.name, key, index, row.id, status)
            for name, value in zip(COLUMNS, (*values, message, row.id in converted, text), strict=True):
                out[name].append(value)

        by_id = {row.id: row for row in rows}

        def report(row_id: str, kind: str, message: str) -> None:
            add(by_id[row_id], "", -1, kind, message=one_line(message))

        def loaded(row: Row, key: str, was_converted: bool, finished: list[int]) -> None:
            if was_converted:
                converted.add(row.id)
            for index in finished:
                add(row, key, index, "done")

        def made(exemplar: Exemplar, index: int, image: Image.Image | None, described: dict, kept: bool) -> None:
            row, key, status = exemplar.row, exemplar.key, "generated" if kept else "dropped"
            if sink is not None:
                add(row, key, index, status, None, described)
                _fault()
                return
            data = None
            if image is not None:
                spec, stamp = self.spec, {"key": key, "variation_index": index}
                data = encode(image, spec.image_format, spec.quality, parse_size(spec.size), exemplar.image.size, stamp)
            add(row, key, index, status, data, described)

        for id, problem in problems:
            row = Row(make_entry(id, id, None, {}, b""), {})
            by_id[id] = row
            report(id, "skipped", problem)
        shares = [(row, list(range(row.settings["num_variations"]))) for row in rows]
        work = {"model": self.model, "batch_size": self.batch_size, "sink": sink, "clip_filter": self.filter}
        with CompileTimer() as compiling:
            augment_rows(self.pipe, shares, done, **work, report=report, loaded=loaded, made=made)
        if sink is not None and (self.spec.format != "files" or is_url(self.output)):
            sink.close()  # commits the batch's shard or records before Ray hears it is done
            self.open = None
        out["compile_seconds"] = [compiling.seconds] * len(out["status"])  # the driver takes the longest
        return out


def _fault() -> None:
    """The test fault (`FAULT`): the actor dies right after an item was committed, as if killed."""
    with contextlib.suppress(FileNotFoundError, TypeError):
        os.remove(os.environ.get(FAULT))  # only one actor removes it
        os._exit(1)
