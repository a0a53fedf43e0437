"""Programs compiled once per argument shapes and kept, with their compile and run seconds."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax import progress


class Executables:
    """A pipeline's compiled programs, keyed by label, step ticks, and argument structure and shapes.

    Compiling ahead of the run keeps compile time out of the run time: `timings[label]` holds both
    ("compile_s", "run_s"), summed over calls.

    >>> runs = Executables()
    >>> latents = runs.run("inversion", pipe.programs.inversion, steps=50, show=True, args=(params, sched, x0, c, ts))
    >>> runs.timings["inversion"]
    {'compile_s': 8.1, 'run_s': 2.3}
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple, Any] = {}
        self.timings: defaultdict[str, dict[str, float]] = defaultdict(lambda: {"compile_s": 0.0, "run_s": 0.0})

    def run(
        self,
        label: str,
        make_program: Callable[[bool], Callable],
        steps: int,
        show: bool,
        args: tuple,
        donate: tuple = (),
    ) -> Any:
        """Run `make_program(report_progress)(*args)`, compiled on first use for these shapes.

        Args:
            label: the program's name in progress lines and `timings`.
            make_program: builds the program; its argument says whether it ticks every step
                (`progress.step_ticks`: only when progress is shown and the persistent cache is off).
            steps: ticks one run makes (the bar's length).
            show: progress on stderr (compile line, then a step bar or a line with the run's seconds).
            args: the program's arguments.
            donate: names of arguments whose buffers the program may reuse.
        """
        ticks = progress.step_ticks(show)
        leaves, structure = jax.tree_util.tree_flatten(args)
        shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
        signature = (label, ticks, structure, shapes)
        if signature not in self._compiled:
            with progress.compiling(label, show) as clock:
                lowered = jax.jit(make_program(ticks), donate_argnames=donate).lower(*args)
                self._compiled[signature] = lowered.compile()
            self.timings[label]["compile_s"] += clock.seconds
        started = time.perf_counter()
        shown = progress.progress_bar(label, steps, show) if ticks else progress.activity(f"running {label}", show)
        with shown:
            result = jax.block_until_ready(self._compiled[signature](*args))
        self.timings[label]["run_s"] += time.perf_counter() - started
        return result
