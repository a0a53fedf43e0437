"""Storage by local path or fsspec URL (gs://, s3://, https://, ...): one place that tells them apart.

Local paths keep the atomic writes of `files`; on object stores one `put` of a whole object is
atomic already, so a reader never sees half of one there either. Cloud protocols need the `cloud`
extra (`pip install -e ".[cloud]"`).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from rival_jax.errors import RivalError
from rival_jax.files import write_atomic

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` names a protocol (`s3://b/k`, `https://h/p`, `file:///p`) rather than a local path."""
    return bool(_URL.match(os.fspath(location)))


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """The fsspec filesystem of `location` and the path within it.

    >>> filesystem("s3://bucket/train")  # (S3FileSystem, "bucket/train")
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(os.fspath(location))
    except (ImportError, ValueError) as error:
        protocol = os.fspath(location).split("://")[0]
        raise RivalError(
            f'{protocol}:// is not available ({str(error).splitlines()[0]}): pip install -e ".[cloud]"'
        ) from None


def join(base: str | os.PathLike, relative: str) -> str:
    """`relative` resolved against the folder `base`: a URL or absolute path is kept as it is.

    >>> join("s3://bucket/data", "cat/a.png")
    's3://bucket/data/cat/a.png'
    """
    if is_url(relative) or os.path.isabs(relative):
        return relative
    base = os.fspath(base)
    if is_url(base):
        return posixpath.join(base.rstrip("/"), relative)
    return os.path.join(base, relative)


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file at a path or URL; a missing one is a `RivalError` naming it."""
    if not is_url(location):
        try:
            return Path(location).read_bytes()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise RivalError(f"{location} cannot be read ({reason}): check the path") from None
    fs, path = filesystem(location)
    try:
        return fs.cat_file(path)
    except (OSError, ValueError) as error:
        raise RivalError(f"{location} cannot be read ({type(error).__name__}): check the URL and credentials") from None


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file at a path or URL so that no reader sees part of it."""
    if not is_url(location):
        write_atomic(location, lambda stream: stream.write(data))
        return
    fs, path = filesystem(location)
    fs.pipe_file(path, data)


def list_files(folder: str | os.PathLike) -> list[str]:
    """Every file under `folder` (a path or URL), as sorted posix paths relative to it; [] when there is none.

    >>> list_files("s3://bucket/out/images")  # ["cat/a_v0000.png", ...]
    """
    if not is_url(folder):
        root = Path(folder)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    return sorted(posixpath.relpath(p, path) for p in fs.find(path))


def remove(location: str | os.PathLike) -> None:
    """Remove the file at a path or URL; one already gone is no error."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
