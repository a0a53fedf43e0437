"""Process-wide settings, applied at the edges (CLI, scripts, tests), never by the math: the cache folder and
JAX's compilation cache. A leaf: it imports nothing of rival_jax.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache


def default_cache_dir() -> Path:
    """`$RIVAL_JAX_CACHE`, else `$XDG_CACHE_HOME/rival_jax`, else `~/.cache/rival_jax`."""
    if os.environ.get("RIVAL_JAX_CACHE"):
        return Path(os.environ["RIVAL_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rival_jax"


def enable_compilation_cache(folder: str | Path | None = None) -> Path:
    """Keep compiled programs on disk so a later process with the same shapes skips compiling.

    Default folder: `<rival_jax cache>/xla`. Every program is cached, however quick it compiled.
    Called again with another folder, later programs go there (JAX opens its cache once otherwise).
    """
    path = Path(folder) if folder else default_cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, str(path)):
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def persistent_cache_enabled() -> bool:
    """True when compiled programs are kept on disk (`enable_compilation_cache` or JAX's own settings)."""
    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)
