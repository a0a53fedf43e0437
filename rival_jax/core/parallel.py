"""Device and host parallelism, kept in one place.

- Within a process, variations of one exemplar are data-parallel over a 1-D mesh of the local
  devices (`jax.shard_map`): each device denoises its slice of the variations against a
  replicated copy of the exemplar's reference features, with no communication between devices.
- Several exemplars at once use a 2-D mesh ("exemplars", "data") of the same devices
  (`exemplar_mesh`): each row of devices holds its exemplars' chains and features and denoises its
  slice of their variations. Independent evaluations (the reference pass's steps, several
  exemplars' inversions) are split evenly over the devices (`spread`, `over_items`).
- Across processes (TPU pod hosts, multi-node GPU), `jax.distributed` names each process; each
  takes its own contiguous block of the work (`process_share`) and writes its own files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
EXEMPLARS = "exemplars"
T = TypeVar("T")


def local_mesh() -> Mesh:
    """A 1-D mesh ("data") over this process's devices."""
    return Mesh(np.array(jax.local_devices()), (DATA,))


def padded_length(count: int, mesh: Mesh) -> int:
    """The smallest multiple of the device count that holds `count` items."""
    return -(-count // mesh.size) * mesh.size


def pad_to(items: np.ndarray, length: int) -> np.ndarray:
    """Pad along axis 0 by repeating the last item (the padding is computed, then dropped)."""
    return (
        np.concatenate([items, np.repeat(items[-1:], length - items.shape[0], axis=0)])
        if length > len(items)
        else items
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def spread(items: int, devices: int) -> tuple[int, int]:
    """(devices used, items per device): `items` independent evaluations over at most `devices`, fewest per device."""
    per_device = -(-items // devices)
    return -(-items // per_device), per_device


def sub_mesh(mesh: Mesh, count: int) -> Mesh:
    """A 1-D mesh ("data") over the first `count` devices of `mesh`."""
    return Mesh(np.array(mesh.devices.flat[:count]), (DATA,))


def over_items(fn: Callable[..., Any], mesh: Mesh, sharded: tuple[bool, ...]) -> Callable[..., Any]:
    """`fn(*args)` per device on its block of the arguments marked in `sharded` (axis 0, over every mesh axis).

    The other arguments (params, schedule, ...) are replicated; outputs come back split along axis 0.
    """
    every = PartitionSpec(mesh.axis_names)
    specs = tuple(every if split else PartitionSpec() for split in sharded)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=every, check_vma=False)


def exemplar_rows(devices: int, exemplars: int, variations: int) -> int:
    """Rows of an `exemplar_mesh` of `devices` for `exemplars` x `variations` generated entries.

    Of the divisors r of `devices`, the one whose busiest device denoises the fewest entries
    (ceil(E / r) * ceil(N / (devices / r))); ties go to more rows, so each device keeps fewer
    exemplars' features.
    """
    divisors = [r for r in range(1, devices + 1) if devices % r == 0]
    return min(divisors, key=lambda r: (-(-exemplars // r) * -(-variations // (devices // r)), -r))


def exemplar_mesh(mesh: Mesh, exemplars: int, variations: int) -> Mesh:
    """A 2-D mesh (EXEMPLARS, DATA) of `mesh`'s devices, `exemplar_rows` rows."""
    rows = exemplar_rows(mesh.size, exemplars, variations)
    return Mesh(mesh.devices.reshape(rows, mesh.size // rows), (EXEMPLARS, DATA))


def per_exemplar_sharding(mesh: Mesh, variations: bool = False) -> NamedSharding:
    """Split over the exemplar rows (axis 0); with `variations`, axis 1 over the columns too."""
    return NamedSharding(mesh, PartitionSpec(EXEMPLARS, DATA) if variations else PartitionSpec(EXEMPLARS))


def split_per_variation(inputs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A struct's fields named in its `PER_VARIATION` and the rest, as two dicts of field name -> value."""
    fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    per_variation = {name: fields.pop(name) for name in inputs.PER_VARIATION}
    return per_variation, fields


def over_variations(fn: Callable[[Any, Any], Any], mesh: Mesh, inputs_type: type) -> Callable[..., Any]:
    """`fn(params, inputs)` per device on its slice of the inputs' `PER_VARIATION` fields (axis 0).

    The returned function takes `(params, per_variation, shared)` from `split_per_variation`, so a
    `jit` around it can donate the per-variation fields alone; params and shared fields are replicated.
    """

    def run(params: Any, per_variation: dict[str, Any], shared: dict[str, Any]) -> Any:
        return fn(params, inputs_type(**per_variation, **shared))

    specs = (PartitionSpec(), PartitionSpec(DATA), PartitionSpec())
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(DATA), check_vma=False)


def over_exemplars(fn: Callable[[Any, Any], Any], mesh: Mesh, inputs_type: type) -> Callable[..., Any]:
    """`fn(params, inputs)` per device of an `exemplar_mesh` on its exemplars and its slice of their variations.

    Takes `(params, per_exemplar, shared)`: the struct's `PER_EXEMPLAR` fields (axis 0: exemplars;
    `PER_VARIATION` fields also axis 1: variations) and the rest, replicated. Output (E, N, ...).
    """

    def run(params: Any, per_exemplar: dict[str, Any], shared: dict[str, Any]) -> Any:
        return fn(params, inputs_type(**per_exemplar, **shared))

    def specs(per_exemplar: dict[str, Any]) -> dict[str, PartitionSpec]:
        return {
            name: PartitionSpec(EXEMPLARS, DATA) if name in inputs_type.PER_VARIATION else PartitionSpec(EXEMPLARS)
            for name in per_exemplar
        }

    def program(params: Any, per_exemplar: dict[str, Any], shared: dict[str, Any]) -> Any:
        in_specs = (PartitionSpec(), specs(per_exemplar), PartitionSpec())
        out_specs = PartitionSpec(EXEMPLARS, DATA)
        return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
            params, per_exemplar, shared
        )

    return program


def device_memory_bytes() -> int | None:
    """Memory of one local device: the accelerator's allocator limit, or the host's RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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
    """
    start = len(items) * process_index // process_count
    return list(items[start : len(items) * (process_index + 1) // process_count])
