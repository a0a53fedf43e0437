"""Every family (SD 1.x, SD 2.x, SDXL): both weight forms, variants, hub downloads, refusals, full-size layouts."""

from __future__ import annotations

import functools
import json
import shutil
from types import SimpleNamespace

import huggingface_hub
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rival_jax import RivalError
from rival_jax.models import random_models
from rival_jax.models.architectures import FULL
from rival_jax.models.checkpoints import WEIGHTS, params_layout, variant_file
from rival_jax.models.families import FAMILIES, TEXT_COMPONENTS, detect_family
from rival_jax.models.loading import load_models
from rival_jax.models.random_models import build_modules, random_full_models, write_tiny_checkpoint

# family -> (prediction_type, force_zeros_for_empty_prompt, number of text encoders)
EXPECTED = {"sd1": ("epsilon", False, 1), "sd2": ("v_prediction", False, 1), "sdxl": ("epsilon", True, 2)}
WEIGHT_NAMES = {name for names in WEIGHTS.values() for name in names}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    @functools.cache
    def write(family, weight_format):
        return write_tiny_checkpoint(tmp_path_factory.mktemp(family), weight_format=weight_format, family=family)

    return write


@pytest.fixture(scope="session")
def tiny_models(tiny_folder):
    return functools.cache(
        lambda family, weight_format: load_models(tiny_folder(family, weight_format), cache_dir=None)
    )


def _same_leaves(a, b) -> bool:
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    return [path for path, _ in flat_a] == [path for path, _ in flat_b] and all(
        np.array_equal(x, y) for (_, x), (_, y) in zip(flat_a, flat_b, strict=True)
    )


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _as_variant(folder, variant, dtype=None, keep_plain=False):
    """Give every weight file a `variant` copy (safetensors cast to `dtype` if given), dropping the plain file."""
    for path in list(folder.glob("*/*")):
        if path.name not in WEIGHT_NAMES:
            continue
        target = path.with_name(variant_file(path.name, variant))
        if dtype is not None and path.suffix == ".safetensors":
            tensors = {k: v.astype(dtype) for k, v in load_file(str(path)).items()}
            save_file(tensors, str(target), metadata={"format": "pt"})
        else:
            shutil.copyfile(path, target)
        if not keep_plain:
            path.unlink()


@pytest.mark.parametrize("family", FAMILIES)
def test_both_weight_forms_load_to_the_same_params(tiny_models, family):
    flax, safetensors = tiny_models(family, "flax"), tiny_models(family, "safetensors")
    prediction_type, force_zeros, encoders = EXPECTED[family]
    for models in (flax, safetensors):
        assert models.family == family
        assert models.schedule.prediction_type == prediction_type
        assert models.force_zeros_for_empty_prompt is force_zeros
        assert len(models.text_encoders) == len(models.tokenizers) == encoders
        assert models.random_weights
    assert set(flax.sources.values()) == {"flax msgpack"}
    assert set(safetensors.sources.values()) == {"safetensors"}
    assert _same_leaves(flax.params, safetensors.params)


def test_family_features_of_the_tiny_checkpoints(tiny_folder, tiny_models):
    sd2 = tiny_models("sd2", "safetensors")
    assert sd2.unet.sample_size == 20 and sd2.unet.use_linear_projection
    assert sd2.params["unet"]["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].ndim == 2
    folder, sdxl = tiny_folder("sdxl", "safetensors"), tiny_models("sdxl", "safetensors")
    assert set(sdxl.params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert type(sdxl.text_encoders[1]).__name__ == "FlaxCLIPTextModelWithProjection"
    assert sdxl.params["text_encoder_2"]["text_projection"]["kernel"].shape == (32, 32)
    assert load_file(str(folder / "text_encoder_2" / "model.safetensors"))["text_projection.weight"].shape == (32, 32)
    assert [t.pad_token for t in sdxl.tokenizers] == ["<|endoftext|>", "!"]
    assert sdxl.unet.addition_embed_type == "text_time" and sdxl.vae.scaling_factor == 0.13025
    assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_names_are_what_the_libraries_own_converters_expect(tiny_folder, tiny_models, family):
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax as from_diffusers
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax as from_transformers

    flax, folder = tiny_models(family, "flax"), tiny_folder(family, "safetensors")
    for name, params in flax.params.items():
        module = {"unet": flax.unet, "vae": flax.vae}.get(name) or flax.text_encoders[name == "text_encoder_2"]
        state = load_file(str(folder / name / WEIGHTS[name][1]))
        if name.startswith("text_encoder"):
            stand_in = SimpleNamespace(params=params_layout(module), base_model_prefix=module.base_model_prefix)
            converted = from_transformers(state, stand_in)
        else:
            stand_in = SimpleNamespace(init_weights=lambda rng, module=module: params_layout(module))
            converted = from_diffusers({k: SimpleNamespace(numpy=lambda v=v: v) for k, v in state.items()}, stand_in)
        assert _same_leaves(converted, params), name


@pytest.mark.parametrize(
    ("family", "weight_format", "dtype", "source"),
    [
        ("sdxl", "safetensors", np.float16, "safetensors (fp16 variant)"),
        ("sd2", "flax", None, "flax msgpack (fp16 variant)"),
    ],
)
def test_a_variant_only_folder_loads_its_variant(
    tiny_folder, tiny_models, tmp_path, family, weight_format, dtype, source
):
    plain = tiny_models(family, weight_format)
    folder = shutil.copytree(tiny_folder(family, weight_format), tmp_path / "copy")
    _as_variant(folder, "fp16", dtype)
    for variant in (None, "fp16"):
        fp16 = load_models(folder, cache_dir=None, variant=variant)
        assert set(fp16.sources.values()) == {source}
        for a, b in zip(jax.tree_util.tree_leaves(plain.params), jax.tree_util.tree_leaves(fp16.params), strict=True):
            assert b.dtype == np.float32
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_a_requested_variant_is_cached_under_its_own_digest(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder("sd1", "safetensors"), tmp_path / "copy")
    _as_variant(folder, "fp16", np.float16, keep_plain=True)
    cache = tmp_path / "cache"
    plain = load_models(folder, cache_dir=cache)
    assert set(plain.sources.values()) == {"safetensors (converted, cached)"}
    fp16 = load_models(folder, cache_dir=cache, variant="fp16")
    assert set(fp16.sources.values()) == {"safetensors (fp16 variant, converted, cached)"}
    again = load_models(folder, cache_dir=cache, variant="fp16")
    assert set(again.sources.values()) == {"orbax cache (fp16 variant)"}
    assert _same_leaves(fp16.params, again.params)
    assert not _same_leaves(plain.params, fp16.params)


def test_missing_or_ambiguous_variants_get_one_line_errors(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder("sd1", "flax"), tmp_path / "copy")
    _as_variant(folder, "fp16")
    with pytest.raises(RivalError, match=r"no 'bf16' variant weights \(found: diffusion_flax_model\.fp16\.msgpack\)"):
        load_models(folder, cache_dir=None, variant="bf16")
    for path in folder.glob("*/*.fp16.*"):
        shutil.copyfile(path, path.with_name(path.name.replace(".fp16.", ".ema.")))
    with pytest.raises(RivalError, match=r"only variant weights \(ema, fp16\).*variant=") as error:
        load_models(folder, cache_dir=None)
    assert "\n" not in str(error.value)


def _transformer_pipeline(pipeline):
    def damage(folder):
        index = json.loads((folder / "model_index.json").read_text())
        del index["unet"]
        index |= {"_class_name": pipeline, "transformer": ["diffusers", "SD3Transformer2DModel"]}
        (folder / "model_index.json").write_text(json.dumps(index))
        shutil.rmtree(folder / "unet")
        (folder / "transformer").mkdir()
        (folder / "transformer" / "config.json").write_text("{}")

    return damage


def _refiner(folder):
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder"], index["tokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder")


@pytest.mark.parametrize(
    ("family", "damage", "message"),
    [
        ("sd1", _transformer_pipeline("StableDiffusion3Pipeline"), "StableDiffusion3Pipeline checkpoint .*transformer"),
        ("sd1", _transformer_pipeline("FluxPipeline"), "FluxPipeline checkpoint .*transformer"),
        ("sd1", lambda f: _edit_json(f / "unet" / "config.json", in_channels=9), "9-channel UNet"),
        ("sd1", lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", _class_name="LCMScheduler"), "LCM"),
        ("sd1", lambda f: _edit_json(f / "model_index.json", _class_name="LatentConsistencyModelPipeline"), "LCM"),
        ("sdxl", _refiner, "SDXL refiner .*text_encoder_2/ without text_encoder/"),
        (
            "sdxl",
            lambda f: _edit_json(f / "unet" / "config.json", projection_class_embeddings_input_dim=104),
            "refiner",
        ),
        ("sd1", lambda f: _edit_json(f / "unet" / "config.json", addition_embed_type="image"), "addition_embed_type"),
        ("sd1", lambda f: _edit_json(f / "unet" / "config.json", class_embed_type="projection"), "class_embed_type"),
        ("sd1", lambda f: _edit_json(f / "vae" / "config.json", latents_mean=[0.0] * 4), "latents_mean"),
        ("sd1", lambda f: shutil.copytree(f / "text_encoder", f / "text_encoder_2"), "text_encoder_2/ but no SDXL"),
    ],
)
def test_unsupported_checkpoints_are_refused_before_reading_weights(tiny_folder, tmp_path, family, damage, message):
    folder = shutil.copytree(tiny_folder(family, "safetensors"), tmp_path / "copy")
    for path in folder.glob("*/*.safetensors"):
        path.write_bytes(b"")
    damage(folder)
    with pytest.raises(RivalError, match=message) as error:
        load_models(folder, cache_dir=None)
    assert "\n" not in str(error.value)
    assert "supports SD 1.x, SD 2.x and SDXL base in diffusers layout" in str(error.value)


@pytest.mark.parametrize(
    ("sub", "file", "changes", "family"),
    [
        ("unet", "config.json", {}, "sd1"),
        ("unet", "config.json", {"cross_attention_dim": 1024}, "sd2"),
        ("scheduler", "scheduler_config.json", {"prediction_type": "v_prediction"}, "sd2"),
    ],
)
def test_family_detection(tiny_folder, tmp_path, sub, file, changes, family):
    folder = shutil.copytree(tiny_folder("sd1", "flax"), tmp_path / "copy")
    _edit_json(folder / sub / file, **changes)
    assert detect_family(folder, json.loads((folder / "model_index.json").read_text())) == family


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """snapshot_download over local folders: copies what `allow_patterns` selects, like the hub client."""
    from huggingface_hub.utils import filter_repo_objects

    repos = {}

    def snapshot_download(repo_id, allow_patterns=None, **_):
        source, target = repos[repo_id], tmp_path / "hub" / repo_id.replace("/", "--")
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos


def _fetched_weights(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))


def test_hub_downloads_fetch_the_family_components_and_variants(fake_hub, tiny_folder, tmp_path):
    fake_hub["org/sdxl-fp16-only"] = shutil.copytree(tiny_folder("sdxl", "safetensors"), tmp_path / "fp16-only")
    _as_variant(fake_hub["org/sdxl-fp16-only"], "fp16")
    models = load_models("org/sdxl-fp16-only", cache_dir=None)
    assert models.family == "sdxl" and set(models.sources.values()) == {"safetensors (fp16 variant)"}
    assert (models.path / "tokenizer_2" / "vocab.json").is_file()
    assert "text_encoder_2/model.fp16.safetensors" in _fetched_weights(models.path)

    both = shutil.copytree(tiny_folder("sd2", "safetensors"), tmp_path / "both")
    _as_variant(both, "fp16", keep_plain=True)
    fake_hub |= {"org/sd2-plain": both, "org/sd2-fp16": both}
    assert all(".fp16." in name for name in _fetched_weights(load_models("org/sd2-fp16", variant="fp16").path))
    assert not any(".fp16." in name for name in _fetched_weights(load_models("org/sd2-plain", cache_dir=None).path))


def test_hub_downloads_refuse_unsupported_checkpoints_before_fetching_weights(fake_hub, tiny_folder, tmp_path):
    fake_hub["org/sd3"] = shutil.copytree(tiny_folder("sd1", "safetensors"), tmp_path / "copy")
    _transformer_pipeline("StableDiffusion3Pipeline")(fake_hub["org/sd3"])
    with pytest.raises(RivalError, match="StableDiffusion3Pipeline"):
        load_models("org/sd3", cache_dir=None)
    assert _fetched_weights(tmp_path / "hub") == []


def test_random_full_models_of_every_family_from_cached_tiny_tokenizers(monkeypatch, cache_dir):
    monkeypatch.setattr(random_models, "FULL", random_models.TINY)
    for family, (prediction_type, force_zeros, encoders) in EXPECTED.items():
        models = random_full_models(family)
        assert (models.family, models.schedule.prediction_type) == (family, prediction_type)
        assert models.force_zeros_for_empty_prompt is force_zeros
        assert len(models.text_encoders) == len(models.tokenizers) == encoders
        assert set(models.params) == set(models.sources) and models.random_weights
        tiny = f"v{random_models.TINY_VERSION}-seed0-flax" + ("" if family == "sd1" else f"-{family}")
        assert (cache_dir / "tiny" / tiny / "model_index.json").is_file()
    with pytest.raises(RivalError, match="family"):
        random_full_models("sd3")


# Parameter counts of the published checkpoints (UNet, VAE, text encoders).
FULL_SIZES = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_architectures_have_the_published_sizes(tiny_folder, family):
    from transformers import CLIPTokenizer

    folder = tiny_folder(family, "flax")
    tokenizers = [CLIPTokenizer.from_pretrained(str(folder / name)) for _, name in TEXT_COMPONENTS[family]]
    modules = build_modules(FULL[family], tokenizers)
    sizes = {
        name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params_layout(module)))
        for name, module in modules.items()
    }
    assert sizes == FULL_SIZES[family]


def test_large_layouts_are_drawn_in_chunks(monkeypatch):
    shapes = {
        "dense": {"kernel": jax.ShapeDtypeStruct((64, 80), np.float32)},
        "bias": jax.ShapeDtypeStruct((900,), np.float32),
    }
    whole = random_models.random_params(shapes, jax.random.PRNGKey(0))
    monkeypatch.setattr(random_models, "MAX_DRAW", 1000)
    chunked = random_models.random_params(shapes, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_map(np.shape, chunked) == jax.tree_util.tree_map(np.shape, whole)
    assert not _same_leaves(chunked, whole)
    np.testing.assert_allclose(chunked["dense"]["kernel"].std(), whole["dense"]["kernel"].std(), rtol=0.05)
