"""Machines to compile for without having them: TPU slices through libtpu's topologies, NVIDIA GPUs
through the CUDA plugin's (`tpu.gpus`), or D host devices.

A target is named as JAX names a TPU topology (`v5e:2x2`, `v4:2x2x1`, `v6e:2x4`), as Cloud TPU names
an accelerator type (`v5litepod-8`, `v6e-8`, `v4-8`), as `gpu:h100` (one GPU) or `gpu:h100x8` (8 on one
host), or `cpu:D`. `resolve_target` returns the devices to lay programs out on
(`jax.experimental.topologies.get_topology_desc`: compile-only devices, no TPU or GPU needed), the
chip's figures and the hosts the slice spans.

Hosts follow Cloud TPU's VMs: v5e and v6e slices of up to 8 chips are one VM; larger v5e/v6e slices
and every v4/v5p slice have 4 chips per VM (the system architecture pages in `CHIPS`' sources).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from typing import Any

from rival_jax.errors import RivalError
from rival_jax.tpu import gpus
from rival_jax.tpu.gpus import MAX_GPUS_PER_HOST

GIB = 2**30
INSTALL_TPU = 'compiling for TPU needs libtpu: pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's or GPU's public figures: peak dense bf16 FLOP/s, HBM bytes and HBM bytes/s; `source`: where
    they are stated.

    dimensions: the topology's rank (2: a 2-D torus, `v5e:2x4`; 3: `v4:2x2x1`; 1: GPUs on a host);
    cores_per_chip: what Cloud TPU accelerator names count (`v4-8` is 8 TensorCores on 4 chips);
    platform: "tpu" or "gpu".
    """

    name: str
    device_kind: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bytes_per_s: float
    dimensions: int
    cores_per_chip: int
    source: str
    platform: str = "tpu"


CHIPS = {
    chip.name: chip
    for chip in (
        Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 3, 2, "https://cloud.google.com/tpu/docs/v4"),
        Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 2, 1, "https://cloud.google.com/tpu/docs/v5e"),
        Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 3, 2, "https://cloud.google.com/tpu/docs/v5p"),
        Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9, 2, 1, "https://cloud.google.com/tpu/docs/v6e"),
    )
}
NVIDIA = "https://www.nvidia.com/en-us/data-center"
GPU_CHIPS = {
    chip.name: chip
    for chip in (
        Chip("a100", "NVIDIA A100-SXM4-80GB", 312e12, 80 * GIB, 2039e9, 1, 1, f"{NVIDIA}/a100/", "gpu"),
        Chip("h100", "NVIDIA H100 80GB HBM3", 989e12, 80 * GIB, 3350e9, 1, 1, f"{NVIDIA}/h100/", "gpu"),
        Chip("h200", "NVIDIA H200", 989e12, 141 * GIB, 4800e9, 1, 1, f"{NVIDIA}/h200/", "gpu"),
    )
}
ACCELERATOR_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v6e": "v6e"}
SLICE_SHAPES = {
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8)},
}
SINGLE_VM_CHIPS = 8
VM_BOUNDS = (2, 2, 1)
KNOWN_TARGETS = (
    "JAX topologies v5e:AxB, v6e:AxB, v4:AxBxC, v5p:AxBxC (e.g. v5e:2x2, v6e:2x4, v4:2x2x1); Cloud TPU types "
    "v5litepod-N, v6e-N (N chips), v4-N, v5p-N (N TensorCores) (e.g. v5litepod-8, v6e-8, v4-8); NVIDIA GPUs "
    f"gpu:G or gpu:GxN (G one of {', '.join(GPU_CHIPS)}, N up to {MAX_GPUS_PER_HOST} on one host) (e.g. gpu:h100, "
    "gpu:h100x8); cpu:D"
)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A parsed target: `topology` as JAX names it ("v5e:2x4", or "cpu:8"), its chip and its VMs.

    chip None: D host devices (`chips` = D, one host).
    """

    name: str
    topology: str
    chip: Chip | None
    shape: tuple[int, ...]
    chips_per_host_bounds: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def chips_per_host(self) -> int:
        return math.prod(self.chips_per_host_bounds)

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved target: `devices` to compile for (`len(devices)` = chips x `devices_per_chip`).

    devices_per_chip: 2 on v4, whose compile-only topology has one device per TensorCore.
    """

    spec: TargetSpec
    devices: tuple[Any, ...]
    host_devices: tuple[Any, ...] = ()

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.spec.chips

    @property
    def local_devices(self) -> tuple[Any, ...]:
        """One host's devices: what `jax.local_devices()` holds there, so what a run's `local_mesh` spans.

        On a multi-host slice, the devices of a one-host topology of the host's shape (`host_devices`):
        libtpu does not compile collectives over part of a compile-only slice, and a run's programs
        never leave their host.
        """
        return self.host_devices or self.devices

    @property
    def local_chips(self) -> float:
        """Chips of one host: what a host's variations per second are shared by."""
        return len(self.local_devices) / self.devices_per_chip

    def device_memory(self, chip_bytes: int | None = None) -> int:
        """Bytes one device may hold: `chip_bytes` per chip, else the chip's HBM, else (`cpu:D`) host memory."""
        from rival_jax.core.parallel import device_memory_bytes

        chip = self.spec.chip
        per_chip = chip_bytes or (chip.hbm_bytes if chip else device_memory_bytes())
        return int(per_chip // self.devices_per_chip)


def _unknown(name: str) -> RivalError:
    return RivalError(f"target {name!r} is unknown: use one of {KNOWN_TARGETS}")


def _shape(text: str, dimensions: int, name: str) -> tuple[int, ...]:
    sides = text.split("x")
    if len(sides) != dimensions or not all(side.isdigit() and int(side) > 0 for side in sides):
        raise _unknown(name)
    return tuple(int(side) for side in sides)


def _bounds(chip: Chip, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if chip.dimensions == 2 and math.prod(shape) <= SINGLE_VM_CHIPS:
        return (*shape, 1)
    return VM_BOUNDS


def parse_target(name: str) -> TargetSpec:
    """The topology, chip and VMs of target `name`; needs no libtpu.

    Args:
        name: a JAX topology ("v5e:2x2"), a Cloud TPU accelerator type ("v5litepod-8", "v4-8"), "gpu:h100",
            "gpu:h100x8" or "cpu:D".

    >>> parse_target("v4-8").topology, parse_target("v5e:4x4").hosts
    ('v4:2x2x1', 4)
    """
    text = name.strip().lower()
    if match := re.fullmatch(r"cpu:(\d+)", text):
        devices = int(match[1])
        if devices < 1:
            raise RivalError(f"target {name!r} has no devices: use cpu:D with D at least 1")
        return TargetSpec(name, f"cpu:{devices}", None, (devices,), (devices, 1, 1))
    if match := re.fullmatch(r"gpu:([a-z]\d+)(?:x(\d+))?", text):
        count = int(match[2] or 1)
        if match[1] not in GPU_CHIPS or not 1 <= count <= MAX_GPUS_PER_HOST:
            raise _unknown(name)
        return TargetSpec(name, f"gpu:{match[1]}x{count}", GPU_CHIPS[match[1]], (count,), (count, 1, 1))
    if match := re.fullmatch(r"([a-z0-9]+):([0-9x]+)", text):
        if match[1] not in CHIPS:
            raise _unknown(name)
        chip = CHIPS[match[1]]
        shape = _shape(match[2], chip.dimensions, name)
    elif (match := re.fullmatch(r"([a-z0-9]+)-(\d+)", text)) and match[1] in ACCELERATOR_PREFIXES:
        chip = CHIPS[ACCELERATOR_PREFIXES[match[1]]]
        cores, shapes = int(match[2]), SLICE_SHAPES[chip.dimensions]
        chips = cores // chip.cores_per_chip
        if cores % chip.cores_per_chip or chips not in shapes:
            sizes = ", ".join(f"{match[1]}-{count * chip.cores_per_chip}" for count in shapes)
            raise RivalError(f"target {name!r} is not a Cloud TPU slice: use one of {sizes}")
        shape = shapes[chips]
    else:
        raise _unknown(name)
    topology = f"{chip.name}:{'x'.join(map(str, shape))}"
    return TargetSpec(name, topology, chip, shape, _bounds(chip, shape))


def resolve_target(name: str) -> Target:
    """The devices to compile for on target `name`: compile-only TPU devices from libtpu, compile-only GPU
    devices from the CUDA plugin, or host devices.

    Args:
        name: as `parse_target` takes it.

    >>> target = resolve_target("v5e:2x2")
    >>> mesh = jax.sharding.Mesh(np.array(target.devices), ("data",))  # 4 TPU v5 lite devices
    """
    spec = parse_target(name)
    if spec.chip is None:
        return Target(spec, _host_devices(spec.chips))
    if spec.chip.platform == "gpu":
        chip = spec.chip
        config = gpus.target_config(gpus.GPUS[chip.name], chip.device_kind, chip.hbm_bytes, chip.hbm_bytes_per_s)
        return Target(spec, gpus.compile_only_devices(name, config, spec.chips))
    if importlib.util.find_spec("libtpu") is None:
        raise RivalError(INSTALL_TPU)
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            topology_name=spec.topology, platform="tpu", chips_per_host_bounds=spec.chips_per_host_bounds
        )
        host = ()
        if spec.hosts > 1:
            shape = "x".join(map(str, spec.chips_per_host_bounds[: spec.chip.dimensions]))
            bounds = spec.chips_per_host_bounds
            host = topologies.get_topology_desc(
                f"{spec.chip.name}:{shape}", "tpu", chips_per_host_bounds=bounds
            ).devices
    except RuntimeError as error:  # libtpu's JaxRuntimeError: a shape it does not lay out, or its lock held
        if "lockfile" in str(error):
            raise RivalError(
                "another process holds libtpu (/tmp/libtpu_lockfile): let it finish, or set "
                "ALLOW_MULTIPLE_LIBTPU_LOAD=1 where no process uses a real TPU (compiling only)"
            ) from error
        raise RivalError(f"target {name!r}: libtpu cannot lay out {spec.topology} ({error})") from error
    return Target(spec, tuple(topology.devices), tuple(host))


def _host_devices(count: int) -> tuple[Any, ...]:
    import jax

    devices = jax.devices("cpu")
    if len(devices) < count:
        raise RivalError(
            f"target cpu:{count} needs {count} host devices, this process has {len(devices)}: start it with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count}"
        )
    return tuple(devices[:count])
