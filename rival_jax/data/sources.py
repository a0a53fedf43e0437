"""Sources of exemplars: every row of a folder, manifest, Parquet, `datasets` or WebDataset source, with its
settings resolved (`list_rows`), and one row's image read and converted to RGB (`load_row`).

Listing reads no image (a folder: its file list; a manifest: its lines; Parquet and `datasets`: their
other columns), except WebDataset shards, which are streamed once and keep each sample's image bytes.
A row's id is stable under edits of the source (its relative path, or its `id` column), and its seed
and output name derive from it, so inserting, removing or reordering exemplars changes no other row.
A bad source is a `RivalError` (one line naming the fix); a bad row is a problem line and is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from rival_jax.data import manifests, storage, tables, tars
from rival_jax.data.entries import IMAGE_SUFFIXES, Entry, Skipped
from rival_jax.errors import RivalError
from rival_jax.jobs.authors import is_image_config
from rival_jax.jobs.settings import ROW_FIELDS, merge_settings, parse_text_value

__all__ = ["Entry", "Listing", "Row", "derive_seed", "list_rows", "load_row", "row_settings"]
TEMPLATES = ("prompt", "inversion_prompt")


@dataclasses.dataclass(frozen=True)
class Row:
    """An entry with resolved, validated settings (`jobs.settings.merge_settings`, "seed" included)."""

    entry: Entry
    settings: dict[str, Any]

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def label(self) -> str | None:
        return self.entry.label


@dataclasses.dataclass(frozen=True)
class Listing:
    """A source's usable rows sorted by id (ids and names unique), a line per skipped row, the non-setting columns."""

    rows: list[Row]
    problems: list[str]
    extra_columns: list[str]


def derive_seed(base: int, id: str) -> int:
    """A row's seed from the job's base seed and the row's id: the same id always gets the same seed.

    >>> derive_seed(0, "cat/c.png") == derive_seed(0, "cat/c.png") != derive_seed(1, "cat/c.png")
    True
    """
    return (base + int.from_bytes(hashlib.sha256(id.encode()).digest()[:4], "big")) % 2**32


def list_rows(
    source: str | os.PathLike,
    defaults: dict[str, Any],
    *,
    model: str,
    split: str | None = None,
    prompt_column: str | None = None,
) -> Listing:
    """Every exemplar of `source` with its settings layered over `defaults`; reads no image bytes.

    Args:
        source: a folder of images (labels from the first folder under it), a `.csv`/`.jsonl` manifest
            (an `image` column, any settings, any other columns as data), a `.parquet` file, folder or
            glob, a `datasets` `save_to_disk` folder or hub id, WebDataset `.tar` shards (brace patterns
            too), or an image config of the authors' release. Paths or fsspec URLs (s3://, gs://, https://).
        defaults: settings every row starts from; a row's columns override them. Their `prompt` and
            `inversion_prompt` may be templates over the row's columns and `label` ("a photo of a {label}").
        model: the model's name (part of each row's key; see `load_row`).
        split: the split of a `datasets` source or hub id (default: its only split, or "train").
        prompt_column: the column that holds each row's prompt (a missing or empty cell is a problem).

    >>> listing = list_rows("train/", {"prompt": "a photo of a {label}"}, model="sd15")
    >>> [row.id for row in listing.rows]  # ['cat/a.png', 'cat/indoor/c.png', 'dog/b.png']
    """
    del model  # the model enters each row's key, made when its image is read (`load_row`)
    entries = _entries(os.fspath(source), defaults, split)
    rows, problems, columns = [], [], set()
    for entry in entries:
        if isinstance(entry, Skipped):
            problems.append(_problem(entry.where, entry.reason))
            continue
        columns |= set(entry.columns)
        try:
            rows.append(Row(entry, row_settings(entry, defaults, prompt_column)))
        except RivalError as error:
            problems.append(_problem(entry.id, str(error)))
    if not rows and not problems:
        raise RivalError(
            f"{source} has no rows: add images ({', '.join(IMAGE_SUFFIXES)}) or manifest lines, "
            "or pass a folder, .csv, .jsonl, .parquet, .tar or datasets source"
        )
    rows, clashes = _unique(rows)
    extra = sorted(c for c in columns if c not in ROW_FIELDS)
    return Listing(sorted(rows, key=lambda row: row.id), problems + clashes, extra)


def load_row(row: Row, *, model: str) -> tuple[Image.Image, str, bool]:
    """The row's exemplar as an RGB image, the row's key, and whether the image had to be converted to RGB.

    Grayscale, CMYK and palette images are converted; RGBA and LA are laid over white. The key hashes
    the image bytes, the row's id, output name and resolved settings and `model`: it changes whenever the
    output would.

    Args:
        row: from `list_rows`.
        model: the model's name.

    >>> image, key, converted = load_row(listing.rows[0], model="sd15")
    """
    data = _image_bytes(row.entry.image)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image, converted = to_rgb(opened)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise RivalError(
            f"exemplar {row.entry.origin} is not a readable image ({type(error).__name__}): use a PNG or JPEG"
        ) from None
    return image, row_key(data, row, model), converted


def row_key(data: bytes, row: Row, model: str) -> str:
    """The hash of a row's image bytes, id, output name, resolved settings and model (20 hex digits)."""
    digest = hashlib.sha256(data)
    described = {k: row.settings[k] for k in ROW_FIELDS if k != "authors_t_align"}
    described |= {"model": model, "id": row.id, "name": row.name}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """`image` in RGB, transparent parts over white, and whether it was converted."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image, False
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        layer = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, layer).convert("RGB"), True
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB"), True


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, str):
        return storage.read_bytes(image)
    return tables.cell_bytes(image)


def _problem(where: str, reason: str) -> str:
    """One line, whatever line breaks came in with file names or values."""
    return f"row {where} skipped: {reason}".replace("\r", "\\r").replace("\n", "\\n")


def row_settings(entry: Entry, defaults: dict[str, Any], prompt_column: str | None = None) -> dict[str, Any]:
    """An entry's settings: its setting columns over `defaults`, prompts from a column or templates, its seed.

    >>> row_settings(entry, {"steps": 50}, prompt_column="caption")["prompt"]  # the row's caption
    """
    values = {
        k: parse_text_value(k, v) if isinstance(v, str) else v
        for k, v in entry.columns.items()
        if k in ROW_FIELDS and v not in (None, "")
    }
    if isinstance(values.get("control_image"), str):  # one map per ControlNet
        values["control_image"] = [values["control_image"]]
    if prompt_column is not None:
        prompt = entry.columns.get(prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise RivalError(f"its {prompt_column} column (the prompt) is missing or empty: give every row one")
        values["prompt"] = prompt
    fields = {**entry.columns, "label": entry.label}
    for name in TEMPLATES if prompt_column is None else TEMPLATES[1:]:
        text = values.get(name, defaults.get(name))
        if isinstance(text, str) and ("{" in text or "}" in text):
            values[name] = _formatted(name, text, fields)
    base = defaults.get("seed", 0)
    if isinstance(base, int) and not isinstance(base, bool):  # merge_settings names any other
        values.setdefault("seed", derive_seed(base, entry.id))
    return merge_settings(defaults, values)


def _formatted(name: str, template: str, fields: dict[str, Any]) -> str:
    try:
        return template.format(**{k: "" if v is None else v for k, v in fields.items()})
    except KeyError as error:
        known = ", ".join(sorted(fields))
        raise RivalError(f"{name} template {template!r} names {{{error.args[0]}}}, not a column: use {known}") from None
    except (ValueError, IndexError, AttributeError, TypeError) as error:
        raise RivalError(
            f"{name} template {template!r} is not a template ({error}): write braces as {{{{ }}}}"
        ) from None


def _unique(rows: list[Row]) -> tuple[list[Row], list[str]]:
    """The rows whose id and output name no other row shares, and a problem line for each that does."""
    problems = []
    for attribute, what in (("id", "id"), ("name", "output name")):
        groups: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            groups[getattr(row, attribute)].append(row)
        for value, group in groups.items():
            if len(group) > 1:
                origins = " and ".join(row.entry.origin for row in group)
                fix = "give each an id column" if attribute == "id" else "rename one"
                problems += [_problem(row.id, f"{origins} share the {what} {value!r}: {fix}") for row in group]
        rows = [row for row in rows if len(groups[getattr(row, attribute)]) == 1]
    return rows, problems


def _entries(source: str, defaults: dict[str, Any], split: str | None) -> Iterable[Entry | Skipped]:
    """The entries of `source`, read by the reader its kind needs."""
    local = not storage.is_url(source)
    if tars.is_pattern(source) and not (local and os.path.exists(source)):
        root, files = os.path.dirname(re.split(r"[{*?\[]", source)[0]), tars.expand(source)
        if local:  # absolute, so that rows shipped to other processes find their files whatever their folder
            root, files = os.path.realpath(root), [os.path.realpath(f) for f in files]
        return _files_entries(source, files, root)
    if local and not os.path.exists(source):
        if split is not None and tables.is_hub_id(source):
            return tables.dataset_entries(source, split)
        raise RivalError(f"source {source} does not exist: check the path (a hub dataset id needs --split)")
    source = os.path.realpath(source) if local else source  # ".." after a link: as open() sees it
    if _is_folder(source):
        if tables.is_saved_dataset(source):
            return tables.dataset_entries(source, split)
        files = manifests.folder_files(source)
        images = any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in files)
        if images or not any(f.lower().endswith((".parquet", ".tar")) for f in files):
            return manifests.folder_entries(source, files)
        return _files_entries(source, [storage.join(source, f) for f in files], source, folder=True)
    lowered = source.lower()
    if lowered.endswith(manifests.MANIFEST_SUFFIXES):
        return manifests.manifest_entries(source)
    if lowered.endswith(".json") and not storage.is_url(source) and is_image_config(Path(source)):
        return manifests.authors_entries(source, defaults)
    return _files_entries(source, [source], os.path.dirname(source))


def _files_entries(source: str, files: list[str], root: str, folder: bool = False) -> Iterable[Entry | Skipped]:
    """Parquet files or WebDataset shards (a folder's: those it holds)."""
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    shards = [f for f in files if f.lower().endswith(".tar")]
    if parquet and (folder or len(parquet) == len(files)):
        return tables.parquet_entries(parquet, root)
    if shards and (folder or len(shards) == len(files)):
        return tars.tar_entries(shards)
    raise RivalError(
        f"source {source} is not a folder of images, .csv, .jsonl, .parquet, .tar or datasets folder: "
        "pass one of those (or an image config of the authors' release)"
    )


def _is_folder(source: str) -> bool:
    if not storage.is_url(source):
        return os.path.isdir(source)
    fs, path = storage.filesystem(source)
    try:
        return fs.isdir(path)
    except OSError as error:
        raise RivalError(
            f"source {source} cannot be read ({type(error).__name__}): check the URL and credentials"
        ) from None
