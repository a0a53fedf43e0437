"""Manifests of augmentation jobs: CSV, JSONL, a folder of images, or an image config of the authors' release.

Paths in a manifest are relative to the folder holding the manifest (after following links to it);
the manifest's own path, like every command-line path, is relative to the current folder.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rival_jax.errors import RivalError
from rival_jax.jobs.authors import image_entries, is_image_config
from rival_jax.jobs.common import one_line
from rival_jax.jobs.settings import ROW_FIELDS, merge_settings, parse_text_value

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


def _row_key(image: Path, settings: dict[str, Any], model: str) -> str:
    digest = hashlib.sha256(image.read_bytes() if image.is_file() else b"missing")
    described = {k: settings[k] for k in ROW_FIELDS if k != "authors_t_align"} | {"model": model}
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
    try:
        source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RivalError(
            f"manifest {source} is not readable UTF-8 text ({type(error).__name__}): save it as UTF-8"
        ) from None
    if source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise RivalError(f"manifest {source} has no 'image' column: its header must name one")
            for n, record in enumerate(reader):
                if None in record:
                    yield n, RivalError(f"more cells than the header's {len(reader.fieldnames)} columns")
                    continue
                yield n, {k: v for k, v in record.items() if k and v not in (None, "")}
        return
    if source.suffix.lower() not in (".jsonl", ".ndjson"):
        raise RivalError(f"manifest {source} must be .csv or .jsonl (or a folder of images)")
    for n, line in enumerate(line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()):
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            yield n, RivalError(f"not valid JSON ({error.msg})")
            continue
        yield n, values if isinstance(values, dict) else RivalError("a JSONL row must be an object")


def read_rows(source: str | os.PathLike, defaults: dict[str, Any], model: str) -> tuple[list[Row], list[str]]:
    """Rows with settings layered over `defaults`, and one message per unusable row.

    Relative paths in the manifest (image, mask, control_image) are relative to the folder holding
    the manifest after following links (a folder source: that folder). A row without a `seed` uses
    `defaults['seed'] + row number`, so rows get different noise. A manifest without rows is an error.
    `source` may also be an image config of the authors' release (`jobs.authors`).
    """
    source = Path(source)
    base = Path(os.path.realpath(source))
    base = base if source.is_dir() else base.parent
    rows, problems = [], []
    entries = image_entries(source, defaults) if is_image_config(source) else _manifest_entries(source)
    for number, entry in entries:
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
            if values.get("mask") is not None:
                values["mask"] = str(_manifest_path(base, values["mask"], "mask"))
            if values.get("control_image") is not None:
                maps = values["control_image"]
                maps = maps if isinstance(maps, list) else [maps]
                values["control_image"] = [
                    m if m == "canny" else str(_manifest_path(base, m, "control_image")) for m in maps
                ]
            settings = merge_settings(defaults, values)
            image = _manifest_path(base, entry["image"], "image")
            rows.append(Row(number, image, settings, _row_key(image, settings, model)))
        except RivalError as error:
            problems.append(one_line(f"row {number} skipped: {error}"))
    if not rows and not problems:
        what = "folder" if source.is_dir() else "manifest"
        raise RivalError(f"{what} {source} has no rows: add images ({', '.join(IMAGE_SUFFIXES)}) or manifest lines")
    return rows, problems


def _manifest_path(base: Path, value: Any, name: str) -> Path:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise RivalError(f"{name} {value!r} is not a file path: give a path relative to the manifest's folder")
    return base / value
