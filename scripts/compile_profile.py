"""Where the test suite's time goes: JAX's compile events (XLA compile, tracing, lowering) per test.

A pytest plugin and its report. Each pytest process (every xdist worker) writes one JSON file of
{test, wall, event: seconds} rows; subprocesses a test starts are not seen.

    PYTHONPATH=scripts python -m pytest -q -n 2 --dist loadfile -p compile_profile   # rows to compile-profile/
    python scripts/compile_profile.py compile-profile                                # totals, slowest files
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

import pytest

from rival_jax.files import save_json

COMPILE_EVENTS = "/jax/core/compile/"
_seconds: collections.Counter = collections.Counter()
_rows: list[dict] = []


def pytest_configure(config) -> None:
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(lambda event, duration, **_: _count(event, duration))


def _count(event: str, duration: float) -> None:
    if event.startswith(COMPILE_EVENTS):
        _seconds[event[len(COMPILE_EVENTS) :]] += duration


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before, start = dict(_seconds), time.perf_counter()
    yield
    row = {k: v - before.get(k, 0.0) for k, v in _seconds.items() if v > before.get(k, 0.0)}
    _rows.append({"test": item.nodeid, "wall": time.perf_counter() - start, **row})


def pytest_sessionfinish(session) -> None:
    folder = Path(os.environ.get("COMPILE_PROFILE_DIR", "compile-profile"))
    save_json(_rows, folder / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json")


def report(folder: Path, top: int = 15) -> None:
    rows = [row for path in sorted(folder.glob("*.json")) for row in json.loads(path.read_text())]
    events = collections.Counter()
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        compiling = {k: v for k, v in row.items() if k not in ("test", "wall")}
        events.update(compiling)
        totals = files[row["test"].split("::")[0]]
        totals[0] += row["wall"]
        totals[1] += sum(compiling.values())
    print(f"{len(rows)} tests, {sum(r['wall'] for r in rows):,.0f} worker-seconds")
    for event, seconds in events.most_common():
        print(f"  {seconds:8,.0f} s  {event}")
    print(f"{'wall s':>8} {'compile s':>9}  file")
    for name, (wall, compiling) in sorted(files.items(), key=lambda item: -item[1][0])[:top]:
        print(f"{wall:8,.0f} {compiling:9,.0f}  {name}")


if __name__ == "__main__":
    report(Path(sys.argv[1] if len(sys.argv) > 1 else "compile-profile"))
