"""One exemplar as a source gives it (`Entry`), before any setting is resolved, and the rules for its identity.

Readers (`data/manifests.py`, `data/tables.py`, `data/tars.py`) yield entries, or `Skipped` for a row
they cannot use; `data/sources.py` turns entries into rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import posixpath
import re
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One exemplar as the source gives it; picklable.

    Args:
        id: stable identity: the posix path relative to the source root ("cat/indoor/c.png"), the row's
            `id` column, "<shard>/<__key__>" (WebDataset), or "<file>#<row>" when nothing better exists
            (that one changes when rows are inserted before it).
        name: output stem, posix, no suffix, safe characters ("cat/indoor/c").
        origin: where it came from, for records and messages (a path, URL, "x.parquet#12", "s.tar#key").
        label: the first folder under a folder source's root, else the `label` column (None: no label).
        columns: every column of the row except the image (settings and extra data), JSON-able.
        image: a locator `load_row` reads: a path or URL, a `tables.Cell`/`tables.DatasetRow`, or bytes.

    >>> Entry("cat/c.png", "cat/c", "/data/cat/c.png", "cat", {}, "/data/cat/c.png")
    """

    id: str
    name: str
    origin: str
    label: str | None
    columns: dict[str, Any]
    image: Any


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A row a reader cannot use: `where` names it (its id, or "<file>#<row>"), `reason` says why."""

    where: str
    reason: str


def make_entry(id: str, origin: str, label: Any, columns: dict[str, Any], image: Any) -> Entry:
    """An entry named after its id; an `id` column wins over `id`, a `label` column counts when `label` is None."""
    given = columns.get("id")
    id = str(given) if given not in (None, "") else id
    label = columns.get("label") if label is None else label
    label = None if label in (None, "") else str(label)
    return Entry(id, output_name(id, label), origin, label, columns, image)


def output_name(id: str, label: str | None = None) -> str:
    """The output stem of an id, under a folder named after the label unless the id starts with one.

    >>> output_name("cat/in door/c.png", "cat"), output_name("x.parquet#12", "dog"), output_name("a.png")
    ('cat/in_door/c', 'dog/x/12', 'a')

    Every part keeps only letters, digits, ".", "_" and "-"; an image suffix is dropped, as is the
    suffix of the file a "<file>#<row>" id names; nothing climbs out of the output folder. Outputs
    under their label's folder are what torchvision's ImageFolder reads classes from.
    """
    file, hash, row = id.partition("#")
    if hash:
        id = f"{posixpath.splitext(file)[0]}/{row}"
    parts = [_part(part) for part in id.replace("\\", "/").split("/") if part] or ["_"]
    stem, suffix = posixpath.splitext(parts[-1])
    if suffix.lower() in IMAGE_SUFFIXES and stem:
        parts[-1] = stem
    if label is not None and (len(parts) == 1 or parts[0] != _part(label)):
        parts.insert(0, _part(label))
    return "/".join(parts)


def _part(text: str) -> str:
    return _UNSAFE.sub("_", text).lstrip(".") or "_"


def relative_id(location: str, root: str) -> str:
    """`location` relative to the folder `root` when it lies under it, else as given; posix, normalized."""
    location = location.replace("\\", "/")
    root = root.replace("\\", "/").rstrip("/") + "/"
    if location.startswith(root):
        location = location[len(root) :]
    return posixpath.normpath(location) if "://" not in location else location


def jsonable(value: Any) -> Any:
    """A column value as JSON can hold it: containers recursively, dates and decimals as text, bytes dropped."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, (datetime.date, datetime.time, decimal.Decimal)):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value
