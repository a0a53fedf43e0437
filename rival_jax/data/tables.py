"""Parquet files and `datasets` datasets (a `save_to_disk` folder or a hub id) read as entries, and their
image cells read back one at a time.

The image column is `image` (else the first bytes or {"bytes", "path"} column, else a `file_name` or
`image_path` text column): path text (relative to the Parquet file's folder, or a URL), image bytes,
or the Hugging Face {"bytes", "path"} struct. Listing reads the other columns and the paths only.
A row's id is its `id` column, else its image path when every row of the source has a distinct one,
else "<file>#<row>" (Parquet) or "<split>#<row>" (`datasets`): those change when rows are inserted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import posixpath
import re
from collections.abc import Iterator
from typing import Any

from rival_jax.data import storage
from rival_jax.data.entries import Entry, Skipped, jsonable, make_entry, relative_id
from rival_jax.errors import RivalError

PATH_COLUMNS = ("file_name", "image_path")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Cell:
    """The image cell of row `row` of a Parquet file (bytes, or a {"bytes", "path"} struct)."""

    file: str
    row: int
    column: str


@dataclasses.dataclass(frozen=True)
class DatasetRow:
    """The image of row `index` of a `datasets` dataset (a `save_to_disk` folder or hub id) and split."""

    source: str
    split: str | None
    index: int
    column: str


def cell_bytes(cell: Cell | DatasetRow) -> bytes:
    """The image bytes a `Cell` or `DatasetRow` points at (a struct without bytes: the file at its path)."""
    if isinstance(cell, DatasetRow):
        value = _undecoded(cell.source, cell.split, cell.column)[cell.index][cell.column]
        base = cell.source
    else:
        value, base = _parquet_cell(cell), posixpath.dirname(cell.file)
    if isinstance(value, dict):
        value = value.get("bytes") or (storage.join(base, value["path"]) if value.get("path") else None)
    if isinstance(value, str):
        return storage.read_bytes(value)
    if not value:
        raise RivalError(f"{cell} holds no image: give the row image bytes or a path")
    return bytes(value)


def parquet_entries(files: list[str], root: str) -> Iterator[Entry | Skipped]:
    """Every row of the Parquet `files` (paths or URLs); ids relative to the folder `root`."""
    tables = []
    for file in files:
        schema = _parquet(file).schema_arrow
        image, kind = _image_column(file, schema)
        others = [n for n in schema.names if n != image]
        paths_in = kind == "path" or (kind == "struct" and schema.field(image).type.get_field_index("path") >= 0)
        read = others + ([image if kind == "path" else f"{image}.path"] if paths_in else [])
        table = _parquet(file).read(columns=read).to_pylist()
        paths = [_path_of(row.pop(image, None), file, kind) for row in table]
        tables.append((file, image, kind, table, paths, _class_names(schema.metadata)))
    every = [p for *_, paths, _ in tables for p in paths]
    use_paths = None not in every and len(set(every)) == len(every)
    for file, image, kind, table, paths, names in tables:
        where = relative_id(file, root)
        for number, (row, path) in enumerate(zip(table, paths, strict=True)):
            columns = jsonable(row)
            id = relative_id(path, root) if use_paths else f"{where}#{number}"
            if kind == "path" and path is None:
                yield Skipped(id, f"its {image} cell is empty: give every row an image path")
                continue
            locator = path if kind == "path" else Cell(file, number, image)
            yield make_entry(id, f"{file}#{number}", _label(columns.get("label"), names), columns, locator)


def is_saved_dataset(folder: str) -> bool:
    """Whether `folder` (a path or URL) holds a `datasets` `save_to_disk` dataset or dataset dict."""
    fs, path = storage.filesystem(folder)
    return fs.exists(posixpath.join(path, "dataset_dict.json")) or fs.exists(posixpath.join(path, "state.json"))


def is_hub_id(source: str) -> bool:
    """Whether `source` reads as a hub dataset id ("user/name")."""
    return bool(_HUB_ID.match(source)) and not source.lower().endswith((".csv", ".jsonl", ".parquet", ".tar"))


def dataset_entries(source: str, split: str | None) -> Iterator[Entry]:
    """Every row of a `datasets` dataset (a `save_to_disk` folder, local or URL, or a hub id) and split."""
    dataset = _dataset(source, split)
    from datasets import ClassLabel, Image

    image = next((n for n, f in dataset.features.items() if isinstance(f, Image)), None)
    image = image or ("image" if "image" in dataset.column_names else None)
    if image is None:
        raise RivalError(f"dataset {source} has no image column: cast one to datasets.Image")
    label = dataset.features.get("label")
    names = label.names if isinstance(label, ClassLabel) else None
    paths = _dataset_paths(dataset, image)
    use_paths = paths is not None and None not in paths and len(set(paths)) == len(paths)
    rows = dataset.remove_columns(image).to_list() if len(dataset.column_names) > 1 else [{}] * len(dataset)
    for index, row in enumerate(rows):
        columns = jsonable(row)
        id = relative_id(paths[index], source) if use_paths else f"{split or 'train'}#{index}"
        origin = f"{source}#{index}"
        yield make_entry(
            id, origin, _label(columns.get("label"), names), columns, DatasetRow(source, split, index, image)
        )


def _label(value: Any, names: list[str] | None) -> Any:
    """A ClassLabel's integer as its name."""
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return value


def _class_names(metadata: dict[bytes, bytes] | None) -> list[str] | None:
    """The `label` column's class names that `datasets` stores in a Parquet file's metadata."""
    try:
        features = json.loads((metadata or {})[b"huggingface"])["info"]["features"]
        return features["label"]["names"] if features["label"].get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError):
        return None


def _image_column(file: str, schema: Any) -> tuple[str, str]:
    """The image column's name and kind ("bytes", "struct" or "path")."""
    import pyarrow as pa

    def kind(name: str) -> str | None:
        field = schema.field(name)
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return "bytes"
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            return "struct"
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            return "path"
        return None

    candidates = ["image", *(n for n in schema.names if kind(n) in ("bytes", "struct")), *PATH_COLUMNS]
    for name in candidates:
        if name in schema.names and kind(name) is not None:
            return name, kind(name)
    raise RivalError(f"Parquet file {file} has no image column: name one 'image' (path text, bytes or bytes+path)")


def _path_of(value: Any, file: str, kind: str) -> str | None:
    path = value.get("path") if isinstance(value, dict) else value if kind == "path" else None
    return (
        storage.join(posixpath.dirname(file) if storage.is_url(file) else os.path.dirname(file), path) if path else None
    )


@functools.lru_cache(maxsize=16)
def _parquet(file: str) -> Any:
    import pyarrow.parquet as pq

    try:
        if not storage.is_url(file):
            return pq.ParquetFile(file)
        fs, path = storage.filesystem(file)
        return pq.ParquetFile(fs.open(path, "rb"))
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RivalError(
            f"Parquet file {file} cannot be read ({reason}): check the path and that it is Parquet"
        ) from None


@functools.lru_cache(maxsize=4)
def _row_group(file: str, group: int, column: str) -> Any:
    return _parquet(file).read_row_group(group, columns=[column]).column(0)


def _parquet_cell(cell: Cell) -> Any:
    metadata, start = _parquet(cell.file).metadata, 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if cell.row < start + rows:
            return _row_group(cell.file, group, cell.column)[cell.row - start].as_py()
        start += rows
    raise RivalError(f"{cell.file} has no row {cell.row}: list the source again")


@functools.lru_cache(maxsize=4)
def _dataset(source: str, split: str | None) -> Any:
    try:
        import datasets
    except ImportError:
        raise RivalError(f'dataset {source} needs the datasets package: pip install -e ".[datasets]"') from None
    try:
        if storage.is_url(source) or os.path.isdir(source):
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source, split=split)
    except Exception as error:  # datasets raises many kinds; any is a bad source
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RivalError(f"dataset {source} cannot be loaded ({reason}): check the path, id and --split") from None
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or ("train" if "train" in loaded or len(loaded) != 1 else next(iter(loaded)))
        if chosen not in loaded:
            raise RivalError(f"dataset {source} has no split {chosen!r}: pass --split {' or '.join(loaded)}")
        return loaded[chosen]
    return loaded


@functools.lru_cache(maxsize=4)
def _undecoded(source: str, split: str | None, column: str) -> Any:
    from datasets import Image

    return _dataset(source, split).cast_column(column, Image(decode=False))


def _dataset_paths(dataset: Any, image: str) -> list[str | None] | None:
    """The image paths of a dataset's rows, read without their bytes (None when it has an indices mapping)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is not None:
        return None
    column = dataset.data.column(image)
    if not pa.types.is_struct(column.type) or column.type.get_field_index("path") < 0:
        return None
    return pc.struct_field(column, "path").to_pylist()
