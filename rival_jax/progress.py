"""Step progress from inside compiled scans.

The scan bodies call `tick` through `jax.debug.callback`; on the host it advances whichever tqdm bar
`progress_bar` has open (and does nothing when none is), so compiled programs never depend on
whether progress is shown.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import jax
from tqdm.auto import tqdm

_open_bars: list[tqdm] = []


def _advance(_step: object) -> None:
    if _open_bars:
        _open_bars[-1].update(1)


def tick(step: jax.Array) -> None:
    """Call inside a scan body: advances the open progress bar by one step."""
    jax.debug.callback(_advance, step)


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
