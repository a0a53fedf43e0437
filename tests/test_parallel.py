"""Variations spread over devices: the same image for variation i whatever the device count or batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from rival_jax.core.parallel import pad_to, padded_length
from rival_jax.jobs.hosts import process_share

from .conftest import eight_devices

SCRIPT = textwrap.dedent(
    """
    import sys, jax, numpy as np
    from rival_jax import RivalPipeline
    pipe = RivalPipeline.from_pretrained(sys.argv[1], cache_dir=None, controlnet=[sys.argv[4]])
    chain = pipe.invert(np.load(sys.argv[2]), prompt="a photo of a cat", num_inference_steps=6)
    out = pipe.generate(chain, num_variations=5, seed=21, output_type="latent", control_image="canny")
    np.save(sys.argv[3], out.latents)
    print(pipe.mesh.size)
    """
)


def test_eight_devices_give_the_same_variations_as_one(tmp_path, tiny_flax, tiny_controlnet, exemplar):
    """SD 1 with a ControlNet, whose map is replicated like the exemplar's features (SDXL's eight devices, each
    with its own map: tests/test_controlnet_sdxl.py)."""
    from rival_jax import RivalPipeline

    pipe = RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, controlnet=[tiny_controlnet])
    np.save(tmp_path / "exemplar.npy", exemplar)
    env = eight_devices()
    files = (str(tmp_path / "exemplar.npy"), str(tmp_path / "l.npy"))
    command = [sys.executable, "-c", SCRIPT, str(tiny_flax), *files, str(tiny_controlnet)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "8"
    eight = np.load(tmp_path / "l.npy")
    chain = pipe.invert(exemplar, prompt="a photo of a cat", num_inference_steps=6)
    one = pipe.generate(chain, num_variations=5, seed=21, output_type="latent", control_image="canny").latents
    assert pipe.mesh.size == 1 and eight.shape == one.shape == (5, 4, 12, 16)
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-4 * np.abs(one).max())


def test_variation_does_not_depend_on_its_batch(tiny_pipe, tiny_chain):
    full = tiny_pipe.generate(tiny_chain, num_variations=4, seed=2, output_type="latent")
    picked = tiny_pipe.generate(tiny_chain, variation_indices=[3, 1], seed=2, output_type="latent", batch_size=4)
    np.testing.assert_array_equal(picked.indices, [3, 1])
    np.testing.assert_allclose(picked.latents, full.latents[[3, 1]], rtol=1e-4, atol=1e-4 * np.abs(full.latents).max())


def test_padding_and_shares():
    assert padded_length(5, 8) == 8 and padded_length(16, 8) == 16 and padded_length(0, 8) == 0
    np.testing.assert_array_equal(pad_to(np.arange(3), 5), [0, 1, 2, 2, 2])
    np.testing.assert_array_equal(pad_to(np.arange(3), 2), [0, 1, 2])
    items = list(range(23))
    for count in (1, 2, 3, 8):
        parts = [process_share(items, index, count) for index in range(count)]
        assert [item for part in parts for item in part] == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert process_share(items, 1, 2) == list(range(11, 23))


def test_abstract_inputs_carry_the_shardings_place_gives_the_arrays() -> None:
    """What a plan compiles for devices it lacks is laid out as a run places its arrays."""
    import jax
    import jax.numpy as jnp

    from rival_jax.core import parallel
    from rival_jax.core.unet import Conditioning
    from rival_jax.pipeline.programs import PlainInputs

    inputs = PlainInputs(jnp.zeros((2, 4, 8, 8)), Conditioning(jnp.zeros((2, 77, 32))), jnp.arange(3), jnp.float32(7))
    mesh = parallel.local_mesh()
    placed, shapes = parallel.place(inputs, mesh), parallel.abstract(inputs, mesh)

    for array, shape in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(shapes), strict=True):
        assert isinstance(shape, jax.ShapeDtypeStruct)
        assert (shape.shape, shape.dtype, shape.sharding) == (array.shape, array.dtype, array.sharding)
    assert shapes.start.sharding.spec == parallel.PartitionSpec(parallel.DATA)
    params = parallel.abstract({"w": jnp.zeros((3, 3))}, mesh)
    assert params["w"].sharding == parallel.replicated(mesh)
