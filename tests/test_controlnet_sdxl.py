"""SDXL + ControlNet: PyTorch diffusers' residuals and pipeline, several ControlNets, devices, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image
from safetensors.numpy import load_file, save_file

from rival_jax import RivalConfig, RivalError, RivalPipeline, images
from rival_jax.models.checkpoints import (
    DIFFUSERS_WEIGHTS,
    build_diffusers_module,
    convert_pytorch_state_dict,
    read_json,
)
from rival_jax.models.controlnet import check_controlnet, controlnet_class, load_controlnet
from rival_jax.models.loading import load_models
from rival_jax.models.random_controlnet import write_tiny_controlnet
from rival_jax.models.random_models import write_tiny_checkpoint

from .conftest import PARITY, eight_devices

# Five variations, on eight devices one each (and three pads); every other one with its map flipped.
SCRIPT = """
import sys, numpy as np
from rival_jax import RivalPipeline
from tests.test_controlnet_sdxl import _generate_five
pipe = RivalPipeline.from_pretrained(sys.argv[1], cache_dir=None, controlnet=sys.argv[4])
np.save(sys.argv[3], _generate_five(pipe, np.load(sys.argv[2]))[0])
print(pipe.mesh.size)
"""

SAFETENSORS = DIFFUSERS_WEIGHTS[1]
META = json.loads((PARITY / "sdxl_controlnet.json").read_text())
PLAIN = RivalConfig(guidance_scale=META["guidance_scale"], attention_injection=False, noise_alignment=False)


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _one_line_error(message: str, call, *args, **kwargs) -> None:
    with pytest.raises(RivalError, match=message) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(PARITY / "sdxl_controlnet.npz") as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL model and its ControlNet in PyTorch layout, as the reference script writes them."""
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny", weight_format="safetensors", family="sdxl")
    write_tiny_controlnet(folder / "controlnet", folder, seed=1, weight_format="safetensors")
    for name, digest in META["weights_sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{name} changed: rerun the script"
    return folder


@pytest.fixture(scope="module")
def pipe(base: Path) -> RivalPipeline:
    return RivalPipeline.from_pretrained(base, cache_dir=None, controlnet=base / "controlnet")


@pytest.fixture(scope="module")
def chain(pipe, exemplar):
    return pipe.invert(exemplar[:, :120].copy(), prompt="", num_inference_steps=META["steps"])


def _generate_five(pipe: RivalPipeline, exemplar: np.ndarray) -> tuple:
    """(latents, chain, maps) of five variations, every other one following the flipped edges."""
    chain = pipe.invert(exemplar, prompt="a photo of a cat", num_inference_steps=4)
    edges = images.canny(chain.image)
    maps = [edges[:, ::-1].copy() if i % 2 else edges for i in range(5)]
    out = pipe.generate(chain, num_variations=5, seed=21, output_type="latent", control_image=maps)
    return out.latents, chain, maps


def _final(pipe, chain, start, **control) -> np.ndarray:
    return pipe.generate(
        chain, prompt=META["prompt"], latents=start, config=PLAIN, output_type="latent", **control
    ).latents


def test_residuals_equal_pytorch_controlnet_model(pipe, reference):
    controlnet = pipe.controlnets[0]
    image = jnp.asarray(reference["control"].transpose(2, 0, 1)[None] / 255.0, jnp.float32)
    down, mid = controlnet.module.apply(
        {"params": controlnet.params},
        reference["sample"],
        jnp.asarray(META["residual_timestep"]),
        reference["encoder_hidden_states"],
        jnp.concatenate([image, image]),
        conditioning_scale=META["residual_scale"],
        return_dict=False,
        added_cond_kwargs={key: reference[key] for key in ("text_embeds", "time_ids")},
    )
    theirs = [reference[f"down_{i}"] for i in range(len(down))]
    assert len(theirs) == 6 and f"down_{len(down)}" not in reference
    errors = [relative_error(np.transpose(ours, (0, 3, 1, 2)), t) for ours, t in zip(down, theirs, strict=True)]
    errors.append(relative_error(np.transpose(mid, (0, 3, 1, 2)), reference["mid"]))
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("case", ["full", "half"])
def test_plain_generation_equals_pytorch_sdxl_controlnet_pipeline(pipe, chain, reference, case):
    np.testing.assert_array_equal(chain.timesteps, META["timesteps"])
    scale, start, end = META["cases"][case]
    control = np.asarray(Image.open(PARITY / "sdxl_controlnet_map.png"))
    settings = {"controlnet_conditioning_scale": scale, "control_guidance_start": start, "control_guidance_end": end}
    ours = _final(pipe, chain, reference["start"], control_image=control, **settings)
    error = relative_error(ours, reference[f"final_{case}"])
    assert error < 5e-4, error


def test_scale_zero_equals_no_controlnet_and_two_halves_equal_one(pipe, chain, base):
    start = np.asarray(np.random.default_rng(5).standard_normal((2, *chain.latents.shape[1:])), np.float32)
    plain = RivalPipeline(pipe.models, pipe.options, ())
    without = _final(plain, chain, start)
    zero = _final(pipe, chain, start, control_image="canny", controlnet_conditioning_scale=0.0)
    np.testing.assert_allclose(zero, without, rtol=0, atol=1e-6)
    full = _final(pipe, chain, start, control_image="canny")
    assert relative_error(full, without) > 1e-3
    two = RivalPipeline.from_pretrained(base, cache_dir=None, controlnet=[base / "controlnet"] * 2)
    halves = _final(two, chain, start, control_image=["canny", "canny"], controlnet_conditioning_scale=[0.5, 0.5])
    assert relative_error(halves, full) < 1e-5


def test_eight_devices_give_the_same_variations_as_one_each_with_its_map(pipe, base, exemplar, tmp_path):
    """Per-variation maps are replicated; each device takes its own variations' maps."""
    np.save(tmp_path / "exemplar.npy", exemplar)
    env = eight_devices()
    files = (str(tmp_path / "exemplar.npy"), str(tmp_path / "l.npy"))
    command = [sys.executable, "-c", SCRIPT, str(base), *files, str(base / "controlnet")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "8"
    one, chain, maps = _generate_five(pipe, np.load(files[0]))
    eight = np.load(tmp_path / "l.npy")
    assert pipe.mesh.size == 1 and eight.shape == one.shape == (5, 4, 12, 16)
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-4 * np.abs(one).max())
    alone = pipe.generate(chain, variation_indices=[3], seed=21, output_type="latent", control_image=maps[3])
    assert relative_error(alone.latents[0], one[3]) < 1e-5


def test_fp16_variant_and_orbax_cache_load_the_same_params(base, tmp_path):
    folder = shutil.copytree(base / "controlnet", tmp_path / "pipeline" / "controlnet")
    state = load_file(str(folder / SAFETENSORS))
    save_file(
        {k: v.astype(np.float16) for k, v in state.items()}, str(folder / "diffusion_pytorch_model.fp16.safetensors")
    )
    first = load_controlnet(tmp_path / "pipeline", cache_dir=tmp_path / "cache", variant="fp16")
    second = load_controlnet(tmp_path / "pipeline", cache_dir=tmp_path / "cache", variant="fp16")
    assert (first.source, second.source) == (
        "safetensors (fp16 variant, converted, cached)",
        "orbax cache (fp16 variant)",
    )
    exact = flatten_dict(load_controlnet(folder, cache_dir=None).params)
    for key, value in flatten_dict(second.params).items():
        np.testing.assert_allclose(value, exact[key], rtol=1e-3, atol=1e-4)


def test_a_smaller_variant_converts_every_weight_and_fits_the_base(base, tmp_path):
    """Like controlnet-canny-sdxl-1.0-small: no attention in the down blocks, fewer transformer layers."""
    small = shutil.copytree(base, tmp_path / "small", ignore=shutil.ignore_patterns("*.safetensors", "controlnet"))
    unet = read_json(small / "unet" / "config.json")
    changes = {"down_block_types": ["DownBlock2D", "DownBlock2D"], "transformer_layers_per_block": [0, 1]}
    (small / "unet" / "config.json").write_text(json.dumps(unet | changes))
    folder = write_tiny_controlnet(tmp_path / "small-controlnet", small, weight_format="safetensors")
    config, state = read_json(folder / "config.json"), load_file(str(folder / SAFETENSORS))
    _, shapes, rename = build_diffusers_module(controlnet_class(config), config, jnp.float32)
    assert len(flatten_dict(convert_pytorch_state_dict(state, shapes, rename))) == len(state)
    assert not any("attentions" in key for key in state if key.startswith("down_blocks"))
    check_controlnet(load_controlnet(folder, cache_dir=None), load_models(base, cache_dir=None))


def _edited(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    (target / "config.json").write_text(json.dumps(read_json(target / "config.json") | changes))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
        ({"transformer_layers_per_block": [1, 2, 3]}, r"transformer_layers_per_block=\[1, 2, 3\]"),
        ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"]}, "down_block_types="),
        ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type='UNetMidBlock2D'.*standard SDXL settings"),
    ],
)
def test_sdxl_settings_we_cannot_honour_are_refused_before_weights(base, tmp_path, changes, message):
    folder = _edited(base / "controlnet", tmp_path / "edited", **changes)
    (folder / SAFETENSORS).write_bytes(b"never read")
    _one_line_error(message, load_controlnet, folder, cache_dir=None)


def test_controlnets_of_another_family_or_conditioning_are_refused(pipe, tiny_flax, tiny_controlnet):
    sd1 = load_controlnet(tiny_controlnet, cache_dir=None)
    message = "is an SDXL base model but ControlNet .* is an SD 1.x/2.x ControlNet"
    _one_line_error(message, check_controlnet, sd1, pipe.models)
    message = "is an SD 1.x/2.x base model but ControlNet .* is an SDXL ControlNet"
    _one_line_error(message, check_controlnet, pipe.controlnets[0], load_models(tiny_flax, cache_dir=None))
    controlnet = pipe.controlnets[0]
    refiner = dataclasses.replace(controlnet, module=controlnet.module.clone(projection_class_embeddings_input_dim=72))
    message = "has projection_class_embeddings_input_dim 72 but the UNet of .* has 80"
    _one_line_error(message, check_controlnet, refiner, pipe.models)


def test_make_tiny_writes_an_sdxl_controlnet_that_fits_its_model(tmp_path):
    from rival_jax.jobs.make_tiny import run_job
    from rival_jax.jobs.options import MakeTinyOptions

    run_job(MakeTinyOptions(folder=str(tmp_path / "tiny"), format="safetensors", family="sdxl", controlnet=True))
    assert (tmp_path / "tiny" / "controlnet" / SAFETENSORS).is_file()
    assert read_json(tmp_path / "tiny" / "controlnet" / "config.json")["_class_name"] == "ControlNetModel"
    controlnet = load_controlnet(tmp_path / "tiny", cache_dir=None)
    check_controlnet(controlnet, load_models(tmp_path / "tiny", cache_dir=None))
    assert list(controlnet.module.transformer_layers_per_block) == [1, 2]
