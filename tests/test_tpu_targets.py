"""Compile targets: parsing (no libtpu needed) and, where libtpu is installed, programs compiled for TPU chips."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest

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


@pytest.mark.parametrize("name", ["v7:2x2", "v5e:2x2x1", "v4:2x2", "gpu:v100", "v5e"])
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


@needs_libtpu
@pytest.mark.parametrize(("model", "name"), [("tiny", "v5e:2x2"), ("tiny-sdxl", "v5e:4x4")])
def test_tiny_generation_compiles_for_tpu_with_variations_split_over_a_hosts_chips(model: str, name: str) -> None:
    """The run's generation program, from shapes, on one host's chips: 4 on v5e:2x2, the first host's 4 of v5e:4x4."""
    from rival_jax.tpu import shapes as build
    from rival_jax.tpu.plan import Planner

    shapes = build.model_shapes(model, None, jnp.bfloat16, 64, False)
    target = resolve_target(name)
    planner = Planner(shapes, target, "pallas", 8, targets.CHIPS["v5e"].hbm_bytes)
    call = build.generation(shapes, planner.statics, (1, 8, 2, 2), None)

    measured, out = planner.measure(call)

    assert out.sharding.mesh.devices.shape == (1, 4) and out.shape[:2] == (1, 8)
    assert set(out.sharding.mesh.devices.flat) <= set(target.local_devices)
    assert {d.device_kind for d in out.sharding.mesh.devices.flat} == {targets.CHIPS["v5e"].device_kind}
    params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes.params["unet"]))
    assert measured.arguments >= params and measured.temporaries > 0 and measured.flops > 0
    assert 0 < measured.roofline_s < 1
