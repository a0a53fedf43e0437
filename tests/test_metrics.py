"""Metrics on hand-computed cases: KID, palettes, CLIP cosine and loading, the torch-free .pth reader, Inception,
the fixed-size batches feature extractors run in."""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from rival_jax.errors import RivalError
from rival_jax.metrics.batched import BATCH, run_batched
from rival_jax.metrics.clip import cosine, load_clip, mean_pairwise_distance, write_tiny_clip
from rival_jax.metrics.inception import (
    FEATURES,
    FIDInceptionV3,
    inception_features,
    inception_layout,
    load_inception,
)
from rival_jax.metrics.kid import kid, mmd2_unbiased, polynomial_kernel
from rival_jax.metrics.palette import palette, palette_distance
from rival_jax.metrics.torch_checkpoint import read_torch_state_dict
from rival_jax.models.random_models import random_params

# torch.save's two formats, written without torch: tensors pickled as torch._utils._rebuild_tensor_v2
# calls on persistent storages, storages stored in the zip (or after the pickle in the legacy stream).
STORAGES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.float16): "HalfStorage",
}


class _Global:
    """A reference pickled by name only (torch's classes and functions, which are not installed)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError("a name only")


class _Tensor:
    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array

    def __reduce__(self):
        strides = tuple(s // self.array.itemsize for s in self.array.strides)
        arguments = (("storage", self), 0, self.array.shape, strides, False, collections.OrderedDict())
        return _Global("torch._utils", "_rebuild_tensor_v2"), arguments


class _TorchPickler(pickle._Pickler):
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage":
            tensor = obj[1]
            return ("storage", _Global("torch", STORAGES[tensor.array.dtype]), tensor.key, "cpu", tensor.array.size)
        return None


def _tensors(state: dict[str, np.ndarray]) -> dict[str, _Tensor]:
    tensors = collections.OrderedDict()
    for index, (name, array) in enumerate(state.items()):
        tensors[name] = _Tensor(str(index), array if array.flags.f_contiguous else np.ascontiguousarray(array))
    return tensors


def write_torch_zip(state: dict[str, np.ndarray], path: Path) -> None:
    tensors, buffer = _tensors(state), io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(tensors)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/data.pkl", buffer.getvalue())
        for tensor in tensors.values():
            archive.writestr(f"weights/data/{tensor.key}", tensor.array.tobytes(order="A"))
        archive.writestr("weights/version", "3\n")


def write_torch_legacy(state: dict[str, np.ndarray], path: Path) -> None:
    tensors = _tensors(state)
    with open(path, "wb") as stream:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, stream, protocol=2)
        _TorchPickler(stream, protocol=2).dump(tensors)
        pickle.dump([tensor.key for tensor in tensors.values()], stream, protocol=2)
        for tensor in tensors.values():
            stream.write(np.int64(tensor.array.size).tobytes() + tensor.array.tobytes(order="A"))


def test_unbiased_mmd_matches_a_hand_computed_case():
    # d = 1, k(a, b) = (ab + 1)^3: k(0,1) = 1, k(1,2) = 27, k(0,2) = 1, k(1,1) = 8.
    # within x: 2 * 1 / 2 = 1; within y: 2 * 27 / 2 = 27; across: 2 * (1 + 1 + 8 + 27) / 4 = 18.5.
    assert mmd2_unbiased(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])) == pytest.approx(9.5)


def test_kid_of_identical_feature_sets_is_about_zero_and_grows_with_a_shift():
    features = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1000, 16)))
    small, _ = kid(features[:50], features[:50], subsets=1, subset_size=50)
    large, _ = kid(features, features, subsets=1, subset_size=1000)
    # Against itself the unbiased estimate is -2 (mean diagonal - mean kernel) / (m - 1): zero as 1/m.
    kernel = polynomial_kernel(features[:50], features[:50])
    assert small == pytest.approx(-2 * (np.trace(kernel) / 50 - kernel.mean()) / 49)
    assert abs(large) < abs(small) / 10
    independent, _ = kid(features[:500], features[500:], subsets=2, subset_size=500)
    shifted, _ = kid(features[:500], features[500:] + 0.5, subsets=2, subset_size=500)
    assert abs(independent) < 0.02 * shifted
    assert kid(features[:1], features) is None


def test_kid_subsets_are_seeded():
    real = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (30, 8)))
    fake = real[:20] + 0.3
    first, again, other = (kid(real, fake, subsets=10, subset_size=10, seed=s) for s in (0, 0, 1))
    assert first == again and first != other and first[1] > 0


def test_palette_of_a_two_colour_image():
    pixels = np.zeros((8, 12, 3), np.uint8)
    pixels[:, :5] = (255, 0, 0)
    pixels[:, 5:] = (0, 0, 255)
    two = palette(pixels, colours=2)
    assert sorted(map(tuple, two)) == [(0.0, 0.0, 1.0), (1.0, 0.0, 0.0)]
    assert {tuple(c) for c in palette(pixels)} == {(0.0, 0.0, 1.0), (1.0, 0.0, 0.0)}
    assert palette(pixels).shape == (10, 3)


def test_palette_distance_matches_colours_before_summing():
    black_white = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    white_navy = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.5]])
    assert palette_distance(black_white, white_navy) == pytest.approx(0.5)  # unmatched order would give 5.5
    assert palette_distance(white_navy, black_white) == pytest.approx(0.5)


def test_palette_distance_is_zero_for_identical_images_and_deterministic():
    noise = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (24, 24, 3), 0, 256)).astype(np.uint8)
    assert palette_distance(palette(noise, seed=3), palette(noise.copy(), seed=3)) == 0.0
    assert palette_distance(palette(noise), palette(255 - noise)) > 1.0


def test_cosine_and_pairwise_distance():
    features = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    assert cosine(features, features) == pytest.approx(np.ones(3))
    assert cosine(features[1:], features[:1] * 7) == pytest.approx([3 / np.sqrt(14), 1 / np.sqrt(14)])
    assert mean_pairwise_distance(features[1:]) == pytest.approx(1.0)
    assert mean_pairwise_distance(np.repeat(features[:1], 3, axis=0)) == pytest.approx(0.0, abs=1e-7)
    assert mean_pairwise_distance(features[:1]) is None


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


def test_tiny_clip_loads_through_the_safetensors_converter_and_its_cache(clip_folder, tmp_path):
    from safetensors.numpy import load_file

    converted = load_clip(clip_folder, cache_dir=tmp_path)
    cached = load_clip(clip_folder, cache_dir=tmp_path)
    assert list((tmp_path / "params").iterdir()), "the converted weights are cached"
    state = load_file(str(clip_folder / "model.safetensors"))
    patch = converted.params["vision_model"]["embeddings"]["patch_embedding"]["kernel"]
    np.testing.assert_array_equal(patch, state["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(converted.params["text_projection"]["kernel"], state["text_projection.weight"].T)
    assert converted.random_weights and converted.params["logit_scale"].shape == ()
    pictures = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (40, 30), (20, 30, 230))]
    features = converted.image_features([*pictures, pictures[0]])
    np.testing.assert_allclose(cached.image_features(pictures), features[:2], rtol=1e-5, atol=1e-6)
    assert features.shape == (3, 16) and cosine(features[0], features[2]) == pytest.approx(1.0, abs=1e-6)
    texts = converted.text_features(["a photo of a cat", "a red house", "a photo of a cat"])
    assert texts.shape == (3, 16) and cosine(texts[0], texts[2]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(texts[0], texts[1]) < 0.999


def test_clip_names_that_are_not_models_are_refused(tmp_path):
    for name, message in ((tmp_path, "no config.json"), ("not-a-model", "does not exist")):
        with pytest.raises(RivalError, match=message):
            load_clip(name, cache_dir=None)


@pytest.mark.parametrize("writer", [write_torch_zip, write_torch_legacy])
def test_torch_state_dicts_read_without_torch(tmp_path, writer):
    state = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "half": np.array([1.5, -2.0], np.float16),
        "transposed": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    }
    writer(state, tmp_path / "weights.pth")
    loaded = read_torch_state_dict(tmp_path / "weights.pth")
    assert loaded.keys() == state.keys()
    for name, array in state.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)


def test_torch_reader_runs_no_code_from_the_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": Payload()}, protocol=2))
    with pytest.raises(RivalError, match="not a plain state dict"):
        read_torch_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RivalError, match="not a readable PyTorch checkpoint"):
        read_torch_state_dict(tmp_path / "junk.pth")


def _pytorch_names(layout: dict, key: jax.Array) -> dict[str, np.ndarray]:
    """Random FID Inception weights under pytorch-fid's names and layouts (plus its unused fc and counters)."""
    state, renamed = {}, {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    for path, value in flatten_dict(random_params(layout, key)).items():
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1)
        state[".".join([*path[:-1], renamed.get(path[-1], path[-1])])] = value.astype(np.float32)
        if path[-1] == "var":
            state[".".join([*path[:-1], "num_batches_tracked"])] = np.array(0, np.int64)
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)
    return state


def test_fid_inception_loads_pytorch_names_and_gives_2048_features(tmp_path):
    layout = inception_layout()
    state = _pytorch_names(layout, jax.random.PRNGKey(3))
    for name, shape in (
        ("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)),
        ("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7)),
        ("Mixed_7c.branch3x3dbl_3b.conv.weight", (384, 384, 3, 1)),
        ("Mixed_7c.branch_pool.bn.running_var", (192,)),
    ):
        assert state[name].shape == shape  # pytorch-fid's FIDInceptionV3 names and shapes
    write_torch_zip(state, tmp_path / "pt_inception.pth")
    params = load_inception(tmp_path / "pt_inception.pth")
    np.testing.assert_array_equal(
        params["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"],
        state["Mixed_5b.branch5x5_2.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        params["Mixed_7b"]["branch1x1"]["bn"]["var"], state["Mixed_7b.branch1x1.bn.running_var"]
    )
    features = jax.eval_shape(lambda p, x: FIDInceptionV3().apply({"params": p}, x), params, jnp.zeros((2, 64, 48, 3)))
    assert features.shape == (2, 2048)
    del state["Mixed_6e.branch_pool.conv.weight"]
    np.savez(tmp_path / "incomplete.npz", **state)
    with pytest.raises(RivalError, match="lacks 1 of"):
        load_inception(tmp_path / "incomplete.npz")


def test_inception_scores_images_of_different_sizes_as_the_model_resizes_each_one():
    layout = inception_layout()
    params = random_params(layout, jax.random.PRNGKey(4))
    statistics = {"mean": np.zeros, "var": np.ones}  # random variances would be negative
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: statistics[path[-1].key](leaf.shape, np.float32) if path[-1].key in statistics else leaf,
        params,
    )
    rng = np.random.default_rng(5)
    wide, tall = (Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((48, 64, 3), (70, 40, 3)))
    features = inception_features(params, [wide, tall, wide])
    assert features.shape == (3, FEATURES) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])
    pixels = np.asarray(tall, np.float32)[None] / 255.0
    alone = jax.jit(lambda p, x: FIDInceptionV3().apply({"params": p}, x))(params, pixels)
    np.testing.assert_allclose(features[1], alone[0], rtol=1e-4, atol=1e-5 * np.abs(alone).max())


def test_batched_runs_pad_the_last_batch_and_drop_the_padding():
    calls = []

    def program(params, batch):
        calls.append(batch.shape)
        return batch * params

    inputs = np.arange(BATCH + 3, dtype=np.float32)[:, None]
    outputs = run_batched(program, 2.0, inputs)
    assert calls == [(BATCH, 1), (BATCH, 1)]
    np.testing.assert_array_equal(outputs, 2.0 * inputs)
    assert outputs.dtype == np.float32
