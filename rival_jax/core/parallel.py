"""Device parallelism, kept in one place: meshes, how each program's inputs are split, padding.

- Variations of E exemplars are denoised on a 2-D mesh ("exemplars", "data") of the local devices
  (`exemplar_mesh`): each row of devices holds its exemplars' chains and features and denoises its
  slice of their variations, with no communication between devices. One exemplar is one row.
- Independent evaluations (several exemplars' inversions, the reference pass's steps) are split
  evenly over the devices (`spread`).
- What is split is declared by the inputs' struct: its `SPLIT` class variable names, per field, the
  mesh axes its leading dimensions are split over; every other field is replicated (`sharded`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
EXEMPLARS = "exemplars"


def local_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh ("data") over this process's devices, or over `devices` (a compile target's host-local ones).

    >>> local_mesh(resolve_target("v5e:2x2").local_devices).size  # compile-only TPU devices
    4
    """
    return Mesh(np.array(jax.local_devices() if devices is None else list(devices)), (DATA,))


def padded_length(count: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `count` items.

    >>> padded_length(5, 8)
    8
    """
    return -(-count // multiple) * multiple


def pad_to(items: np.ndarray, length: int) -> np.ndarray:
    """Pad along axis 0 to `length` by repeating the last item (the padding is computed, then dropped).

    >>> pad_to(np.arange(3), 5)
    array([0, 1, 2, 2, 2])
    """
    items = np.asarray(items)
    return np.concatenate([items, np.repeat(items[-1:], length - len(items), axis=0)]) if length > len(items) else items


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def spread(items: int, devices: int) -> tuple[int, int]:
    """(devices used, items per device): `items` independent evaluations over at most `devices`, fewest per device."""
    per_device = -(-items // devices)
    return -(-items // per_device), per_device


def sub_mesh(mesh: Mesh, count: int) -> Mesh:
    """A 1-D mesh ("data") over the first `count` devices of `mesh`."""
    return Mesh(np.array(mesh.devices.flat[:count]), (DATA,))


def exemplar_rows(devices: int, exemplars: int, variations: int) -> int:
    """Rows of an `exemplar_mesh` of `devices` for `exemplars` x `variations` generated entries.

    Of the divisors r of `devices`, the one whose busiest device denoises the fewest entries
    (ceil(E / r) * ceil(N / (devices / r))); ties go to the fewest padded exemplars, then to more
    rows, so each device keeps fewer exemplars' features.
    """
    divisors = [r for r in range(1, devices + 1) if devices % r == 0]

    def cost(rows: int) -> tuple[int, int, int]:
        busiest = -(-exemplars // rows) * -(-variations // (devices // rows))
        return busiest, padded_length(exemplars, rows) - exemplars, -rows

    return min(divisors, key=cost)


def exemplar_mesh(mesh: Mesh, exemplars: int, variations: int) -> Mesh:
    """A 2-D mesh (EXEMPLARS, DATA) of `mesh`'s devices, `exemplar_rows` rows."""
    rows = exemplar_rows(mesh.size, exemplars, variations)
    return Mesh(mesh.devices.reshape(rows, mesh.size // rows), (EXEMPLARS, DATA))


def field_specs(inputs: Any) -> Any:
    """The struct `inputs` with each field replaced by its `PartitionSpec`: its `SPLIT` axes, else replicated."""
    split = getattr(type(inputs), "SPLIT", {})
    names = [f.name for f in dataclasses.fields(inputs) if f.metadata.get("pytree_node", True)]
    return inputs.replace(**{name: PartitionSpec(*split.get(name, ())) for name in names})


def shardings(inputs: Any, mesh: Mesh) -> Any:
    """The struct `inputs` with each field replaced by its `NamedSharding` on `mesh`, as `sharded` splits it;
    any other tree (params) is replicated whole."""
    if not dataclasses.is_dataclass(inputs):
        return replicated(mesh)
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec), field_specs(inputs), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def place(inputs: Any, mesh: Mesh) -> Any:
    """`inputs` on the devices of `mesh` as `sharded` splits them (so the program moves nothing first)."""
    return jax.device_put(inputs, shardings(inputs, mesh))


def abstract(inputs: Any, mesh: Mesh) -> Any:
    """`inputs` (arrays or shapes) as `jax.ShapeDtypeStruct`s laid out as `place` puts them: what compiling
    for a mesh of devices this process does not have (`tpu.targets`) needs instead of arrays.

    >>> abstract(GenerationInputs(start=jax.ShapeDtypeStruct((1, 8, 4, 64, 64), jnp.float32), ...), mesh)
    """
    return jax.tree_util.tree_map(
        lambda sharding, field: jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), field
        ),
        shardings(inputs, mesh),
        inputs,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def sharded(fn: Callable[[Any, Any], Any], mesh: Mesh, out_axes: tuple[str, ...]) -> Callable[[Any, Any], Any]:
    """`fn(params, inputs)` per device of `mesh` on its block of each field that `inputs`' struct splits.

    params and the other fields are replicated; the output comes back split over `out_axes` (leading
    dimensions, as the fields are split).

    >>> program = sharded(lambda params, inputs: inputs.x * params, mesh, (DATA,))  # SPLIT = {"x": (DATA,)}
    """

    def program(params: Any, inputs: Any) -> Any:
        specs = (PartitionSpec(), field_specs(inputs))
        out = PartitionSpec(*out_axes)
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)(params, inputs)

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
