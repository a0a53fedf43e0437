"""Work across processes (TPU pod hosts, multi-node GPU, independent machines): `jax.distributed` or `--shard I/N`
names each process, and each takes its own contiguous block of the work (`process_share`) and writes its own files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def job_position(job: Any) -> tuple[int, int]:
    """(process index, process count) of an augment job: `--shard I/N`, else jax.distributed's, else (0, 1).

    >>> job_position(AugmentOptions(source="train/", shard="1/4"))
    (1, 4)
    """
    if job.shard_position is not None:
        return job.shard_position
    if job.multi_host:
        return initialize_distributed(job.coordinator, job.num_processes, job.process_id)
    return 0, 1


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[int, int]:
    """Join a multi-process run via `jax.distributed` and return (process_index, process_count).

    On TPU pods and SLURM/Open MPI clusters all three arguments are detected automatically.
    """
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None,
    )
    return jax.process_index(), jax.process_count()


def process_share(items: Sequence[T], process_index: int, process_count: int) -> list[T]:
    """Block `process_index` of `process_count` nearly equal contiguous blocks of `items`.

    Contiguous blocks keep an exemplar's variations on few processes, so few processes invert it.

    >>> process_share(list(range(5)), 1, 2)
    [2, 3, 4]
    """
    start = len(items) * process_index // process_count
    return list(items[start : len(items) * (process_index + 1) // process_count])
