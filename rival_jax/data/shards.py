"""WebDataset and Parquet shards: built in memory, committed whole, read back when a job resumes.

A shard is `shards/<process>-<n>.tar` (webdataset's `TarWriter`: per sample the image and a `.json` of
its metadata) or `data/<process>-<n>.parquet` (an `image` column of {"bytes", "path"} structs, which
`datasets` reads as its Image feature, plus one column per metadata field; dicts and lists as JSON
text). It is written in one piece (`storage.write_bytes`: a rename locally, one put on a URL), so a
reader, or a rerun after a kill, sees a whole shard or none; memory holds one shard while it fills.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from typing import Any

from rival_jax.data import storage

SHARD_FOLDERS = {"webdataset": "shards", "parquet": "data"}
_SUFFIXES = {"webdataset": "tar", "parquet": "parquet"}
_NAME = re.compile(r"^([0-9]{4})-([0-9]{6})\.(tar|parquet)$")
_HF_FEATURES = json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})


def shard_file(format: str, process: int, number: int) -> str:
    """The shard's path relative to the output.

    >>> shard_file("webdataset", 0, 3)
    'shards/0000-000003.tar'
    """
    return f"{SHARD_FOLDERS[format]}/{process:04d}-{number:06d}.{_SUFFIXES[format]}"


def shard_number(file: str, format: str, process: int) -> int | None:
    """The number of `file` (relative to the output) if it is a shard of `process` in `format`, else None."""
    folder, name = posixpath.split(file)
    match = _NAME.match(name)
    if folder != SHARD_FOLDERS[format] or not match or match[3] != _SUFFIXES[format] or int(match[1]) != process:
        return None
    return int(match[2])


class Shard:
    """One shard filling in memory; `commit` writes it whole to `location`."""

    def __init__(self, format: str, location: str) -> None:
        self.format, self.location = format, location
        self._rows: list[dict[str, Any]] = []
        self._buffer = io.BytesIO()
        self._tar = None
        if format == "webdataset":
            import webdataset

            self._tar = webdataset.TarWriter(self._buffer)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, sample: str, extension: str, data: bytes, metadata: dict[str, Any]) -> str:
        """Add one image; returns the sample's key in this shard (`sample`, with dots escaped in a tar)."""
        if self._tar is not None:
            sample = sample.replace(".", "%2E")  # webdataset splits a member's key at its first dot
            json_bytes = json.dumps(metadata, default=str).encode()
            self._tar.write({"__key__": sample, extension: data, "json": json_bytes})
            self._rows.append({})
        else:
            self._rows.append({"image": {"bytes": data, "path": f"{sample}.{extension}"}, **metadata})
        return sample

    def commit(self) -> None:
        """Write the shard whole; after this its samples may be recorded."""
        if self._tar is not None:
            self._tar.close()
            data = self._buffer.getvalue()
        else:
            import pyarrow.parquet as pq

            sink = io.BytesIO()
            pq.write_table(_table(self._rows), sink)
            data = sink.getvalue()
        storage.write_bytes(self.location, data)


def _table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    columns = {}
    for name in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(name) for row in rows]
        if name != "image":
            values = [json.dumps(v, default=str) if isinstance(v, (dict, list)) else v for v in values]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds in one column: all as JSON text
            columns[name] = pa.array([None if v is None else json.dumps(v, default=str) for v in values])
    return pa.table(columns).replace_schema_metadata({"huggingface": _HF_FEATURES})


def read_shard(location: str, format: str) -> list[tuple[str, dict[str, Any]]] | None:
    """(sample key, metadata) of every sample of a committed shard, or None when it is damaged."""
    import pyarrow as pa

    data = storage.read_bytes(location)
    try:
        if format == "webdataset":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")]
                samples = [(m.name[: -len(".json")], json.loads(tar.extractfile(m).read())) for m in members]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
            paths = [cell["path"] for cell in table.column("image").to_pylist()]
            rows = table.drop_columns(["image"]).to_pylist()
            samples = [(posixpath.splitext(path)[0], row) for path, row in zip(paths, rows, strict=True)]
        if all(isinstance(row["key"], str) and isinstance(row["variation_index"], int) for _, row in samples):
            return samples
    except (tarfile.TarError, EOFError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException):
        pass
    return None
