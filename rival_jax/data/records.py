"""The records of an output: one JSON line per finished item, written after its file, read forgivingly.

Each process keeps its own records. On a local folder that is `records-<process>.jsonl`, appended and
fsynced per commit (a line cut short by a kill is ignored on reading; one a full disk cut short is
removed at once). On a URL, where objects cannot be appended to, each commit is one whole object
`records-<process>-<n>.jsonl`. A record is {"key", "variation_index", "file" (relative to the output;
None for an item a filter dropped), "sample" (its key inside a shard), "metadata" (a dict, {} when a
record has none), "adopted"}.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rival_jax.data import storage

RECORDS_GLOB = "records-*.jsonl"
_NAME = re.compile(r"^records-([0-9]{4})(?:-([0-9]{6}))?\.jsonl$")


def _listing(output: str) -> list[str]:
    """Names of the records files in `output`, sorted (so by process, then commit)."""
    if not storage.is_url(output):
        return sorted(p.name for p in Path(output).glob(RECORDS_GLOB))
    fs, root = storage.filesystem(output)
    fs.invalidate_cache(root)
    return sorted(posixpath.basename(p) for p in fs.glob(posixpath.join(root, RECORDS_GLOB)))


def _parse(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        try:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record["key"], str):
                record["variation_index"] = int(record["variation_index"])
                record["metadata"] = record["metadata"] if isinstance(record.get("metadata"), dict) else {}
                if record.get("file") is None or isinstance(record["file"], str):
                    yield record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut short by a kill


def _read(output: str, names: list[str]) -> list[dict[str, Any]]:
    found = []
    for name in names:
        location = storage.join(output, name)
        if storage.is_url(output) or Path(location).is_file():
            found += _parse(storage.read_bytes(location).decode(errors="replace"))
    return found


def load_records(output: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record any process wrote in `output` (a folder or URL), in process order, less superseded ones.

    Of several records of one output file (or shard sample), only the last counts: a file rewritten for a
    row whose settings changed holds that row's output, not the earlier one's.
    """
    output = os.fspath(output)
    records = _read(output, _listing(output))
    latest = {(r["file"], r.get("sample")): n for n, r in enumerate(records) if r["file"] is not None}
    return [r for n, r in enumerate(records) if r["file"] is None or latest[(r["file"], r.get("sample"))] == n]


@contextlib.contextmanager
def records_lock(output: str | os.PathLike) -> Iterator[None]:
    """Hold the lock shared by every process that adopts files or rebuilds the index of a local `output`.

    A URL output is not locked (object stores offer no lock).
    """
    if storage.is_url(output):
        yield
        return
    Path(output).mkdir(parents=True, exist_ok=True)
    handle = os.open(Path(output) / ".rival-jax-records.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


class RecordLog:
    """The records of one process of an output: appended per commit, never half a line."""

    def __init__(self, output: str | os.PathLike, process: int) -> None:
        self.output, self.process = os.fspath(output), process
        self.url = storage.is_url(self.output)
        self.path = Path(self.output) / f"records-{process:04d}.jsonl"
        if not self.url and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")

    def _names(self) -> list[str]:
        return [n for n in _listing(self.output) if (m := _NAME.match(n)) and int(m[1]) == self.process]

    def own(self) -> list[dict[str, Any]]:
        """This process's records."""
        return _read(self.output, self._names())

    def append(self, records: list[dict[str, Any]]) -> None:
        """Commit `records` together: one fsynced append locally, one new object on a URL."""
        if not records:
            return
        text = "".join(json.dumps(record, default=str) + "\n" for record in records)
        if self.url:
            numbers = [int(m[2]) for n in self._names() if (m := _NAME.match(n)) and m[2]]
            name = f"records-{self.process:04d}-{max(numbers, default=0) + 1:06d}.jsonl"
            storage.write_bytes(storage.join(self.output, name), text.encode())
            return
        with open(self.path, "a") as handle:
            size = handle.tell()
            try:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:  # a full disk, or Ctrl-C mid-line
                handle.truncate(size)
                raise

    def remove(self) -> None:
        """Remove this process's records (after the files they list)."""
        for name in self._names():
            storage.remove(storage.join(self.output, name))
