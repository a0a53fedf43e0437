"""Image folders (ImageFolder: the first folder under the root is the label), CSV/JSONL manifests and the
authors' image configs, read as entries without reading a single image.

Paths in a manifest are relative to the folder holding the manifest (after following links to it);
URLs in it are kept as they are. The manifest's own path, like every command-line path, is relative
to the current folder, or a URL.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rival_jax.data import storage
from rival_jax.data.entries import IMAGE_SUFFIXES, Entry, Skipped, make_entry, relative_id
from rival_jax.errors import RivalError
from rival_jax.jobs.authors import image_entries
from rival_jax.jobs.settings import ROW_FIELDS

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
PATH_COLUMNS = ("mask", "control_image")


def folder_files(root: str) -> list[str]:
    """Every file under the folder `root` (a path or URL), posix and relative to it, sorted; hidden ones left out."""
    if storage.is_url(root):
        fs, path = storage.filesystem(root)
        prefix = path.rstrip("/") + "/"
        found = [p[len(prefix) :] for p in fs.find(path) if p.startswith(prefix)]
    else:
        found = [
            Path(folder, name).relative_to(root).as_posix()
            for folder, _, names in os.walk(root, followlinks=True)
            for name in names
        ]
    return sorted(f for f in found if not any(part.startswith(".") for part in f.split("/")))


def folder_entries(root: str, files: list[str]) -> Iterator[Entry]:
    """The image `files` of the folder `root` (from `folder_files`), labelled by their first folder."""
    for file in files:
        if posixpath.splitext(file)[1].lower() in IMAGE_SUFFIXES:
            location = storage.join(root, file)
            yield make_entry(file, location, file.split("/")[0] if "/" in file else None, {}, location)


def manifest_base(source: str) -> str:
    """The folder that relative paths in the manifest `source` are relative to."""
    if storage.is_url(source):
        return posixpath.dirname(source.rstrip("/"))
    return os.path.dirname(os.path.realpath(source))


def manifest_entries(source: str) -> Iterator[Entry | Skipped]:
    """The rows of a CSV or JSONL manifest: the `image` column locates the exemplar, every other is kept."""
    try:
        text = storage.read_bytes(source).decode("utf-8")
    except UnicodeDecodeError as error:
        raise RivalError(
            f"manifest {source} is not readable UTF-8 text ({type(error).__name__}): save it as UTF-8"
        ) from None
    base, file = manifest_base(source), posixpath.basename(source.rstrip("/"))
    for number, values in _records(source, text):
        where = f"{file}#{number}"
        if isinstance(values, RivalError):
            yield Skipped(where, str(values))
            continue
        image = values.get("image")
        if image in (None, ""):
            yield Skipped(where, "no image given")
        elif not isinstance(image, str) or not image.strip() or "\0" in image:
            yield Skipped(where, f"image {image!r} is not a file path: give a path relative to the manifest's folder")
        else:
            try:
                yield _manifest_entry(base, image, values, csv=source.lower().endswith(".csv"))
            except RivalError as error:
                yield Skipped(where, str(error))


def _manifest_entry(base: str, image: str, values: dict[str, Any], csv: bool) -> Entry:
    columns = {k: v for k, v in values.items() if k != "image"}
    maps = columns.get("control_image")
    if csv and isinstance(maps, str) and maps.lstrip().startswith("["):  # a CSV cell's list: JSON
        try:
            columns["control_image"] = json.loads(maps)
        except json.JSONDecodeError as error:
            fix = 'write ["a.png", "b.png"]'
            raise RivalError(f"control_image {maps!r} is not a JSON list ({error.msg}): {fix}") from None
    for name in PATH_COLUMNS:
        if columns.get(name) not in (None, ""):
            columns[name] = _joined(base, columns[name])
    location = storage.join(base, image)
    location = location if storage.is_url(location) else os.path.normpath(location)
    return make_entry(relative_id(location, base), location, None, columns, location)


def _joined(base: str, value: Any) -> Any:
    """A path (or the paths of a list, lists inside it too) joined to `base`; "canny" and non-paths kept."""
    if isinstance(value, list):
        return [_joined(base, v) for v in value]
    return storage.join(base, value) if isinstance(value, str) and value and value != "canny" else value


def _records(source: str, text: str) -> Iterator[tuple[int, dict[str, Any] | RivalError]]:
    """(row number, the row's columns or the reason it is unusable) for each row of a CSV or JSONL manifest."""
    if source.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise RivalError(f"manifest {source} has no 'image' column: its header must name one")
        for number, record in enumerate(_checked(source, reader)):
            if None in record:
                yield number, RivalError(f"more cells than the header's {len(reader.fieldnames)} columns")
            else:  # an empty setting cell means "not set"; an empty data cell is data
                yield number, {k: v for k, v in record.items() if k and (v != "" or k not in ROW_FIELDS)}
        return
    for number, line in enumerate(line for line in text.splitlines() if line.strip()):
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            yield number, RivalError(f"not valid JSON ({error.msg})")
            continue
        yield number, values if isinstance(values, dict) else RivalError("a JSONL row must be an object")


def _checked(source: str, reader: csv.DictReader) -> Iterator[dict[str, Any]]:
    try:
        yield from reader
    except csv.Error as error:
        raise RivalError(f"manifest {source} is not valid CSV ({error}): fix its quoting") from None


def authors_entries(source: str, defaults: dict[str, Any]) -> Iterator[Entry | Skipped]:
    """The rows of an image config of the authors' release (`jobs.authors`), named by their `exp_name`."""
    root = os.path.dirname(os.path.realpath(source))
    for number, values in image_entries(Path(source), defaults):
        if isinstance(values, RivalError):
            yield Skipped(f"{posixpath.basename(source)}#{number}", str(values))
            continue
        columns = {k: v for k, v in values.items() if k != "image"}
        yield make_entry(relative_id(values["image"], root), values["image"], None, columns, values["image"])
