"""NVIDIA GPUs to compile for without one: a GPU target description handed to JAX's CUDA plugin.

XLA's GPU PJRT plugin makes a compile-only topology from a `GpuTargetConfigProto` in text format (its
`target_config` option) and a `topology` "slices x hosts x devices" (`PJRT_GpuDeviceTopology_Create` in
xla/pjrt/c/pjrt_c_api_gpu_internal.cc); JAX reaches it through
`jax.experimental.topologies.get_topology_desc(platform="cuda", ...)`. The description is written here
from each GPU's public figures (`GPUS`): what XLA's GPU compiler reads of a device (compute capability,
SMs, shared memory, L2, clock, memory), as a device query of the real GPU would report it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
from typing import Any

from rival_jax.errors import RivalError

INSTALL_GPU = 'compiling for NVIDIA GPUs needs the CUDA plugin and CUDA\'s libraries: pip install -e ".[gpu]"'
MAX_GPUS_PER_HOST = 8
CUDNN_VERSION = (9, 8, 0)  # the oldest cuDNN the CUDA plugin accepts (jax-cuda12-plugin's nvidia-cudnn-cu12>=9.8)
ACCELERATED = " feature_extension: ACCELERATED_FEATURES"  # sm_90a: what a Hopper GPU reports (wgmma)
CUDA_GUIDE = "https://docs.nvidia.com/cuda/cuda-c-programming-guide/#features-and-technical-specifications"


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What XLA's GPU compiler reads of one device: compute capability, SMs (`cores`), FP32 units per SM,
    shared memory per SM and per block (opt-in), L2 bytes and boost clock; `source` states the SM figures.

    Per compute capability (`CUDA_GUIDE`): 8.0 has 164 KiB of shared memory per SM (163 KiB per block),
    9.0 has 228 KiB (227 KiB per block); both 2048 threads and 64 Ki registers per SM, 1024 threads per block.
    """

    compute_capability: tuple[int, int]
    cores: int
    fpus_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    l2_bytes: int
    clock_ghz: float
    source: str


AMPERE = (8, 0), 164 * 1024, 163 * 1024
HOPPER = (9, 0), 228 * 1024, 227 * 1024
AMPERE_SOURCE = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet.pdf"
HOPPER_SOURCE = "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper"
GPUS = {
    "a100": Gpu(AMPERE[0], 108, 64, *AMPERE[1:], 40 * 2**20, 1.41, AMPERE_SOURCE),
    "h100": Gpu(HOPPER[0], 132, 128, *HOPPER[1:], 50 * 2**20, 1.98, HOPPER_SOURCE),
    "h200": Gpu(HOPPER[0], 132, 128, *HOPPER[1:], 50 * 2**20, 1.98, HOPPER_SOURCE),  # H100's GH100 with HBM3e
}


def target_config(gpu: Gpu, device_kind: str, memory_bytes: int, bandwidth: float) -> str:
    """`gpu` as a `GpuTargetConfigProto` in text format: what the CUDA plugin's `target_config` option takes.

    Args:
        gpu: the device's figures; device_kind: its name (what `device.device_kind` says);
        memory_bytes, bandwidth: its HBM bytes and bytes/s.

    >>> "core_count: 132" in target_config(GPUS["h100"], "NVIDIA H100 80GB HBM3", 80 * 2**30, 3.35e12)
    True
    """
    major, minor = gpu.compute_capability
    figures = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": gpu.shared_memory_per_core,
        "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
        "threads_per_core_limit": 2048,
        "core_count": gpu.cores,
        "fpus_per_core": gpu.fpus_per_core,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(bandwidth),
        "l2_cache_size": gpu.l2_bytes,
        "clock_rate_ghz": gpu.clock_ghz,
        "device_memory_size": memory_bytes,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    lines = [f"  {name}: {value}" for name, value in figures.items()]
    cudnn = dict(zip(("major", "minor", "patch"), CUDNN_VERSION, strict=True))
    return "\n".join(
        [
            "gpu_device_info {",
            *lines,
            f"  cuda_compute_capability {{ major: {major} minor: {minor}{ACCELERATED if major == 9 else ''} }}",
            f'  name: "{device_kind}"',
            "}",
            'platform_name: "CUDA"',
            "dnn_version_info { " + " ".join(f"{k}: {v}" for k, v in cudnn.items()) + " }",
            f'device_description_str: "{device_kind}"',
        ]
    )


def compile_only_devices(name: str, config: str, count: int) -> tuple[Any, ...]:
    """`count` compile-only devices of one host from the CUDA plugin, for the GPU `config` describes.

    Args:
        name: the target, for messages; config: `target_config`'s text; count: devices on the host.
    """
    if not cuda_installed():
        raise RivalError(INSTALL_GPU)
    # The plugin's start-up check of CUDA's versions calls cuInit, which fails where no GPU (driver) is;
    # compiling for a GPU needs neither, and nothing in this process runs on one.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    def describe() -> Any:
        return topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{count}")

    try:
        try:
            topology = describe()
        except NotImplementedError:  # JAX found the plugin before the check was skipped: its start failed
            importlib.import_module("jax_plugins.xla_cuda12").initialize()
            topology = describe()
    except (NotImplementedError, RuntimeError) as error:
        raise RivalError(f"target {name!r}: the CUDA plugin cannot lay out {count} GPUs ({error})") from error
    return tuple(topology.devices)


def cost_analysis(compiled: Any) -> dict[str, float]:
    """FLOPs and bytes accessed per device of a program compiled for compile-only GPU devices.

    The CUDA plugin does not answer `compiled.cost_analysis()` for them ("UNIMPLEMENTED: GetCostAnalysis is
    not supported"), so XLA's HLO cost analysis runs on the optimized per-device module on the host backend.
    That analysis counts custom calls as unknown: cuDNN convolutions and attention and cuBLAS matmuls are
    added from their shapes (FLOPs: 2 per multiply-add; bytes: their operands and outputs), as XLA counts
    the rest: a loop body once, the costliest branch of a conditional.

    Args:
        compiled: `jax.jit(f).lower(...).compile()` for devices of `compile_only_devices`.

    >>> cost_analysis(compiled)["flops"]  # per device
    """
    import jax
    from jax._src.lib import _jax

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    flops, accessed = custom_call_cost(module.to_string())
    return {"flops": cost.get("flops", 0.0) + flops, "bytes accessed": cost.get("bytes accessed", 0.0) + accessed}


COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
DEFINITION = re.compile(r"%([\w.\-]+) = \(?(\w+)\[([\d,]*)\]")
CALLEE = re.compile(r"(?:body|condition|to_apply|calls)=%([\w.\-]+)")
BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|true_computation=%([\w.\-]+), false_computation=%([\w.\-]+)")
CUSTOM_CALL = re.compile(
    r'= \(?(\w+)\[([\d,]*)\].* custom-call\(([^)]*)\).*custom_call_target="(__cudnn\$conv|__cudnn\$fmha|__cublas\$)'
)
ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8}


def custom_call_cost(text: str) -> tuple[float, float]:
    """FLOPs and bytes of the cuDNN convolutions and attention and cuBLAS matmuls of an HLO module's text,
    per device, counted as XLA counts the rest (see `cost_analysis`).

    Args:
        text: an optimized GPU module as `compiled.as_text()` prints it.

    >>> flops, accessed = custom_call_cost(compiled.as_text())
    """
    computations: dict[str, list[str]] = {}
    entry, body = "", []
    for line in text.splitlines():
        if header := COMPUTATION.match(line):
            body = computations.setdefault(header[1], [])
            entry = header[1] if line.startswith("ENTRY") else entry
        elif line.startswith("  "):
            body.append(line)
    shapes = {name: (dtype, _dims(dims)) for name, dtype, dims in DEFINITION.findall(text)}

    @functools.cache
    def cost(name: str) -> tuple[float, float]:
        totals = [0.0, 0.0]
        for line in computations[name]:
            parts = [cost(callee) for callee in CALLEE.findall(line)]
            if branches := BRANCHES.search(line):
                names = re.findall(r"[\w.\-]+", (branches[1] or "").replace("%", "")) or branches.group(2, 3)
                parts.append(tuple(max(pair) for pair in zip(*map(cost, names), strict=True)))
            if call := CUSTOM_CALL.search(line):
                parts.append(_custom_call(line, call, shapes))
            for flops, accessed in parts:
                totals[0] += flops
                totals[1] += accessed
        return totals[0], totals[1]

    return cost(entry)


def _custom_call(line: str, call: re.Match, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[float, float]:
    dtype, dims, operand_names, target = call.groups()
    operands = [shapes[name.strip().lstrip("%")] for name in operand_names.split(",") if name.strip()]
    outputs = (dtype, _dims(dims))
    if target == "__cudnn$conv":
        window = math.prod(int(side) for side in re.search(r"size=([\dx]+)", line)[1].split("x"))
        kernel_labels = re.search(r"dim_labels=\w+_(\w+)->", line)[1]
        flops = 2.0 * math.prod(outputs[1]) * window * operands[1][1][kernel_labels.index("i")]
    elif target == "__cudnn$fmha":  # scores Q K^T, then their softmax times V: [B, H, Sq, Sk] by the head size
        scores = _dims(re.search(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\[([^\]]*)\]', line)[1])
        flops = 4.0 * math.prod(scores) * outputs[1][-1]
    else:
        indices = _dims(re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', line)[1])
        flops = 2.0 * math.prod(outputs[1]) * math.prod(operands[0][1][i] for i in indices)
    return flops, float(sum(_bytes(*shape) for shape in (*operands, outputs)))


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(side.strip(' "')) for side in text.split(",") if side.strip(' "'))


def _bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return ELEMENT_BYTES.get(dtype, 1) * math.prod(dims)


def cuda_installed() -> bool:
    """Whether JAX's CUDA plugin and the CUDA libraries a compile needs (ptxas, cuDNN) are importable."""
    try:
        return all(
            importlib.util.find_spec(name) for name in ("jax_plugins.xla_cuda12", "nvidia.cuda_nvcc", "nvidia.cudnn")
        )
    except ModuleNotFoundError:  # a parent package is missing
        return False
