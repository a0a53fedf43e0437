"""The records of an augmentation job: one JSONL line per finished image, appended safely, read forgivingly.

Each process of a job appends to its own `records-<process>.jsonl`; a line cut short by a kill is
ignored on reading, and a line a full disk cut short is removed at once. Records are written by
`new_record` and read by `read_records`, here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rival_jax.jobs.locks import remove_files
from rival_jax.jobs.manifest import Row

RECORDS_GLOB = "records-*.jsonl"


@dataclasses.dataclass(frozen=True)
class Record:
    """One finished image: its job key and variation, its file (relative to the job's folder), its exemplar,
    its prompt, and whether the generator had random weights (None in records written before that was kept).
    """

    key: str
    variation_index: int
    file: str
    image: Path
    prompt: str
    random_weights: bool | None


def new_record(row: Row, index: int, random_weights: bool, adopted: bool = False) -> dict[str, Any]:
    """The JSON record of variation `index` of `row`; `adopted`: found already written, not generated now."""
    return {
        "key": row.key,
        "row": row.number,
        "image": str(row.image),
        "variation_index": index,
        "file": f"images/{row.file_name(index)}",
        "settings": {k: v for k, v in row.settings.items() if k != "config"},
        "random_weights": random_weights,
        "adopted": adopted,
    }


def _records(path: Path) -> Iterator[Record]:
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            values = json.loads(line)
            weights = values.get("random_weights")
            yield Record(
                str(values["key"]),
                int(values["variation_index"]),
                str(values["file"]),
                Path(values["image"]),
                str(values["settings"]["prompt"]),
                weights if isinstance(weights, bool) else None,
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue  # a line cut short by a kill


def read_records(output: Path) -> list[Record]:
    """Every record any process of the job wrote in `output`, in process order."""
    return [record for path in sorted(output.glob(RECORDS_GLOB)) for record in _records(path)]


def finished_items(output: Path) -> set[tuple[str, int]]:
    """(job key, variation index) of every image any process of the job recorded in `output`."""
    return {(record.key, record.variation_index) for record in read_records(output)}


class RecordLog:
    """Append-only JSONL of finished images; each line is flushed and fsynced before the next image.

    A failed or interrupted append is cut back off, so the file never holds half a line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as handle:
                handle.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            size = handle.tell()
            try:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:  # a full disk, or Ctrl-C mid-line
                handle.truncate(size)
                raise

    def start_over(self, output: Path) -> int:
        """Remove the images these records list (inside `output/images`), then the records; how many images."""
        listed = [output / f for r in _records(self.path) if _is_image_name(f := r.file)]
        removed = remove_files([p for p in listed if p.is_file()])
        self.path.unlink(missing_ok=True)
        return removed


def remove_stale_temporaries(folder: Path) -> None:
    """Temporaries of atomic writes a killed run left behind."""
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _is_image_name(name: object) -> bool:
    if not isinstance(name, str):
        return False
    parts = name.split("/")
    return len(parts) == 2 and parts[0] == "images" and parts[1] not in ("", ".", "..")
