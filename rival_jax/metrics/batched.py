"""Running a compiled feature extractor over any number of inputs in fixed-size batches (one program)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rival_jax.core.parallel import pad_to

BATCH = 8


def run_batched(program: Callable[[Any, np.ndarray], Any], params: Any, inputs: np.ndarray) -> np.ndarray:
    """`program(params, batch)` over `inputs` in batches of `BATCH`, the last one padded; float32 rows out."""
    outputs = []
    for start in range(0, len(inputs), BATCH):
        chunk = inputs[start : start + BATCH]
        outputs.append(np.asarray(program(params, pad_to(chunk, BATCH)))[: len(chunk)])
    return np.concatenate(outputs).astype(np.float32)
