"""`rival-jax` end to end on the tiny model: every application, config files, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rival_jax.cli import main

FAST = ["--steps", "3", "-n", "2", "--no-progress"]


@pytest.fixture(scope="module")
def exemplar_file(tmp_path_factory, exemplar):
    path = tmp_path_factory.mktemp("inputs") / "exemplar.jpg"
    Image.fromarray(exemplar).save(path)
    return path


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("variation", ["--prompt", "a photo of a cat"]),
        ("text", ["--prompt", "a painting of a dog", "--negative-prompt", "blue"]),
        ("edit", ["--prompt", "a photo of a dog", "--editing-start", "800"]),
        ("inpaint", ["--prompt", "a photo of a cat"]),
    ],
)
def test_every_task_writes_images_grid_and_sidecar(capsys, tmp_path, tiny_flax, exemplar_file, exemplar, task, extra):
    if task == "inpaint":
        mask = np.zeros(exemplar.shape[:2], np.uint8)
        mask[30:90, 40:120] = 255
        Image.fromarray(mask).save(tmp_path / "mask.png")
        extra = [*extra, "--mask", tmp_path / "mask.png"]
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        capsys, "generate", exemplar_file, "--task", task, "--model", tiny_flax, "-o", out, "--seed", 5, *FAST, *extra
    )
    assert code == 0, stderr
    assert stdout.strip() == str(out / "grid.png")
    assert "RANDOM weights" in stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "exemplar.png",
        "grid.png",
        "rival.json",
        "variation-000.png",
        "variation-001.png",
    ]
    assert Image.open(out / "grid.png").size == (3 * 128, 96)  # the 160x120 exemplar keeps its 4:3 shape
    sidecar = json.loads((out / "rival.json").read_text())
    assert sidecar["task"] == task and sidecar["seed"] == 5 and sidecar["num_inference_steps"] == 3
    assert sidecar["random_weights"] is True
    assert [i["variation_index"] for i in sidecar["images"]] == [0, 1]
    expected_inversion = "a photo of a cat" if task == "variation" else ""
    assert sidecar["inversion_prompt"] == expected_inversion
    if task == "edit":
        assert sidecar["config"]["latent_init"] == "exemplar" and sidecar["config"]["editing_start"] == 800


def test_config_file_and_command_line_precedence(capsys, tmp_path, tiny_flax, exemplar_file):
    settings = tmp_path / "settings.yaml"
    settings.write_text("t_align: 400\nguidance_scale: 3.5\nnum_variations: 1\nnoise_alignment: false\nseed: 9\n")
    code, _, stderr = _run(
        capsys,
        "generate",
        exemplar_file,
        "--model",
        tiny_flax,
        "-o",
        tmp_path / "o",
        "--config",
        settings,
        "--steps",
        "3",
        "--no-progress",
        "--seed",
        "4",
    )
    assert code == 0, stderr
    sidecar = json.loads((tmp_path / "o" / "rival.json").read_text())
    assert sidecar["config"]["t_align"] == 400 and sidecar["config"]["guidance_scale"] == 3.5
    assert sidecar["config"]["noise_alignment"] is False
    assert sidecar["seed"] == 4 and len(sidecar["images"]) == 1


def _image(tmp_path, name, mode, size=(40, 30)):
    path = tmp_path / name
    Image.new(mode, size).save(path)
    return path


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, m, e: [t / "missing.png"], "does not exist"),
        (lambda t, m, e: [(t / "notes.png").write_text("hello") and t / "notes.png"], "not a readable image"),
        (lambda t, m, e: [_image(t, "gray.png", "L")], "grayscale"),
        (lambda t, m, e: [_image(t, "rgba.png", "RGBA")], "RGBA"),
        (lambda t, m, e: [e, "--task", "inpaint", "--mask", _image(t, "m.png", "L", (10, 10))], "draw the mask"),
        (lambda t, m, e: [e, "--task", "inpaint"], "needs a mask"),
        (lambda t, m, e: [e, "--steps", "0"], "steps=0"),
        (lambda t, m, e: [e, "--t-align", "1000"], "t_align=1000"),
        (lambda t, m, e: [e, "--model", t / "no-such-model"], "does not exist"),
        (lambda t, m, e: [e, "--model", t], "not a diffusers model folder"),
        (lambda t, m, e: [e, "--config", (t / "c.json").write_text("{") and t / "c.json"], "not valid JSON"),
        (lambda t, m, e: [e, "--config", (t / "c.json").write_text('{"tee": 1}') and t / "c.json"], "unknown setting"),
        (lambda t, m, e: [e, "--resolution", "0"], "resolution '0'"),
        (lambda t, m, e: [e, "--resolution", "100x64"], "multiples of 32"),
        (lambda t, m, e: [e, "--reference-batch-size", "0"], "reference_batch_size=0"),
        (lambda t, m, e: [e, "--config", (t / "c.json").write_text('{"dtype": "f8"}') and t / "c.json"], "dtype 'f8'"),
    ],
)
def test_bad_input_gets_a_one_line_error(capsys, tmp_path, tiny_flax, exemplar_file, make_args, message):
    args = make_args(tmp_path, tiny_flax, exemplar_file)
    if "--model" not in args:
        args += ["--model", tiny_flax]
    code, _, stderr = _run(capsys, "generate", *FAST, *args, "-o", tmp_path / "out")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rival-jax: error:") and message in lines[0], stderr
    assert not (tmp_path / "out").exists()


def test_empty_checkpoint_error(capsys, tmp_path, tiny_safetensors, exemplar_file):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_safetensors, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    code, _, stderr = _run(capsys, "generate", exemplar_file, "--model", model, "-o", tmp_path / "o", *FAST)
    assert code == 2 and "safetensors" in stderr and len(stderr.strip().splitlines()) == 1


def test_console_script_on_the_builtin_defaults(tmp_path, cache_dir):
    env = {**os.environ, "RIVAL_JAX_CACHE": str(cache_dir)}
    command = [sys.executable, "-m", "rival_jax.cli", "generate", "--steps", "2", "-n", "1", "-o", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr and "Flax classes are deprecated" not in result.stderr
    assert json.loads((tmp_path / "rival.json").read_text())["exemplar"].endswith("exemplar.png")
    assert Image.open(tmp_path / "grid.png").size == (2 * 128, 128)


@pytest.mark.parametrize(("family", "extra"), [("sd1", ["--controlnet"]), ("sdxl", [])])
def test_make_tiny_writes_a_loadable_checkpoint(capsys, tmp_path, family, extra):
    from rival_jax.models.controlnet import check_controlnet, load_controlnet
    from rival_jax.models.loading import load_models

    args = ("make-tiny", tmp_path / "tiny", "--format", "safetensors", "--family", family, *extra)
    code, stdout, _ = _run(capsys, *args)
    assert code == 0 and stdout.strip() == str(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    models = load_models(tmp_path / "tiny", cache_dir=None)
    assert models.family == family
    if extra:
        check_controlnet(load_controlnet(tmp_path / "tiny", cache_dir=None), models)


@pytest.mark.parametrize(
    ("model", "extra", "size"),
    [
        ("tiny-sdxl", [], (128, 96)),
        ("tiny-sd2", ["--reference-mode", "recompute", "--square-crop"], (160, 160)),
    ],
)
def test_builtin_families_keep_the_exemplar_aspect_ratio(capsys, tmp_path, model, extra, size):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), np.uint8)).save(photo)
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, "generate", photo, "--model", model, "-o", out, *FAST, *extra)
    assert code == 0, stderr
    sidecar = json.loads((out / "rival.json").read_text())
    assert sidecar["family"] == model.removeprefix("tiny-") and tuple(sidecar["size"]) == size
    assert Image.open(out / "variation-001.png").size == size
    assert sidecar["reference_mode"] == ("recompute" if extra[:1] == ["--reference-mode"] else "keep")


def test_controlnet_from_the_command_line(capsys, tmp_path, tiny_flax, tiny_controlnet, exemplar_file, exemplar):
    out = tmp_path / "out"
    code, _, stderr = _run(
        capsys,
        "generate",
        exemplar_file,
        "--model",
        tiny_flax,
        "--controlnet",
        tiny_controlnet,
        "--control",
        "canny",
        "--control-scale",
        "0.7",
        "--canny-sigma",
        "1.5",
        "-o",
        out,
        *FAST,
    )
    assert code == 0, stderr
    sidecar = json.loads((out / "rival.json").read_text())
    assert sidecar["run_options"]["controlnet"] == [str(tiny_controlnet)]
    assert sidecar["control_image"] == ["canny"] and sidecar["control_scale"] == [0.7]
    assert sidecar["canny_sigma"] == 1.5
    wrong = tmp_path / "edges.png"
    Image.new("RGB", (64, 64)).save(wrong)
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        (["--control-image", wrong], "make the map at the exemplar's size"),
        (["--control-image", tmp_path / "notes.png"], "not a readable image"),
        ([], "needs a map"),
    ]
    for extra, message in cases:
        args = ["generate", exemplar_file, "--model", tiny_flax, "--controlnet", tiny_controlnet, *extra]
        code, _, stderr = _run(capsys, *args, "-o", tmp_path / "bad", *FAST)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "bad").exists()
