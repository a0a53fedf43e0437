"""What a run shows on stderr while it works: compile lines, step bars, and the compile timer.

Per-step bars: the scan bodies call `tick` through `jax.debug.callback`; on the host it advances
whichever tqdm bar `progress_bar` has open (and does nothing when none is). XLA's persistent cache
never stores a program with host callbacks, so `step_ticks` asks for them only when that cache is
off; otherwise a program shows as one line counting its seconds (`activity`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

import jax
from tqdm.auto import tqdm

from rival_jax import runtime

_open_bars: list[tqdm] = []
# Seconds between redraws of an `activity` line on a terminal.
_REDRAW_S = 0.2


def _advance(_step: object) -> None:
    if _open_bars:
        _open_bars[-1].update(1)


def tick(step: jax.Array) -> None:
    """Call inside a scan body: advances the open progress bar by one step."""
    jax.debug.callback(_advance, step)


def step_ticks(show: bool) -> bool:
    """Whether programs shown with progress should tick every step: only where nothing is lost by it.

    With the persistent compilation cache on, a ticking program would be compiled again by every
    process (host callbacks are never cached), so programs run without ticks and show as one line.
    """
    return show and not runtime.persistent_cache_enabled()


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[tqdm]:
    """Open a bar for `total` steps; results must be ready (block on them) before the context ends."""
    bar = tqdm(total=total, desc=description, disable=not enabled, file=sys.stderr, leave=True, unit="step")
    _open_bars.append(bar)
    try:
        yield bar
    finally:
        _open_bars.remove(bar)
        bar.close()


class Stopwatch:
    """Seconds since the block started (`seconds`), final once the block has ended."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started


@contextlib.contextmanager
def activity(description: str, enabled: bool = True) -> Iterator[Stopwatch]:
    """Time a block and, when `enabled`, show "<description> ... 12.3 s" on stderr.

    On a terminal the line counts up while the block runs; elsewhere (logs, pipes) only the final
    line is written.
    """
    clock, stream = Stopwatch(), sys.stderr
    done = threading.Event()
    live = enabled and stream.isatty()

    def redraw() -> None:
        while not done.wait(_REDRAW_S):
            stream.write(f"\r{description} ... {clock.seconds:.1f} s")
            stream.flush()

    thread = threading.Thread(target=redraw, daemon=True) if live else None
    if thread:
        thread.start()
    try:
        yield clock
    finally:
        clock.ended = time.perf_counter()
        done.set()
        if thread:
            thread.join()
        if enabled:
            start = "\r" if live else ""
            stream.write(f"{start}{description} ... {clock.seconds:.1f} s\n")
            stream.flush()


def compiling(name: str, enabled: bool = True) -> contextlib.AbstractContextManager[Stopwatch]:
    """Time compiling program `name`, shown as "compiling <name> program ... 12.3 s" when `enabled`.

    Example:
        >>> with progress.compiling("generation", enabled=True) as clock:
        ...     compiled = jax.jit(program).lower(*args).compile()
        >>> clock.seconds
    """
    return activity(f"compiling {name} program", enabled)


class CompileTimer:
    """Seconds JAX spent tracing, lowering and compiling while the context was open."""

    PREFIX = "/jax/core/compile/"

    def __init__(self) -> None:
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_: object) -> None:
        if event.startswith(self.PREFIX):
            self.seconds += duration

    def __enter__(self) -> CompileTimer:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *_: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
