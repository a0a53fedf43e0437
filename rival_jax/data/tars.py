"""WebDataset shards (`.tar`, brace patterns `shards-{000..009}.tar`, globs) read as entries with webdataset.

A sample's image is its jpg/jpeg/png/webp member, its columns the keys of its `.json` member (plus
its `.txt` as `txt`), its label its `.cls` member. Shards cannot be pointed into without reading
them, so listing streams each shard once and keeps every sample's image bytes in its entry; the
samples' id is "<shard name>/<__key__>" (or the `.json`'s `id`).
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterator

from rival_jax.data import storage
from rival_jax.data.entries import Entry, Skipped, make_entry
from rival_jax.errors import RivalError

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def is_pattern(source: str) -> bool:
    """Whether `source` names several files: a brace pattern or a glob (`*`, `[`; `?` outside http URLs)."""
    web = source.lower().startswith(("http://", "https://"))
    return bool(_BRACES.search(source)) or "*" in source or "[" in source or ("?" in source and not web)


def expand(pattern: str) -> list[str]:
    """The files a brace pattern or glob names, sorted; none is a `RivalError`."""
    from webdataset.shardlists import expand_urls

    found = []
    for location in expand_urls(pattern):
        if "*" in location or "[" in location or "?" in location:
            fs, path = storage.filesystem(location)
            matches = fs.glob(path)
            found += [fs.unstrip_protocol(m) if storage.is_url(location) else m for m in matches]
        else:
            found.append(location)
    if not found:
        raise RivalError(f"source {pattern} matches no file: check the pattern")
    return sorted(found)


def tar_entries(shards: list[str]) -> Iterator[Entry | Skipped]:
    """Every sample of the WebDataset `shards` (paths or URLs), streamed in order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    for shard in shards:
        name = posixpath.basename(shard.rstrip("/"))
        fs, path = storage.filesystem(shard)
        try:
            with fs.open(path, "rb") as stream:
                members = ({**member, "__url__": shard} for member in tar_file_iterator(stream))
                for sample in group_by_keys(members):
                    yield _sample_entry(name, sample)
        except (OSError, ValueError, tarfile.TarError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RivalError(f"shard {shard} cannot be read ({reason}): check that it is a WebDataset .tar") from None


def _sample_entry(shard: str, sample: dict) -> Entry | Skipped:
    key = sample["__key__"]
    id = f"{posixpath.splitext(shard)[0]}/{key}"
    image = next((sample[m] for m in IMAGE_MEMBERS if m in sample), None)
    if image is None:
        return Skipped(id, f"no image member ({', '.join(IMAGE_MEMBERS)}) in {shard}: add one to the sample")
    columns = {}
    if "json" in sample:
        try:
            columns = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return Skipped(id, f"its .json member is not valid JSON ({error}): fix the shard")
        if not isinstance(columns, dict):
            return Skipped(id, "its .json member is not an object: write the sample's columns as one")
    if "txt" in sample:
        columns["txt"] = sample["txt"].decode("utf-8", "replace")
    label = sample["cls"].decode("utf-8", "replace").strip() if "cls" in sample else None
    return make_entry(id, f"{shard}#{key}", label, columns, image)
