"""The records of an augmentation job: one JSONL line per finished image, appended safely, read forgivingly.

Each process of a job appends to its own `records-<process>.jsonl`; a line cut short by a kill is
ignored on reading, and a line a full disk cut short is removed at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rival_jax.jobs.outputs import remove_files


def _records(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
            yield {"key": str(record["key"]), "variation_index": int(record["variation_index"]), "file": record["file"]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut short by a kill


def finished_items(output: Path) -> set[tuple[str, int]]:
    """(job key, variation index) of every image any process of the job recorded in `output`."""
    return {(r["key"], r["variation_index"]) for path in output.glob("records-*.jsonl") for r in _records(path)}


class RecordLog:
    """Append-only JSONL of finished images; each line is flushed and fsynced before the next image.

    A failed append (a full disk) is cut back off, so the file never holds half a line.
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
            except OSError:
                handle.truncate(size)
                raise

    def start_over(self, output: Path) -> int:
        """Remove the images these records list (inside `output/images`), then the records; how many images."""
        listed = [output / f for r in _records(self.path) if _is_image_name(f := r["file"])]
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
