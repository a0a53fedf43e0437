"""Loading real on-disk formats: Flax msgpack, PyTorch safetensors (no torch), the orbax cache, errors."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rival_jax import RivalConfig, RivalError, RivalPipeline
from rival_jax.models.loading import load_models

from .conftest import PARITY

VOCAB_ROWS = "text_model.embeddings.token_embedding.weight"


def _leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_flax_and_safetensors_forms_give_the_same_images(tiny_flax, tiny_safetensors, exemplar):
    flax_pipe = RivalPipeline.from_pretrained(tiny_flax, cache_dir=None)
    st_pipe = RivalPipeline.from_pretrained(tiny_safetensors, cache_dir=None)
    assert set(flax_pipe.models.sources.values()) == {"flax msgpack"}
    assert set(st_pipe.models.sources.values()) == {"safetensors"}
    assert _leaves_equal(flax_pipe.params, st_pipe.params)
    outputs = []
    for pipe in (flax_pipe, st_pipe):
        chain = pipe.invert(exemplar, prompt="a cat", num_inference_steps=3)
        outputs.append(pipe.generate(chain, num_variations=2, seed=3, output_type="np").images)
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize(
    ("component", "file"),
    [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ],
)
def test_tiny_safetensors_use_the_real_pytorch_names_and_shapes(tiny_safetensors, component, file):
    ours = load_file(str(tiny_safetensors / component / file))
    real = load_file(str(PARITY / "tiny-sd" / component / file))
    # Our tokenizer knows more words than the reference's: only the vocabulary size may differ.
    shapes = [{k: v.shape[1:] if k == VOCAB_ROWS else v.shape for k, v in state.items()} for state in (ours, real)]
    assert shapes[0] == shapes[1]


def test_orbax_cache_is_used_and_never_stale(tiny_safetensors, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_safetensors, folder)
    cache = tmp_path / "cache"
    first = load_models(folder, cache_dir=cache)
    assert set(first.sources.values()) == {"safetensors (converted, cached)"}
    second = load_models(folder, cache_dir=cache)
    assert set(second.sources.values()) == {"orbax cache"}
    assert _leaves_equal(first.params, second.params)

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_out.bias"] = state["conv_out.bias"] + 1.0
    save_file(state, str(weights), metadata={"format": "pt"})
    third = load_models(folder, cache_dir=cache)
    assert third.sources["unet"] == "safetensors (converted, cached)"
    assert third.sources["vae"] == "orbax cache"
    np.testing.assert_allclose(third.params["unet"]["conv_out"]["bias"], first.params["unet"]["conv_out"]["bias"] + 1)


def test_bfloat16_params(tiny_flax):
    pipe = RivalPipeline.from_pretrained(tiny_flax, dtype="bfloat16", cache_dir=None)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(pipe.params)} == {np.dtype("bfloat16")}


def _broken_copy(tiny, tmp_path, damage):
    folder = tmp_path / "broken"
    shutil.copytree(tiny, folder)
    damage(folder)
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b""), "not a readable safetensors"),
        (lambda f: save_file({}, str(f / "vae" / "diffusion_pytorch_model.safetensors")), "holds no weights"),
        (lambda f: (f / "text_encoder" / "model.safetensors").unlink(), "no weights in"),
        (lambda f: (f / "model_index.json").unlink(), "not a diffusers model folder"),
        (
            lambda f: save_file(
                {"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)},
                str(f / "unet" / "diffusion_pytorch_model.safetensors"),
            ),
            "lacks",
        ),
        (lambda f: (f / "unet" / "config.json").write_text("{"), "not valid JSON"),
    ],
)
def test_broken_checkpoints_get_one_line_errors(tiny_safetensors, tmp_path, damage, message):
    folder = _broken_copy(tiny_safetensors, tmp_path, damage)
    with pytest.raises(RivalError, match=message) as error:
        load_models(folder, cache_dir=None)
    assert "\n" not in str(error.value)


def test_unknown_model_and_offline_hub_id(tmp_path):
    with pytest.raises(RivalError, match="does not exist"):
        load_models(tmp_path / "nowhere")
    with pytest.raises(RivalError, match="offline"):
        load_models("some-org/some-model-that-is-not-here")


def test_unsupported_scheduler_prediction_type(tiny_flax, tmp_path):
    def sample_prediction(folder):
        config_file = folder / "scheduler" / "scheduler_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "sample"}))

    with pytest.raises(RivalError, match="prediction_type") as error:
        load_models(_broken_copy(tiny_flax, tmp_path, sample_prediction), cache_dir=None)
    assert "\n" not in str(error.value)


def test_config_validation():
    with pytest.raises(RivalError, match="t_align"):
        RivalConfig(t_align=1000)
    with pytest.raises(RivalError, match="latent_init"):
        RivalConfig(latent_init="noise")
    with pytest.raises(RivalError, match="unknown setting"):
        RivalConfig.from_dict({"t_algn": 3})
    assert RivalConfig.from_dict({"t_align": 300}).t_align == 300
    for values, message in (({"t_align": "ten"}, "not an integer"), ({"guidance_scale": "loud"}, "not a number")):
        with pytest.raises(RivalError, match=message):
            RivalConfig.from_dict(values)


def test_settings_name_the_wrong_type():
    from rival_jax.jobs.settings import merge_settings

    for values, message in (({"steps": "ten"}, "steps='ten' is not an integer"), ({"seed": 1.5}, "not an integer")):
        with pytest.raises(RivalError, match=message):
            merge_settings(values)


def test_written_files_get_the_umask_mode(tmp_path):
    import os

    from PIL import Image

    from rival_jax.files import save_json, save_png

    previous = os.umask(0o022)
    try:
        png, record = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png"), save_json({"a": 1}, tmp_path / "a.json")
        os.umask(0o077)
        private = save_json({"b": 2}, tmp_path / "b.json")
    finally:
        os.umask(previous)
    assert [p.stat().st_mode & 0o777 for p in (png, record, private)] == [0o644, 0o644, 0o600]


def _initial_shapes(folder, name: str) -> dict:
    """{param path: shape} of the module that `name`/config.json describes, from its own init (never run)."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from flax.traverse_util import flatten_dict
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    config = json.loads((folder / name / "config.json").read_text())
    key = jax.random.PRNGKey(0)
    if name == "text_encoder":
        module = FlaxCLIPTextModel(CLIPTextConfig.from_dict(config), _do_init=False)
        tree = jax.eval_shape(lambda: module.init_weights(key, (1, config["max_position_embeddings"])))
    else:
        module = (FlaxUNet2DConditionModel if name == "unet" else FlaxAutoencoderKL).from_config(config)
        tree = jax.eval_shape(module.init_weights, key)
    return {path: leaf.shape for path, leaf in flatten_dict(dict(tree)).items()}


@pytest.mark.parametrize("weight_format", ["flax", "safetensors"])
def test_loaded_params_have_the_tree_and_shapes_of_the_modules_init(tiny_pipe, tiny_safetensors, weight_format):
    from flax.traverse_util import flatten_dict

    models = tiny_pipe.models if weight_format == "flax" else load_models(tiny_safetensors, cache_dir=None)
    assert set(models.params) == {"unet", "vae", "text_encoder"}
    for name, params in models.params.items():
        loaded = flatten_dict(params)
        assert {path: leaf.shape for path, leaf in loaded.items()} == _initial_shapes(models.path, name), name
        assert {leaf.dtype for leaf in loaded.values()} == {np.dtype("float32")}


def _vae_copy(tiny_safetensors, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_safetensors / "vae", folder / "vae")
    return folder


def _vae_source(folder, cache) -> str:
    from rival_jax.models.checkpoints import load_component

    return load_component(folder, "vae", np.float32, cache)[2]


def test_orbax_cache_entry_follows_the_config_file(tiny_safetensors, tmp_path):
    folder, cache = _vae_copy(tiny_safetensors, tmp_path), tmp_path / "cache"
    assert [_vae_source(folder, cache) for _ in range(2)] == ["safetensors (converted, cached)", "orbax cache"]
    config_file = folder / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "scaling_factor": 0.13025}))
    assert [_vae_source(folder, cache) for _ in range(2)] == ["safetensors (converted, cached)", "orbax cache"]
    assert len(list((cache / "params").iterdir())) == 2


def test_a_converter_version_bump_invalidates_the_orbax_cache(tiny_safetensors, tmp_path, monkeypatch):
    from rival_jax.models import checkpoints

    folder, cache = _vae_copy(tiny_safetensors, tmp_path), tmp_path / "cache"
    assert _vae_source(folder, cache) == "safetensors (converted, cached)"
    monkeypatch.setattr(checkpoints, "CONVERTER_VERSION", str(int(checkpoints.CONVERTER_VERSION) + 1))
    assert [_vae_source(folder, cache) for _ in range(2)] == ["safetensors (converted, cached)", "orbax cache"]
    monkeypatch.undo()
    assert _vae_source(folder, cache) == "orbax cache"


def test_orbax_cache_restores_bfloat16_and_then_exact_float32(tiny_pipe, tiny_safetensors, tmp_path):
    import jax.numpy as jnp

    folder, cache = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(tiny_safetensors, folder)
    loads = [load_models(folder, dtype, cache) for dtype in (jnp.bfloat16, jnp.bfloat16, jnp.float32)]
    assert [set(models.sources.values()) for models in loads] == [
        {"safetensors (converted, cached)"},
        {"orbax cache"},
        {"orbax cache"},
    ]
    dtypes = [{leaf.dtype for leaf in jax.tree_util.tree_leaves(models.params)} for models in loads]
    assert dtypes == [{np.dtype("bfloat16")}, {np.dtype("bfloat16")}, {np.dtype("float32")}]
    assert _leaves_equal(loads[0].params, loads[1].params)
    assert _leaves_equal(loads[2].params, tiny_pipe.params)  # the same seed's weights, read from Flax msgpack
