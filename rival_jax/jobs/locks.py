"""Folder checks and locks of jobs: checked before any compute, one run at a time, earlier results replaced on request.

Policy (README, "Output folders"):
- `-o` must be a folder or a path where one can be created and written; checked before a model loads.
  An fsspec URL (`s3://bucket/out`) must have its protocol installed and must not name a file.
- A run holds a lock on its folder (`.rival-jax-<process>.lock`, an `flock` plus the holder's pid):
  a second run on the same folder (and process index) refuses in one line. The kernel releases the
  lock when its holder exits, however it exits, so a stale lock file is simply taken over. A URL output is
  not locked (object stores offer no lock): give each run its own process index or its own output.
- `generate` refuses a folder that holds an earlier result (its sidecar `SIDECAR` or a file of the names it
  writes) unless `--overwrite`; then it removes exactly the files the earlier sidecar recorded,
  right before writing its own. Files no run recorded are never removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from rival_jax.data import storage
from rival_jax.errors import RivalError

# The JSON file `generate` writes beside its images: settings, timings and the files it wrote.
SIDECAR = "rival.json"


def check_output(path: str | os.PathLike) -> Path | str:
    """`path` as an output folder that exists or can be created and written (or a URL, kept as it is, whose
    protocol is installed and which names no file); nothing is created here.

    >>> check_output("s3://bucket/augmented")
    's3://bucket/augmented'
    """
    if storage.is_url(path):
        fs, inside = storage.filesystem(path)
        try:
            is_file = fs.isfile(inside)
        except (OSError, ValueError) as error:
            raise RivalError(
                f"output {path} cannot be reached ({type(error).__name__}): check the URL and credentials"
            ) from None
        if is_file:
            raise RivalError(f"output {path} is a file, not a folder: pass a folder URL with -o")
        return os.fspath(path)
    output = Path(path)
    if output.exists() and not output.is_dir():
        raise RivalError(f"output {output} is a file, not a folder: pass a folder with -o")
    existing = output
    while not existing.exists():
        if existing.is_symlink():
            raise RivalError(f"output {output} leads through a broken link {existing}: fix the link or pass another -o")
        existing = existing.parent
    if not existing.is_dir():
        raise RivalError(f"output {output} cannot be created: {existing} is a file; pass another -o")
    if not os.access(existing, os.W_OK | os.X_OK):
        action = "written" if existing == output else "created"
        raise RivalError(f"output {output} cannot be {action}: no write permission on {existing}; pass another -o")
    return output


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, process_index: int = 0) -> Iterator[Path | str]:
    """Create `folder` and hold its lock for this process index while the context runs; a URL is not locked.

    A folder this call created is removed again on exit if the run left nothing in it.
    """
    if storage.is_url(folder):
        yield os.fspath(folder)
        return
    folder = Path(folder)
    created = [] if folder.is_dir() else [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RivalError(f"output {folder} cannot be created ({error.strerror}): pass another -o") from None
    path = folder / f".rival-jax-{process_index:04d}.lock"
    handle = _acquire(path, folder)
    try:
        yield folder
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock, so no one else owns this file yet
        os.close(handle)
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()


def _acquire(path: Path, folder: Path) -> int:
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(handle, 64).decode(errors="replace").strip() or "another process"
            os.close(handle)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RivalError(
                f"output {folder} is in use by another rival-jax run (pid {holder}): wait for it to finish "
                "or pass another -o"
            ) from None
        if path.exists() and os.path.samestat(os.fstat(handle), path.stat()):
            break
        os.close(handle)  # the holder removed this file as we opened it: take the new one
    os.ftruncate(handle, 0)
    os.write(handle, str(os.getpid()).encode())
    return handle


# What `generate` writes besides its variations; a folder holding any of these holds an earlier result.
GENERATE_FILES = ("exemplar.png", "grid.png", SIDECAR)


def earlier_result(folder: Path) -> list[str]:
    """Names in `folder` that an earlier `generate` wrote (its sidecar or files of its names)."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name in GENERATE_FILES or (p.name.startswith("variation-") and p.suffix == ".png")
    )


def check_generate_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """`check_output`, and refuse a folder that holds an earlier result unless `overwrite`."""
    output = check_output(path)
    found = earlier_result(output)
    if found and not overwrite:
        raise RivalError(
            f"output {output} already holds a result ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): "
            "pass --overwrite to replace it, or another -o"
        )
    return output


def recorded_files(folder: Path) -> list[Path]:
    """The files the earlier sidecar in `folder` says its run wrote (plain names inside the folder)."""
    try:
        sidecar = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(sidecar, dict):
        return []
    names = sidecar.get("files")
    if not isinstance(names, list):  # sidecars before "files": the variations plus the fixed names
        listed = sidecar.get("images") if isinstance(sidecar.get("images"), list) else []
        names = [*(i.get("file") for i in listed if isinstance(i, dict)), *GENERATE_FILES]
    return [folder / name for name in names if _plain_name(name) and (folder / name).is_file()]


def remove_files(paths: Iterable[Path]) -> int:
    """Remove these files (sidecar last, so an interrupted removal stays recorded); how many were removed."""
    removed = 0
    for path in sorted(paths, key=lambda p: p.name == SIDECAR):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name
