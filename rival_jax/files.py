"""Files written so that a reader never sees half of one: atomic writes, PNGs with metadata, JSON."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write via a temporary file in the same folder and rename it over `path`: never a half-written file.

    The file gets the mode a plain `open` would give (0666 less the umask), not the temporary's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb" if binary else "w") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_folder_atomic(target: Path, write: Callable[[Path], Any]) -> Path:
    """Fill a folder via a hidden staging folder beside it, renamed into place: never a half-written folder.

    If another process put `target` in place first (its `model_index.json` is there), that one is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent))
    try:
        write(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


PNG_TEXT_KEY = "rival-jax"


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save atomically; `metadata` is stored as JSON in a PNG text chunk (read back by `png_metadata`)."""
    info = PngInfo()
    if metadata is not None:
        info.add_text(PNG_TEXT_KEY, json.dumps(metadata, sort_keys=True))
    return write_atomic(path, lambda stream: image.save(stream, format="PNG", pnginfo=info))


def png_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata `save_png` stored, or None for a missing, unreadable or foreign file."""
    try:
        with Image.open(path) as image:
            image.load()
            return json.loads(image.text[PNG_TEXT_KEY])
    except (OSError, KeyError, AttributeError, ValueError):
        return None


def save_json(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON with sorted keys, atomically.

    >>> save_json({"summary": {}}, "out/metrics.json")
    """
    return write_atomic(path, lambda stream: json.dump(data, stream, indent=2, sort_keys=True), binary=False)
