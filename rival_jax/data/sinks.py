"""Where an augmentation job's images go: files, WebDataset or Parquet, in a local folder or at a URL.

Layout of an output OUT (docs/datasets-out.md):
- files: `images/<name>_v0003.<ext>` (the source's folders mirrored) and `metadata.jsonl`, the Hugging
  Face imagefolder index, rebuilt at `close` from every process's records;
- webdataset: `shards/<process>-<n>.tar`; parquet: `data/<process>-<n>.parquet` (see `data.shards`);
- every format: each process's records (`data.records`).
An image is written before its record, a shard committed whole before its records, so a kill loses at
most the open shard (or the unrecorded tail); `finished` adopts what was written whole but not
recorded (the stamp inside an image file, the samples of a committed shard), and only by the process
that wrote it, so no file is listed by two records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from rival_jax.data import storage
from rival_jax.data.encoding import EXTENSIONS, check_image_format, encode, parse_size, read_stamp
from rival_jax.data.records import RecordLog, load_records, records_lock
from rival_jax.data.shards import SHARD_FOLDERS, Shard, read_shard, shard_file, shard_number
from rival_jax.errors import RivalError

FORMATS = ("files", "webdataset", "parquet")
FIRST_FIELDS = ("label", "source_id", "source", "variation_index", "seed")
INDEX = "metadata.jsonl"
_OUTPUT_FOLDERS = ("images", *SHARD_FOLDERS.values())
STALE_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """How a job writes its images; checked on creation (one `RivalError` line per bad value).

    >>> OutputSpec(format="webdataset", image_format="jpeg", quality=90, size="512x512", shard_size=500)
    """

    format: str = "files"
    image_format: str = "png"
    quality: int = 95
    size: str = "model"
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise RivalError(f"output format {self.format!r} is not one of {', '.join(FORMATS)}: pass one of them")
        check_image_format(self.image_format, self.quality)
        parse_size(self.size)
        if self.shard_size < 1:
            raise RivalError(f"shard size {self.shard_size} is below 1: pass e.g. --shard-size 1000")


@dataclasses.dataclass(frozen=True)
class Item:
    """One generated variation as the job hands it to the sink.

    >>> Item("3fa2...", 3, "cat/indoor/c", {"label": "cat", "source_id": "cat/indoor/c.png"}, (640, 480))
    """

    key: str
    variation_index: int
    name: str
    metadata: dict[str, Any]
    source_size: tuple[int, int]


def metadata_row(key: str, variation_index: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """An item's metadata as outputs carry it: `FIRST_FIELDS` first, then the other fields, then its key."""
    row = {field: metadata.get(field) for field in FIRST_FIELDS} | {"variation_index": variation_index}
    return row | {k: v for k, v in metadata.items() if k not in row} | {"key": key}


def _record(key: str, index: int, metadata: dict, file: str | None, adopted: bool, sample: str | None = None) -> dict:
    record = {"key": key, "variation_index": index, "file": file, "metadata": metadata, "adopted": adopted}
    return record | ({"sample": sample} if sample is not None else {})


def _inside(file: object) -> bool:
    """Whether a recorded file name is one a sink writes (so `--overwrite` may remove it)."""
    if not isinstance(file, str):
        return False
    parts = file.split("/")
    return len(parts) >= 2 and parts[0] in _OUTPUT_FOLDERS and not {"", ".", ".."} & set(parts) and "\\" not in file


class Sink:
    """Writes one process's items into an output; made by `open_sink`."""

    def __init__(self, output: str, spec: OutputSpec, process: int, overwrite: bool, log: Callable[[str], None]):
        self.output, self.spec, self.process, self.overwrite, self.log = output, spec, process, overwrite, log
        self.url = storage.is_url(output)
        self._folder = SHARD_FOLDERS.get(spec.format, "images")
        self.records = RecordLog(output, process)
        self._remove_temporaries()
        if overwrite:
            log(f"--overwrite: removed {self._start_over()} files the earlier run recorded in {output}")
        numbers = [n for file in self._shard_files() if (n := shard_number(file, spec.format, process)) is not None]
        self._next = max(numbers, default=0) + 1
        self._shard: Shard | None = None
        self._shard_name = ""
        self._pending: list[dict[str, Any]] = []
        self._closed = False

    def _location(self, file: str) -> str:
        return storage.join(self.output, file)

    def _shard_files(self) -> list[str]:
        if self.spec.format == "files":
            return []
        return [f"{self._folder}/{name}" for name in storage.list_files(self._location(self._folder))]

    def _remove_temporaries(self) -> None:
        """Temporaries a killed run left behind: this process's shards', and image files' older than a minute
        (a live write takes milliseconds; their names do not say which process writes them)."""
        if self.url:
            return
        for folder in _OUTPUT_FOLDERS:
            prefix = "." if folder == "images" else f".{self.process:04d}-"
            for stale in Path(self._location(folder)).rglob(f"{prefix}*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if folder != "images" or time.time() - stale.stat().st_mtime > STALE_SECONDS:
                        stale.unlink()

    def _start_over(self) -> int:
        listed = {r["file"] for r in self.records.own() if _inside(r["file"])}
        listed |= {f for f in self._shard_files() if shard_number(f, self.spec.format, self.process) is not None}
        for file in listed:
            storage.remove(self._location(file))
        self.records.remove()
        return len(listed)

    def finished(self) -> set[tuple[str, int]]:
        """(key, variation index) of every item any process committed in this format (or dropped); this process's
        whole but unrecorded files and shard samples are adopted (recorded now). With `overwrite`: none."""
        if self.overwrite:
            return set()
        records = load_records(self.output)
        listed = {r["file"] for r in records}
        adopted = self._adopt_files(listed) if self.spec.format == "files" else self._adopt_shards(listed)
        self.records.append(adopted)
        folder = f"{self._folder}/"
        return {(r["key"], r["variation_index"]) for r in records + adopted if (r["file"] or folder).startswith(folder)}

    def _adopt_files(self, listed: set[str]) -> list[dict[str, Any]]:
        adopted = []
        for name in storage.list_files(self._location("images")):
            file = f"images/{name}"
            if file in listed or posixpath.basename(name).startswith("."):
                continue
            stamp = read_stamp(storage.read_bytes(self._location(file))) or {}
            if stamp.get("file") == file and stamp.get("process") == self.process:
                metadata = stamp.get("metadata", {})
                adopted.append(_record(stamp["key"], stamp["variation_index"], metadata, file, True))
        return adopted

    def _adopt_shards(self, listed: set[str]) -> list[dict[str, Any]]:
        adopted = []
        for file in self._shard_files():
            if file in listed or shard_number(file, self.spec.format, self.process) is None:
                continue
            samples = read_shard(self._location(file), self.spec.format)
            if samples is None:
                self.log(f"{self._location(file)} is damaged: its items are generated again; remove it")
                continue
            for sample, row in samples:
                metadata = {k: v for k, v in row.items() if k != "key"}
                adopted.append(_record(row["key"], row["variation_index"], metadata, file, True, sample))
        return adopted

    def add(self, item: Item, image: Image.Image | None) -> None:
        """Write `item`'s image (None: a filter dropped it, only its record is kept) and, once it is committed,
        its record: at once for files in a local folder, with its shard, or every `shard_size` items on a URL."""
        record = _record(item.key, item.variation_index, dict(item.metadata), None, False)
        if image is not None:
            stem = f"{item.name}_v{item.variation_index:04d}"
            record["file"] = f"images/{stem}.{EXTENSIONS[self.spec.image_format]}"
            if not _inside(record["file"]):
                raise ValueError(f"item name {item.name!r} is not a relative posix path inside the output")
            if self.spec.format != "files":
                if self._shard is None:
                    self._shard_name = shard_file(self.spec.format, self.process, self._next)
                    self._shard, self._next = Shard(self.spec.format, self._location(self._shard_name)), self._next + 1
                record["file"] = self._shard_name
            stamp = {"key": item.key, "variation_index": item.variation_index, "file": record["file"]}
            stamp |= {"process": self.process} | ({"metadata": record["metadata"]} if self._shard is None else {})
            spec, size = self.spec, parse_size(self.spec.size)
            data = encode(image, spec.image_format, spec.quality, size, item.source_size, stamp)
            if self._shard is None:
                storage.write_bytes(self._location(record["file"]), data)
            else:
                row = metadata_row(item.key, item.variation_index, record["metadata"])
                record["sample"] = self._shard.add(stem, EXTENSIONS[spec.image_format], data, row)
        self._pending.append(record)
        full = len(self._shard) >= self.spec.shard_size if self._shard else len(self._pending) >= self.spec.shard_size
        if full or (self.spec.format == "files" and not self.url):
            self._commit()

    def _commit(self) -> None:
        if self._shard is not None:
            self._shard.commit()
            self._shard = None
        self.records.append(self._pending)
        self._pending = []

    def close(self) -> None:
        """Commit the open shard and the pending records; for files, rebuild `metadata.jsonl` from every
        process's records (under a lock on a local folder, so the last process to close writes it whole)."""
        if self._closed:
            return
        self._commit()
        self._closed = True
        if self.spec.format == "files":
            with records_lock(self.output):
                present = {f"images/{name}" for name in storage.list_files(self._location("images"))}
                rows = {
                    r["file"]: {"file_name": r["file"]} | metadata_row(r["key"], r["variation_index"], r["metadata"])
                    for r in load_records(self.output)
                    if r["file"] in present
                }
                text = "".join(json.dumps(rows[file], default=str) + "\n" for file in sorted(rows))
                storage.write_bytes(self._location(INDEX), text.encode())


def open_sink(
    output: str | os.PathLike, spec: OutputSpec, *, process: int, overwrite: bool, log: Callable[[str], None]
) -> Sink:
    """The sink of process `process` into `output` (a folder or fsspec URL).

    Args:
        output: the job's output folder or URL (`s3://bucket/out`).
        spec: format, image format and quality, size, shard size.
        process: this process's index; its records and shards carry it.
        overwrite: remove what this process's records list (and its shards) and start over.
        log: where one-line notes go (the job's `log`).

    >>> sink = open_sink("out", OutputSpec(), process=0, overwrite=False, log=print)
    >>> done = sink.finished(); sink.add(item, image); sink.close()
    """
    return Sink(os.fspath(output), spec, process, overwrite, log)
