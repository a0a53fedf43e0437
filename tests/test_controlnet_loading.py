"""ControlNet checkpoints: both weight forms, the shared reference one, the orbax cache, variants, hub ids, refusals."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from rival_jax import RivalError
from rival_jax.models.checkpoints import (
    DIFFUSERS_WEIGHTS,
    build_diffusers_module,
    convert_pytorch_state_dict,
    read_json,
)
from rival_jax.models.controlnet import check_controlnet, load_controlnet
from rival_jax.models.loading import load_models
from rival_jax.models.random_controlnet import write_tiny_controlnet

from .conftest import PARITY
from .test_families_loading import fake_hub  # noqa: F401 (a fixture)

FLAX, SAFETENSORS = DIFFUSERS_WEIGHTS
PARITY_CONTROLNET = PARITY / "controlnet-tiny"


@pytest.fixture(scope="module")
def controlnets(tiny_flax: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SD 1.x ControlNet in both weight forms."""
    root = tmp_path_factory.mktemp("controlnets")
    return {form: write_tiny_controlnet(root / form, tiny_flax, weight_format=form) for form in ("flax", "safetensors")}


@pytest.fixture(scope="module")
def sd1_models(tiny_flax: Path):
    return load_models(tiny_flax, cache_dir=None)


def _flat(params: dict) -> dict[str, np.ndarray]:
    return {"/".join(key): np.asarray(value) for key, value in flatten_dict(params).items()}


def _equal(a: dict, b: dict) -> bool:
    a, b = _flat(a), _flat(b)
    return a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


def _one_line_error(message: str, call, *args, **kwargs) -> str:
    with pytest.raises(RivalError, match=message) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def _edited_copy(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    (target / "config.json").write_text(json.dumps(read_json(target / "config.json") | changes))
    return target


def test_both_weight_forms_load_to_the_same_params(controlnets, tiny_flax):
    flax, torch = (load_controlnet(controlnets[form], cache_dir=None) for form in ("flax", "safetensors"))
    assert (flax.source, torch.source) == ("flax msgpack", "safetensors")
    assert _equal(flax.params, torch.params)
    unet = read_json(tiny_flax / "unet" / "config.json")
    for key in ("down_block_types", "block_out_channels", "attention_head_dim", "cross_attention_dim"):
        assert json.loads(json.dumps(getattr(flax.module, key))) == unet[key]
    weights = _flat(flax.params)
    for zero_conv in ("controlnet_down_blocks_0", "controlnet_mid_block", "controlnet_cond_embedding/conv_out"):
        assert np.abs(weights[f"{zero_conv}/kernel"]).min() > 0


def test_tiny_names_round_trip_through_diffusers_and_match_the_shared_ones(controlnets):
    from diffusers import FlaxControlNetModel
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    @dataclasses.dataclass
    class Tensor:  # diffusers' converter takes PyTorch tensors: it only calls `.numpy()`
        value: np.ndarray

        def numpy(self) -> np.ndarray:
            return self.value

    state = load_file(str(controlnets["safetensors"] / SAFETENSORS))
    config = read_json(controlnets["flax"] / "config.json")
    _, shapes, _ = build_diffusers_module(FlaxControlNetModel, config, jnp.float32)
    # The converter reads only the shapes of the module's initial params: skip computing them (slow on a CPU).
    module = SimpleNamespace(init_weights=lambda _: shapes)
    converted = convert_pytorch_state_dict_to_flax({key: Tensor(value) for key, value in state.items()}, module)
    assert _equal(converted, load_controlnet(controlnets["flax"], cache_dir=None).params)
    shared = load_file(str(PARITY_CONTROLNET / SAFETENSORS))
    assert {key: value.ndim for key, value in shared.items()} == {key: value.ndim for key, value in state.items()}


def test_parity_controlnet_tiny_converts_every_weight(sd1_models):
    from diffusers import FlaxControlNetModel

    controlnet = load_controlnet(PARITY_CONTROLNET, cache_dir=None)
    assert controlnet.source == "safetensors"
    config = read_json(PARITY_CONTROLNET / "config.json")
    _, shapes, rename = build_diffusers_module(FlaxControlNetModel, config, jnp.float32)
    state = load_file(str(PARITY_CONTROLNET / SAFETENSORS))
    # Each PyTorch tensor lands on a Flax weight of its own, and each Flax weight is filled, in its shape.
    assert len(flatten_dict(convert_pytorch_state_dict(state, shapes, rename))) == len(state)
    shapes = {"/".join(key): value.shape for key, value in flatten_dict(shapes).items()}
    assert {key: value.shape for key, value in _flat(controlnet.params).items()} == shapes
    assert sum(key.startswith("controlnet_down_blocks_") for key in shapes) == 2 * 6
    assert {"controlnet_cond_embedding/conv_out/kernel", "controlnet_mid_block/kernel"} <= shapes.keys()
    unet = read_json(PARITY / "tiny-sd" / "unet" / "config.json")
    assert controlnet.module.cross_attention_dim == unet["cross_attention_dim"]
    check_controlnet(controlnet, sd1_models)


def test_pytorch_config_keys_raise_no_diffusers_warnings(controlnets, tmp_path):
    pytorch_keys = {
        "conditioning_channels": 3,
        "global_pool_conditions": False,
        "norm_eps": 1e-5,
        "upcast_attention": False,
    }
    folder = _edited_copy(controlnets["safetensors"], tmp_path / "pytorch-config", **pytorch_keys)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        load_controlnet(folder, cache_dir=None)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [record for record in records if "not expected" in record.getMessage()]


def test_orbax_cache_is_used_on_the_second_load(controlnets, tmp_path):
    first = load_controlnet(controlnets["safetensors"], cache_dir=tmp_path)
    second = load_controlnet(controlnets["safetensors"], cache_dir=tmp_path)
    assert (first.source, second.source) == ("safetensors (converted, cached)", "orbax cache")
    assert _equal(first.params, second.params)
    assert [path.name.split("-")[0] for path in (tmp_path / "params").iterdir()] == ["controlnet"]


def test_variant_only_pipeline_folder_loads_upcast_and_in_bfloat16(controlnets, tmp_path):
    folder = shutil.copytree(controlnets["safetensors"], tmp_path / "pipeline" / "controlnet")
    state = load_file(str(folder / SAFETENSORS))
    fp16 = {key: value.astype(np.float16) for key, value in state.items()}
    save_file(fp16, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    (folder / SAFETENSORS).unlink()
    controlnet = load_controlnet(tmp_path / "pipeline", dtype=jnp.bfloat16, cache_dir=None)
    assert (controlnet.path, controlnet.source) == (folder, "safetensors (fp16 variant)")
    assert controlnet.module.dtype == jnp.bfloat16
    expected = _flat(load_controlnet(controlnets["flax"], cache_dir=None).params)
    for key, value in _flat(controlnet.params).items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_allclose(value.astype(np.float32), expected[key], rtol=1e-2, atol=1e-3)
    _one_line_error("no 'bf16' variant", load_controlnet, folder, cache_dir=None, variant="bf16")


def test_hub_ids_fetch_the_config_then_only_the_weights(fake_hub, controlnets, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    shutil.copytree(controlnets["safetensors"], repo / "controlnet")
    (repo / "controlnet" / "diffusion_pytorch_model.bin").write_bytes(b"PyTorch pickle, never fetched")
    shutil.copytree(controlnets["flax"], repo / "unrelated")
    fake_hub["org/controlnet"] = repo
    controlnet = load_controlnet("org/controlnet", cache_dir=None)
    assert controlnet.source == "safetensors" and controlnet.path.name == "controlnet"
    root = controlnet.path.parent
    assert sorted(path.relative_to(root).as_posix() for path in root.rglob("*.*")) == [
        "controlnet/config.json",
        f"controlnet/{SAFETENSORS}",
    ]

    text = _edited_copy(controlnets["safetensors"], tmp_path / "text", addition_embed_type="text")
    fake_hub["org/text-controlnet"] = text
    _one_line_error("addition_embed_type='text'", load_controlnet, "org/text-controlnet", cache_dir=None)
    assert not list((tmp_path / "hub" / "org--text-controlnet").glob("*.safetensors"))


def test_mismatched_base_models_are_refused_naming_both_sizes(controlnets, sd1_models, tiny_flax, tmp_path):

    for key, value, ours, theirs in (
        ("cross_attention_dim", 48, "48", "32"),
        ("block_out_channels", [32, 32, 64], "(32, 32, 64)", "(32, 64, 64)"),
    ):
        base = shutil.copytree(tiny_flax, tmp_path / key, ignore=shutil.ignore_patterns("*.msgpack"))
        (base / "unet" / "config.json").write_text(json.dumps(read_json(base / "unet" / "config.json") | {key: value}))
        other = load_controlnet(write_tiny_controlnet(tmp_path / f"{key}-controlnet", base), cache_dir=None)
        message = f"has {key} {re.escape(ours)} but the UNet of .* has {re.escape(theirs)}"
        _one_line_error(message, check_controlnet, other, sd1_models)


def test_sd2_base_gets_a_matching_tiny_controlnet(tiny_sd2, tmp_path):
    folder = write_tiny_controlnet(tmp_path / "sd2", tiny_sd2, weight_format="safetensors")
    controlnet = load_controlnet(folder, cache_dir=None)
    models = load_models(tiny_sd2, cache_dir=None)
    assert controlnet.module.use_linear_projection and list(controlnet.module.attention_head_dim) == [2, 4, 4]
    check_controlnet(controlnet, models)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / SAFETENSORS).unlink(), "no weights in"),
        (lambda f: save_file({}, str(f / SAFETENSORS)), "holds no weights"),
        (lambda f: save_file({"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}, str(f / SAFETENSORS)), "lacks"),
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{"), "not valid JSON"),
    ],
)
def test_broken_folders_get_one_line_errors(controlnets, tmp_path, damage, message):
    folder = shutil.copytree(controlnets["safetensors"], tmp_path / "broken")
    damage(folder)
    _one_line_error(message, load_controlnet, folder, cache_dir=None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"_class_name": "ControlNetXSAdapter"}, "holds a ControlNetXSAdapter, not a ControlNetModel"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
        ({"global_pool_conditions": True}, "global_pool_conditions=True"),
        ({"controlnet_conditioning_channel_order": "grb"}, "controlnet_conditioning_channel_order='grb'"),
        ({"conditioning_channels": 1}, "conditioning_channels=1"),
        ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type='UNetMidBlock2D'"),
        ({"transformer_layers_per_block": [1, 2, 1]}, r"transformer_layers_per_block=\[1, 2, 1\]"),
        ({"conditioning_embedding_out_channels": [16, 32, 96]}, "conditioning_embedding_out_channels"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ],
)
def test_settings_the_flax_controlnet_would_get_wrong_are_refused(controlnets, tmp_path, changes, message):
    folder = _edited_copy(controlnets["flax"], tmp_path / "edited", **changes)
    _one_line_error(message, load_controlnet, folder, cache_dir=None)


def test_paths_that_are_no_controlnet_folder(controlnets, tmp_path):
    _one_line_error("is not a folder", load_controlnet, controlnets["safetensors"] / SAFETENSORS)
    _one_line_error("does not exist", load_controlnet, tmp_path / "nowhere")
    _one_line_error("offline", load_controlnet, "org/controlnet-not-on-this-machine")
    bgr = _edited_copy(controlnets["flax"], tmp_path / "bgr", controlnet_conditioning_channel_order="bgr")
    bgr = load_controlnet(bgr, cache_dir=None)
    assert bgr.module.controlnet_conditioning_channel_order == "bgr"
