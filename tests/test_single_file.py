"""Single-file checkpoints: tiny diffusers folders written in the original (LDM/SGM) layout convert back exactly.

The diffusers -> original mapping below is the inverse of diffusers' single-file conversion (what
diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` does), written for any block
count and `layers_per_block`, so the round trip checks that `convert_single_file` reproduces every
weight of the tiny folder bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rival_jax.errors import RivalError
from rival_jax.models.random_models import write_tiny_checkpoint
from rival_jax.models.single_file import convert_single_file

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_TOP = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
TEXT_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}


def _unet_key(key: str, step: int, up_attention: set[int]) -> str:
    for diffusers_name, original_name in UNET_TOP.items():
        if key.startswith(diffusers_name + "."):
            return original_name + key[len(diffusers_name) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        block, kind, rest = f"middle_block.{2 * int(parts[2]) if parts[1] == 'resnets' else 1}", parts[1], parts[3:]
    elif parts[2] == "downsamplers":
        return f"input_blocks.{step * (int(parts[1]) + 1)}.0.op." + ".".join(parts[5:])
    elif parts[2] == "upsamplers":
        i = int(parts[1])
        return f"output_blocks.{step * i + step - 1}.{2 if i in up_attention else 1}.conv." + ".".join(parts[5:])
    else:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        side, index = ("input", step * i + j + 1) if parts[0] == "down_blocks" else ("output", step * i + j)
        block = f"{side}_blocks.{index}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        rest = [UNET_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([block, *rest])


def _vae_key(key: str, value: np.ndarray, num_blocks: int) -> tuple[str, np.ndarray]:
    coder, group, *parts = key.split(".")
    if group == "conv_norm_out":
        return f"{coder}.norm_out.{parts[0]}", value
    if group == "mid_block" and parts[0] == "attentions":
        name, leaf = ".".join(parts[2:]).rsplit(".", 1)
        if leaf == "weight" and name != "group_norm":
            value = value[:, :, None, None]
        return f"{coder}.mid.attn_1.{VAE_ATTENTION[name]}.{leaf}", value
    if group == "mid_block":
        block, index, rest = "mid", f"block_{int(parts[1]) + 1}", parts[2:]
    elif group in ("down_blocks", "up_blocks"):
        i = int(parts[0])
        block = f"down.{i}" if group == "down_blocks" else f"up.{num_blocks - 1 - i}"
        if parts[1] in ("downsamplers", "upsamplers"):
            return f"{coder}.{block}.{parts[1][:-2]}." + ".".join(parts[3:]), value
        index, rest = f"block.{parts[2]}", parts[3:]
    else:
        return key, value
    return f"{coder}.{block}.{index}." + ".".join(rest).replace("conv_shortcut", "nin_shortcut"), value


def _open_clip(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    original = {}
    for key, value in state.items():
        layer = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", key)
        if key in OPEN_CLIP_TOP:
            original[prefix + OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            original[prefix + "text_projection"] = np.ascontiguousarray(value.T)
        elif layer and re.match(r"self_attn\.[qkv]_proj\.", layer[2]):
            leaf = layer[2].rsplit(".", 1)[1]
            projections = [state[f"text_model.encoder.layers.{layer[1]}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            original[f"{prefix}transformer.resblocks.{layer[1]}.attn.in_proj_{leaf}"] = np.concatenate(projections)
        elif layer:
            rest = layer[2].replace("self_attn.", "attn.")
            for diffusers_name, original_name in OPEN_CLIP_LAYER.items():
                rest = rest.replace(diffusers_name, original_name)
            original[f"{prefix}transformer.resblocks.{layer[1]}.{rest}"] = value
    return original


def to_original_layout(folder: Path, family: str) -> dict[str, np.ndarray]:
    """A diffusers-layout safetensors folder as one original-layout (LDM/SGM) state dict."""
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    unet = load_file(str(folder / "unet" / WEIGHT_FILES["unet"]))
    up_attention = {int(key.split(".")[1]) for key in unet if key.startswith("up_blocks.") and ".attentions." in key}
    step = unet_config["layers_per_block"] + 1
    original = {"model.diffusion_model." + _unet_key(key, step, up_attention): value for key, value in unet.items()}
    for key, value in load_file(str(folder / "vae" / WEIGHT_FILES["vae"])).items():
        name, value = _vae_key(key, value, len(vae_config["block_out_channels"]))
        original["first_stage_model." + name] = value
    for encoder, prefix in TEXT_PREFIXES[family].items():
        state = load_file(str(folder / encoder / WEIGHT_FILES[encoder]))
        if prefix.endswith(".transformer."):
            original |= {prefix + key: value for key, value in state.items()}
        else:
            original |= _open_clip(state, prefix)
    return original


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, tiny diffusers folder, the same weights as one original-layout single file)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"single-{family}")
    folder = write_tiny_checkpoint(root / "diffusers", seed=3, weight_format="safetensors", family=family)
    single = root / f"tiny-{family}.safetensors"
    # Entries real single files carry that are no model weight: schedule buffers, EMA bookkeeping, CLIP position ids.
    extras = {"alphas_cumprod": np.ones(1000, np.float32), "model_ema.decay": np.array(0.9999, np.float32)}
    for prefix in TEXT_PREFIXES[family].values():
        if prefix.endswith(".transformer."):
            extras[prefix + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(to_original_layout(folder, family) | extras, str(single))
    return family, folder, single


def test_round_trip_reproduces_every_weight(tiny_pair: tuple[str, Path, Path], tmp_path: Path) -> None:
    family, folder, single = tiny_pair
    converted = convert_single_file(single, config_folder=folder, cache_dir=tmp_path)
    for component in ("unet", "vae", *TEXT_PREFIXES[family]):
        expected = load_file(str(folder / component / WEIGHT_FILES[component]))
        actual = load_file(str(converted / component / WEIGHT_FILES[component]))
        assert sorted(actual) == sorted(expected), component
        for key, value in expected.items():
            assert actual[key].dtype == value.dtype and np.array_equal(actual[key], value), f"{component}: {key}"
        assert json.loads((converted / component / "config.json").read_text()) == json.loads(
            (folder / component / "config.json").read_text()
        )
    index = json.loads((converted / "model_index.json").read_text())
    assert "_rival_jax_tiny" not in index and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (converted / "tokenizer" / "vocab.json").read_bytes() == (folder / "tokenizer" / "vocab.json").read_bytes()


def test_a_single_file_loads_with_its_base_model_to_the_same_params(
    tiny_pair: tuple[str, Path, Path], tmp_path: Path
) -> None:
    import jax

    from rival_jax.models.loading import load_models

    family, folder, single = tiny_pair
    models = load_models(single, cache_dir=tmp_path, base_model=folder)
    assert models.family == family and not models.random_weights
    reference = load_models(folder, cache_dir=False)
    leaves = zip(jax.tree_util.tree_leaves(models.params), jax.tree_util.tree_leaves(reference.params), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)
    _single_line_error(lambda: load_models(single, cache_dir=tmp_path), "--base-model")


def test_cache_is_reused(tiny_pair: tuple[str, Path, Path], tmp_path: Path) -> None:
    _, folder, single = tiny_pair
    first = convert_single_file(single, config_folder=folder, cache_dir=tmp_path)
    written = (first / "model_index.json").stat().st_mtime_ns
    assert convert_single_file(single, config_folder=folder, cache_dir=tmp_path) == first
    assert (first / "model_index.json").stat().st_mtime_ns == written
    assert [p.name for p in (tmp_path / "single-file").iterdir()] == [first.name]


def _single_line_error(call, match: str) -> None:
    with pytest.raises(RivalError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_refusals(tiny_pair: tuple[str, Path, Path], tmp_path: Path) -> None:
    family, folder, single = tiny_pair
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle")
    _single_line_error(lambda: convert_single_file(ckpt, config_folder=folder, cache_dir=tmp_path), "convert it to")
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.layer.0.weight": np.zeros((2, 2), np.float32)}, str(unrelated))
    _single_line_error(
        lambda: convert_single_file(unrelated, config_folder=folder, cache_dir=tmp_path), "not an original-layout"
    )
    _single_line_error(lambda: convert_single_file(single, cache_dir=tmp_path), "needs a base model")
    inpainting = tmp_path / "inpainting.safetensors"
    state = load_file(str(single))
    state["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((32, 9, 3, 3), np.float32)
    save_file(state, str(inpainting))
    _single_line_error(
        lambda: convert_single_file(inpainting, config_folder=folder, cache_dir=tmp_path), "model type 'inpainting'"
    )
    other = "sd1" if family != "sd1" else "sd2"
    _single_line_error(
        lambda: convert_single_file(single, config_folder=folder, family=other, cache_dir=tmp_path), "not " + other
    )
    other_folder = write_tiny_checkpoint(tmp_path / other, weight_format="safetensors", family=other)
    _single_line_error(
        lambda: convert_single_file(single, config_folder=other_folder, cache_dir=tmp_path), "of the " + family
    )
