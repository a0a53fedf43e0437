"""The compiled-program cache: each program compiled once per argument structure, kept, and timed.

A program is a `programs.Program` (a function and its statics) or any hashable
`make_program(report_progress)`. Compiled programs live in one store for the process when shared
(pipelines: a second load of one architecture compiles nothing, as `programs.Modules` compare by
configuration), or in the object (`plan`, which times every compile).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax import progress


class Executables:
    """Compiled programs, each compiled on first use for its argument shapes and kept, with their seconds.

    Keyed by the program (a `Program`, or any hashable `make_program(report_progress)`), whether it
    ticks, and its arguments' structure, shapes and dtypes. `timings[label]`: compile and run seconds.
    `shared`: compiled programs are kept in one store for the process (pipelines: a second load of
    an architecture compiles nothing; `forget_shared` empties it), else in this object (`plan`, which
    times every compile).

    >>> runs = Executables(shared=True)
    >>> chains = runs.run("inversion", Program(inversion, statics), steps=50, show=True, args=(params, inputs))
    """

    _shared: ClassVar[dict[tuple, Any]] = {}

    def __init__(self, shared: bool = False) -> None:
        self._compiled: dict[tuple, Any] = Executables._shared if shared else {}
        self.timings: defaultdict[str, dict[str, float]] = defaultdict(lambda: {"compile_s": 0.0, "run_s": 0.0})

    @classmethod
    def forget_shared(cls) -> None:
        """Drop the process's shared compiled programs (their memory; the next run compiles again)."""
        cls._shared.clear()

    def compile(self, label: str, program: Callable[[bool], Callable], show: bool, args: tuple) -> Any:
        """`program(report_progress)` compiled for `args` (arrays, or shapes with shardings: `parallel.abstract`).

        Args:
            label: the program's name in progress lines and `timings`.
            program: a `Program`, or a hashable function of report_progress (ticks every step only
                when progress is shown and the persistent cache is off, `progress.step_ticks`).
            show: progress on stderr; args: the program's arguments.

        >>> runs.compile("generation", Program(generation, statics), False, (params, inputs)).memory_analysis()
        """
        ticks = progress.step_ticks(show)
        args, kwargs = _donated_apart(program, args)
        leaves, structure = jax.tree_util.tree_flatten((args, kwargs))
        key = (program, ticks, structure, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if key not in self._compiled:
            function = _rejoining(program(ticks)) if kwargs else program(ticks)
            with progress.compiling(label, show) as clock:
                self._compiled[key] = jax.jit(function, donate_argnames=tuple(kwargs)).lower(*args, **kwargs).compile()
            self.timings[label]["compile_s"] += clock.seconds
        return self._compiled[key]

    def run(self, label: str, program: Callable[[bool], Callable], steps: int, show: bool, args: tuple) -> Any:
        """Run `program(report_progress)(*args)`, compiled on first use (`compile`, which takes the same
        arguments); `steps`: ticks one run makes (the bar's length), shown after the compile line."""
        compiled = self.compile(label, program, show, args)
        args, kwargs = _donated_apart(program, args)
        started = time.perf_counter()
        ticks = progress.step_ticks(show)
        shown = progress.progress_bar(label, steps, show) if ticks else progress.activity(f"running {label}", show)
        with shown:
            result = jax.block_until_ready(compiled(*args, **kwargs))
        self.timings[label]["run_s"] += time.perf_counter() - started
        return result


def _donated_apart(program: Any, args: tuple) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs): the fields of the last argument that `program` donates travel apart (only theirs donated)."""
    donated = getattr(program, "donate", ())
    if not donated:
        return args, {}
    *rest, inputs = args
    fields = {name: getattr(inputs, name) for name in donated}
    return (*rest, inputs.replace(**dict.fromkeys(donated))), {"donated": fields}


def _rejoining(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function(*rest, inputs)` called as `(*rest, inputs without the donated fields, donated=those fields)`."""

    def call(*args: Any, donated: dict[str, Any]) -> Any:
        *rest, inputs = args
        return function(*rest, inputs.replace(**donated))

    return call
