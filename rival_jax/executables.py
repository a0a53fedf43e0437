"""Programs compiled once per argument shapes and kept, run with a step progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax import progress


class Executables:
    """A pipeline's compiled programs, keyed by label, progress switch, and argument structure and shapes.

    Compiling ahead of the run keeps compile time out of the step timings the bar shows.

    >>> latents = Executables().run("inversion", program, steps=50, show=True, args=(params, schedule, x0, cond, ts))
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple, Any] = {}

    def run(self, label: str, program: Callable, steps: int, show: bool, args: tuple, donate: tuple = ()) -> Any:
        """Run `program(*args)` (compiled on first use for these shapes; `donate` names arguments to donate)."""
        leaves, structure = jax.tree_util.tree_flatten(args)
        shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
        signature = (label, show, structure, shapes)
        if signature not in self._compiled:
            self._compiled[signature] = jax.jit(program, donate_argnames=donate).lower(*args).compile()
        with progress.progress_bar(label, steps, show):
            return jax.block_until_ready(self._compiled[signature](*args))
