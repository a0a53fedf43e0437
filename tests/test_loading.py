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

    from rival_jax.images import save_json, save_png

    previous = os.umask(0o022)
    try:
        png, record = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png"), save_json({"a": 1}, tmp_path / "a.json")
        os.umask(0o077)
        private = save_json({"b": 2}, tmp_path / "b.json")
    finally:
        os.umask(previous)
    assert [p.stat().st_mode & 0o777 for p in (png, record, private)] == [0o644, 0o644, 0o600]
