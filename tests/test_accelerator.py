"""Checks that only mean something on an accelerator: cuDNN attention, bfloat16, several GPUs, device memory.

Marked `accelerator` and skipped where JAX runs on the CPU, so the suite stays green there;
`scripts/accelerator_check.py` runs them (`pytest -m accelerator`) and prints one table. For a smoke
run of the test code on a CPU, set RIVAL_ACCELERATOR_ON_CPU=1 (the script's `--allow-cpu` does).
Each test records its figure with `record_property("figure", ...)` for that table.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from rival_jax import RivalPipeline
from rival_jax.core import attention, parallel
from rival_jax.pipeline import programs

ON_CPU = jax.default_backend() == "cpu"
pytestmark = [
    pytest.mark.accelerator,
    pytest.mark.skipif(
        ON_CPU and not os.environ.get("RIVAL_ACCELERATOR_ON_CPU"),
        reason="needs an accelerator (JAX runs on the CPU); RIVAL_ACCELERATOR_ON_CPU=1 runs them anyway",
    ),
]
PROMPT = "a photo of a cat"


def _relative(value: np.ndarray, reference: np.ndarray) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("head_dim", [40, 64, 80])
@pytest.mark.parametrize("fusion", [False, True], ids=["replacement", "fusion"])
def test_cudnn_attention_is_as_accurate_as_the_blockwise_kernel_in_bfloat16(head_dim, fusion, record_property):
    """Both kernels in bf16 against float32 attention: cuDNN's error stays within the blockwise kernel's.

    SD 1.5's shapes at 512x512: 4096 tokens of the first blocks, two groups of two generated entries.
    """
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN flash attention needs an NVIDIA GPU")
    groups, per_group, tokens, heads = 2, 2, 4096, 8
    keys = jax.random.split(jax.random.PRNGKey(head_dim), 5)
    q = jax.random.normal(keys[0], (groups * per_group, tokens, heads, head_dim))
    reference_kv = tuple(jax.random.normal(k, (groups, tokens, heads, head_dim)) for k in keys[1:3])
    own_kv = tuple(jax.random.normal(k, q.shape) for k in keys[3:]) if fusion else None
    scale = head_dim**-0.5

    def run(kernel, dtype):
        cast = lambda x: None if x is None else jax.tree_util.tree_map(lambda a: a.astype(dtype), x)  # noqa: E731
        return np.asarray(jax.jit(kernel, static_argnums=3)(cast(q), cast(reference_kv), cast(own_kv), scale))

    exact = run(attention._blockwise, jnp.float32)
    blockwise = run(attention._blockwise, jnp.bfloat16)
    cudnn = run(attention._flash, jnp.bfloat16)
    errors = {name: _relative(out, exact) for name, out in (("blockwise", blockwise), ("cudnn", cudnn))}
    record_property("figure", f"rel. error cudnn {errors['cudnn']:.1e}, blockwise {errors['blockwise']:.1e}")
    assert np.isfinite(cudnn).all()
    # bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3): both kernels sit near it; a
    # kernel that drops a term or mixes up keys would be off by order 1.
    assert errors["cudnn"] <= 2 * errors["blockwise"] + 1e-3
    assert errors["cudnn"] < 2e-2


@pytest.fixture(scope="module")
def float32_run(tiny_pipe, exemplar):
    chain = tiny_pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=4)
    return chain, tiny_pipe.generate(chain, num_variations=2, seed=3, output_type="np")


def test_bfloat16_end_to_end_is_finite_and_close_to_float32(tiny_flax, exemplar, float32_run, record_property):
    """The same checkpoint, exemplar and seed in bfloat16 and float32.

    Bounds: one bf16 UNet evaluation is within a few roundoffs (2**-8) per layer of float32, which gives
    the inversion chain's ~3% measured on the tiny model; guidance (scale 7) multiplies that
    difference in every generation step, so the final latents differ by ~9%. The bounds are about
    three times those figures; a wrong bf16 path (an update, softmax or AdaIN statistic left in bf16
    where float32 is needed, a context mixed up) lands near sqrt(2), the distance of unrelated latents.
    """
    chain32, out32 = float32_run
    pipe = RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, dtype="bfloat16")
    chain = pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=4)
    out = pipe.generate(chain, num_variations=2, seed=3, output_type="np")
    assert np.isfinite(np.asarray(chain.latents, np.float32)).all() and np.isfinite(out.latents).all()
    chain_error = _relative(np.asarray(chain.latents, np.float32), chain32.latents)
    latent_error = _relative(out.latents, out32.latents)
    image_error = float(np.abs(out.images - out32.images).mean())
    figure = f"rel. error chain {chain_error:.3f}, latents {latent_error:.3f}; image {image_error:.3f}"
    record_property("figure", figure)
    assert chain_error < 0.1
    assert latent_error < 0.3
    assert image_error < 0.06


def test_generation_sharded_over_all_local_devices_equals_one_device(tiny_flax, exemplar, record_property):
    devices = jax.local_devices()
    if len(devices) < 2:
        pytest.skip("one local device: nothing to shard")
    pipes = [RivalPipeline.from_pretrained(tiny_flax, cache_dir=None) for _ in range(2)]
    pipes[1].mesh = Mesh(np.array(devices[:1]), (parallel.DATA,))
    latents = []
    for pipe in pipes:
        chain = pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=4)
        count = len(devices) + 1  # padded to two batches' worth: the padding must not leak
        latents.append(pipe.generate(chain, num_variations=count, seed=11, output_type="latent").latents)
    sharded, single = latents
    difference = float(np.abs(sharded - single).max() / np.abs(single).max())
    record_property("figure", f"{len(devices)} x {devices[0].device_kind}: max difference {difference:.1e} (rel.)")
    np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-4 * np.abs(single).max())


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("rival_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_memory_figures_fit_the_device(tiny_pipe, float32_run, record_property):
    """XLA's buffer assignment for the inversion and reference programs: it holds the UNet params, and fits."""
    benchmark = _benchmark_module()
    chain, _ = float32_run
    pipe, params = tiny_pipe, tiny_pipe.params["unet"]
    timesteps = jnp.asarray(chain.timesteps)
    conditioning = pipe.encode_prompt([PROMPT], chain.size)
    one_device = dataclasses.replace(pipe.statics, mesh=parallel.sub_mesh(pipe.mesh, 1))
    inversion = benchmark.Timed(
        programs.Program(programs.inversion, one_device)(False),
        params,
        programs.InversionInputs(chain.latents[:1], conditioning, timesteps),
    )
    reference = benchmark.Timed(
        programs.Program(programs.reference, pipe.statics)(False),
        params,
        programs.ReferenceInputs(chain.latents[None], pipe.contexts(chain), timesteps),
    )
    param_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    limit = parallel.device_memory_bytes()
    record_property(
        "figure",
        f"inversion {inversion.gib * 2**30 / 2**20:.1f} MiB, reference {reference.gib * 2**30 / 2**20:.1f} MiB "
        f"of {limit / 2**30:.1f} GiB; peak {benchmark.peak_memory()}",
    )
    for program in (inversion, reference):
        assert param_bytes <= program.gib * 2**30 < limit
    reference.run()
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # accelerators report their allocator's peak; the CPU does not
        assert param_bytes <= stats["peak_bytes_in_use"] <= stats.get("bytes_limit", limit)
