"""Compile targets: parsing (no libtpu needed) and, where libtpu is installed, programs compiled for TPU chips."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rival_jax.errors import RivalError
from rival_jax.tpu import targets
from rival_jax.tpu.targets import parse_target, resolve_target

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='pip install -e ".[tpu]"')


@pytest.mark.parametrize(
    ("name", "topology", "chips", "hosts"),
    [
        ("v5e:2x2", "v5e:2x2", 4, 1),
        ("v5litepod-8", "v5e:2x4", 8, 1),
        ("v6e-8", "v6e:2x4", 8, 1),
        ("v5e:4x4", "v5e:4x4", 16, 4),
        ("v4-8", "v4:2x2x1", 4, 1),
        ("v5p-16", "v5p:2x2x2", 8, 2),
        ("cpu:8", "cpu:8", 8, 1),
    ],
)
def test_targets_name_their_topology_chips_and_hosts(name: str, topology: str, chips: int, hosts: int) -> None:
    spec = parse_target(name)
    assert (spec.topology, spec.chips, spec.hosts, spec.chips_per_host) == (topology, chips, hosts, chips // hosts)


@pytest.mark.parametrize("name", ["v7:2x2", "v5e:2x2x1", "v4:2x2", "gpu:h100", "v5e"])
def test_an_unknown_target_lists_the_known_ones(name: str) -> None:
    with pytest.raises(RivalError, match=r"unknown: use one of JAX topologies v5e:AxB.*cpu:D"):
        parse_target(name)


def test_a_slice_size_cloud_tpu_does_not_offer_lists_the_sizes_it_does() -> None:
    with pytest.raises(RivalError, match="not a Cloud TPU slice: use one of v4-8, v4-16"):
        parse_target("v4-6")


def test_tpu_targets_without_libtpu_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RivalError, match=r'pip install -e "\.\[tpu\]"'):
        resolve_target("v5e:2x2")


def test_cpu_targets_are_this_process_host_devices() -> None:
    assert resolve_target("cpu:1").devices == (jax.devices("cpu")[0],)
    with pytest.raises(RivalError, match="xla_force_host_platform_device_count=100000"):
        resolve_target("cpu:100000")


@needs_libtpu
def test_tpu_targets_resolve_to_compile_only_devices_of_their_chip() -> None:
    v5e, v4, pod = resolve_target("v5e:2x2"), resolve_target("v4-8"), resolve_target("v5e:4x4")
    assert [d.device_kind for d in v5e.devices] == ["TPU v5 lite"] * 4
    assert (len(v4.devices), v4.devices_per_chip) == (8, 2)  # one device per TensorCore
    assert sorted({d.process_index for d in pod.devices}) == [0, 1, 2, 3]
    assert [d.process_index for d in pod.local_devices] == [0] * 4


@pytest.fixture
def no_persistent_cache() -> object:
    """Compile-only executables cannot be read back from the persistent cache: keep them out of it."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)


def _abstract(tree: object, mesh: Mesh, specs: object) -> object:
    """Shapes of `tree` laid out on `mesh` by `specs` (a prefix tree of PartitionSpecs), as a run places them."""
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)), sub
        ),
        specs,
        tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


@needs_libtpu
@pytest.mark.parametrize(("family", "name"), [("sd1", "v5e:2x2"), ("sdxl", "v5e:4x4")])
def test_tiny_generation_compiles_for_tpu_with_variations_split_over_a_hosts_chips(
    family: str, name: str, no_persistent_cache: None
) -> None:
    from diffusers import FlaxUNet2DConditionModel

    from rival_jax.config import RivalConfig
    from rival_jax.core import parallel
    from rival_jax.core.ddim import DDIMSchedule
    from rival_jax.core.sampler import GenerationInputs
    from rival_jax.core.unet import Conditioning
    from rival_jax.models.architectures import TINY
    from rival_jax.models.checkpoints import params_layout
    from rival_jax.pipeline import programs

    arch = TINY[family]
    unet = FlaxUNet2DConditionModel(**arch.unet, dtype=jnp.bfloat16)
    schedule = DDIMSchedule.from_scheduler_config(arch.scheduler)
    target = resolve_target(name)
    chips = len(target.local_devices)  # a run's programs span one host's devices
    mesh = parallel.exemplar_mesh(Mesh(np.array(target.local_devices), (parallel.DATA,)), 1, chips)
    assert mesh.devices.shape == (1, chips)

    def shape(*dims: int, dtype: jnp.dtype = jnp.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(dims, dtype)

    def cond(*leading: int) -> Conditioning:
        text = shape(*leading, 77, unet.config.cross_attention_dim)
        if unet.config.addition_embed_type != "text_time":
            return Conditioning(text)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        return Conditioning(text, {"text_embeds": shape(*leading, pooled), "time_ids": shape(*leading, 6)})

    steps, latent = 2, (4, 8, 8)
    inputs = GenerationInputs(
        start=shape(1, chips, *latent),
        chain=shape(1, steps + 1, *latent),
        conditioning=cond(1, 2),
        contexts=cond(1, 1),
        reference=None,
        region=shape(1, *latent[1:], dtype=jnp.bool_),
        settings=jax.eval_shape(RivalConfig().as_arrays),
        timesteps=jax.ShapeDtypeStruct((steps,), jnp.int32),
    )
    inputs = _abstract(inputs, mesh, parallel.field_specs(inputs))
    params = _abstract(params_layout(unet), mesh, PartitionSpec())
    statics = programs.Statics(programs.Modules(unet, None, schedule, jnp.bfloat16), mesh)
    program = programs.Program(programs.generation, statics)(False)

    compiled = jax.jit(program).lower(params, inputs).compile()

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert memory.argument_size_in_bytes > sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 4
    assert cost["flops"] > 0
    assert compiled.output_shardings.mesh.devices.shape == (1, chips)
    assert chips == 4
    assert targets.CHIPS["v5e"].device_kind == target.devices[0].device_kind
