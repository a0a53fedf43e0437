"""NVIDIA GPU targets: names, the missing-plugin message, custom calls' costs and, where the CUDA plugin and
CUDA's libraries are installed (`pip install -e ".[gpu]"`), the tiny model compiled for an H100 without one."""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import pytest

from rival_jax.cli import main
from rival_jax.errors import RivalError
from rival_jax.tpu import gpus
from rival_jax.tpu import shapes as build
from rival_jax.tpu.plan import Planner, _persistent_cache_off
from rival_jax.tpu.shapes import model_shapes
from rival_jax.tpu.targets import GIB, parse_target, resolve_target

needs_cuda = pytest.mark.skipif(not gpus.cuda_installed(), reason='no CUDA plugin: pip install -e ".[gpu]"')

# A module as XLA's GPU compiler leaves it: cuDNN attention (16 queries, 32 keys, 2 heads of 8), then a loop
# whose body picks one of two branches of cuDNN convolutions (3x3, 8 input features; one, or two) and runs a
# cuBLAS matmul contracting 16: the custom calls XLA's cost analysis counts as unknown.
HLO = """HloModule m

%branch_small (p: bf16[1,4,4,8]) -> bf16[1,4,4,2] {
  %p = bf16[1,4,4,8]{3,2,1,0} parameter(0)
  %k = bf16[3,3,8,2]{3,2,1,0} constant({...})
  %conv = (bf16[1,4,4,2]{3,2,1,0}, u8[0]{0}) custom-call(%p, %k), window={size=3x3 pad=1_1x1_1}, \
dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  ROOT %out = bf16[1,4,4,2]{3,2,1,0} get-tuple-element(%conv), index=0
}

%branch_large (q: bf16[1,4,4,8]) -> bf16[1,4,4,2] {
  %q = bf16[1,4,4,8]{3,2,1,0} parameter(0)
  %w = bf16[3,3,8,2]{3,2,1,0} constant({...})
  %conv.1 = (bf16[1,4,4,2]{3,2,1,0}, u8[0]{0}) custom-call(%q, %w), window={size=3x3 pad=1_1x1_1}, \
dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBiasActivationForward"
  %conv.2 = (bf16[1,4,4,2]{3,2,1,0}, u8[0]{0}) custom-call(%q, %w), window={size=3x3 pad=1_1x1_1}, \
dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  ROOT %out.1 = bf16[1,4,4,2]{3,2,1,0} get-tuple-element(%conv.2), index=0
}

%cond (c: bf16[1,4,4,8]) -> pred[] {
  %c = bf16[1,4,4,8]{3,2,1,0} parameter(0)
  ROOT %t = pred[] constant(true)
}

%body (x: bf16[1,4,4,8]) -> bf16[1,4,4,8] {
  %x = bf16[1,4,4,8]{3,2,1,0} parameter(0)
  %i = s32[] constant(0)
  %picked = bf16[1,4,4,2]{3,2,1,0} conditional(%i, %x, %x), branch_computations={%branch_small, %branch_large}
  %a = f32[8,16]{1,0} constant({...})
  %b = f32[16,4]{1,0} constant({...})
  %mm = (f32[8,4]{1,0}, s8[64]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"]}}}
  ROOT %y = bf16[1,4,4,8]{3,2,1,0} copy(%x)
}

ENTRY %main (e: bf16[1,4,4,8]) -> bf16[1,4,4,8] {
  %e = bf16[1,4,4,8]{3,2,1,0} parameter(0)
  %qq = bf16[1,16,2,8]{3,2,1,0} constant({...})
  %kk = bf16[1,32,2,8]{3,2,1,0} constant({...})
  %att = (bf16[1,2,16,8]{3,1,2,0}, u8[0]{0}) custom-call(%qq, %kk, %kk), custom_call_target="__cudnn$fmhaSoftmax", \
backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", \
"dimensions": ["1", "2", "16", "32"], "tuple_shapes": []}}}
  ROOT %loop = bf16[1,4,4,8]{3,2,1,0} while(%e), condition=%cond, body=%body
}
"""


@pytest.mark.parametrize(
    ("name", "topology", "devices", "kind"),
    [
        ("gpu:h100", "gpu:h100x1", 1, "NVIDIA H100 80GB HBM3"),
        ("gpu:h100x8", "gpu:h100x8", 8, "NVIDIA H100 80GB HBM3"),
        ("GPU:A100x2", "gpu:a100x2", 2, "NVIDIA A100-SXM4-80GB"),
        ("gpu:h200", "gpu:h200x1", 1, "NVIDIA H200"),
    ],
)
def test_gpu_targets_name_their_gpu_and_its_count_on_one_host(
    name: str, topology: str, devices: int, kind: str
) -> None:
    spec = parse_target(name)
    assert (spec.topology, spec.chips, spec.hosts, spec.chip.device_kind, spec.chip.platform) == (
        topology,
        devices,
        1,
        kind,
        "gpu",
    )


@pytest.mark.parametrize("name", ["gpu:v100", "gpu:h100x9", "gpu:h100x0", "gpu:", "gpu:h100x2x2"])
def test_an_unknown_gpu_target_lists_the_known_ones(name: str) -> None:
    with pytest.raises(RivalError, match=r"unknown: use one of .*gpu:GxN \(G one of a100, h100, h200"):
        parse_target(name)


def test_gpu_targets_without_the_cuda_plugin_say_how_to_install_it_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax_plugins.xla_cuda12" else real(name, *a)
    )
    assert main(["plan", "--target", "gpu:h100", "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[gpu]"' in err


def test_custom_calls_count_a_loop_body_once_and_the_costliest_branch() -> None:
    conv = 2 * (1 * 4 * 4 * 2) * (3 * 3 * 8)
    matmul = 2 * (8 * 4) * 16
    conv_bytes = 2 * (1 * 4 * 4 * 8 + 3 * 3 * 8 * 2 + 1 * 4 * 4 * 2)
    matmul_bytes = 4 * (8 * 16 + 16 * 4 + 8 * 4)
    attention = 2 * (16 * 32 * 2) * 8 * 2  # scores, then scores times values
    attention_bytes = 2 * (16 * 2 * 8 + 2 * 32 * 2 * 8 + 2 * 16 * 8)
    assert gpus.custom_call_cost(HLO) == (
        attention + 2 * conv + matmul,
        attention_bytes + 2 * conv_bytes + matmul_bytes,
    )


@needs_cuda
def test_the_tiny_generation_compiles_for_an_h100_with_the_flops_of_the_host_program() -> None:
    shapes = model_shapes("tiny", None, jnp.bfloat16, 64, False)
    measured = {}
    for name in ("gpu:h100", "cpu:1"):
        target = resolve_target(name)
        planner = Planner(shapes, target, "xla", 8, 64 * GIB)
        call = build.generation(shapes, planner.statics, (1, 2, 2, 1), None)
        with _persistent_cache_off():  # compile-only programs cannot be read back from it
            compiled = planner.executables.compile(call.label, call.program, False, call.args)
        cost = compiled.cost_analysis() if name == "cpu:1" else gpus.cost_analysis(compiled)
        measured[name] = target.devices[0].device_kind, compiled.memory_analysis(), cost["flops"]
    kind, memory, flops = measured["gpu:h100"]
    assert kind == "NVIDIA H100 80GB HBM3" and memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0
    assert flops == pytest.approx(measured["cpu:1"][2], rel=0.1)  # the same program, counted on another backend
