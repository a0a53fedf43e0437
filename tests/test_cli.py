"""`rival-jax` end to end on the tiny model: every application, config files, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        (lambda t, m, e: [e, "--config", _write(t / "c.json", '{"seed": "ten"}')], "seed='ten' is not an integer"),
        (lambda t, m, e: [e, "--config", _write(t / "c.yaml", "prompt: 5\n")], "prompt=5 is not text"),
        (
            lambda t, m, e: [e, "--config", _write(t / "c.yaml", "cache_dir: [1]\n")],
            "cache_dir=[1] is not a folder path",
        ),
        (lambda t, m, e: [e, "--config", _write(t / "c.yaml", "noise_alignment: no-way\n")], "not a boolean"),
        (lambda t, m, e: [e, "--config", _write(t / "c.yaml", "1: 2\n")], "unknown setting(s) 1"),
        (lambda t, m, e: [e, "--seed", "-1"], "seed=-1 is out of range"),
        (lambda t, m, e: [_image(t, "dot.png", "RGB", (1, 1))], "is 1x1: its shorter side is under 32 px"),
        (lambda t, m, e: [_image(t, "strip.png", "RGB", (2000, 10))], "is 2000x10: its aspect ratio 200.0:1"),
        (lambda t, m, e: [_image(t, "wide.png", "RGB", (500, 100))], "beyond 4:1 (crop it, or centre-crop"),
        (lambda t, m, e: [_image(t, "small.png", "RGB", (40, 20)), "--square-crop"], "shorter side is under 32"),
        (lambda t, m, e: [e, "-o", _write(t / "taken", "a file")], "is a file, not a folder"),
        (lambda t, m, e: [e, "-o", _write(t / "file", "a file") / "sub"], "is a file; pass another -o"),
    ],
)
def test_bad_input_gets_a_one_line_error(capsys, tmp_path, tiny_flax, exemplar_file, make_args, message):
    args = make_args(tmp_path, tiny_flax, exemplar_file)
    if "--model" not in args:
        args += ["--model", tiny_flax]
    code, _, stderr = _run(capsys, "generate", *FAST, "-o", tmp_path / "out", *args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rival-jax: error:") and message in lines[0], stderr
    assert not (tmp_path / "out").exists()


def _write(path, text):
    path.write_text(text)
    return path


def test_an_output_folder_without_write_permission_is_refused_before_loading(capsys, tmp_path, monkeypatch):
    from rival_jax.jobs import locks

    denied = tmp_path / "read-only"
    denied.mkdir()
    real_access = os.access
    monkeypatch.setattr(locks.os, "access", lambda p, mode: Path(p) != denied and real_access(p, mode))
    for target, action in ((denied, "written"), (denied / "new" / "deeper", "created")):
        code, _, stderr = _run(capsys, "generate", "--model", tmp_path / "no-model", "-o", target, *FAST)
        assert code == 2 and stderr.strip() == (
            f"rival-jax: error: output {target} cannot be {action}: no write permission on {denied}; pass another -o"
        )
    assert list(denied.iterdir()) == []


def test_empty_checkpoint_error(capsys, tmp_path, tiny_safetensors, exemplar_file):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_safetensors, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    code, _, stderr = _run(capsys, "generate", exemplar_file, "--model", model, "-o", tmp_path / "o", *FAST)
    assert code == 2 and "safetensors" in stderr and len(stderr.strip().splitlines()) == 1


def test_console_script_on_the_builtin_defaults(tmp_path, cache_dir):
    env = {**os.environ, "RIVAL_JAX_CACHE": str(cache_dir)}
    command = [sys.executable, "-m", "rival_jax", "generate", "--steps", "2", "-n", "1", "-o", str(tmp_path)]
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


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_generate_replaces_an_earlier_result_only_with_overwrite(capsys, tmp_path, tiny_flax, exemplar_file):
    out = tmp_path / "out"
    args = ("generate", exemplar_file, "--model", tiny_flax, "-o", out, *FAST)
    assert _run(capsys, *args)[0] == 0
    first = _names(out)
    (out / "notes.txt").write_text("mine")
    (out / ".rival-jax-0000.lock").write_text("999999999")  # left by a killed run: taken over
    code, _, stderr = _run(capsys, *args, "-n", "1", "--seed", "3")
    assert code == 2 and stderr.strip() == (
        f"rival-jax: error: output {out} already holds a result (exemplar.png, grid.png, rival.json, ...): "
        "pass --overwrite to replace it, or another -o"
    )
    assert _names(out) == sorted([*first, "notes.txt", ".rival-jax-0000.lock"])
    code, _, stderr = _run(capsys, *args, "-n", "1", "--seed", "3", "--overwrite")
    assert code == 0, stderr
    assert _names(out) == ["exemplar.png", "grid.png", "notes.txt", "rival.json", "variation-000.png"]
    sidecar = json.loads((out / "rival.json").read_text())
    assert sidecar["seed"] == 3 and sidecar["files"] == ["variation-000.png", "exemplar.png", "grid.png", "rival.json"]


def test_ctrl_c_while_writing_leaves_no_half_result_and_the_rerun_writes_it(
    capsys, tmp_path, tiny_flax, exemplar_file, monkeypatch
):
    from rival_jax import files

    out, real_save, saved = tmp_path / "out", files.save_png, []

    def interrupted_after_one_image(image, path, metadata=None):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        return real_save(image, path, metadata)

    args = ("generate", exemplar_file, "--model", tiny_flax, "-o", out, *FAST)
    monkeypatch.setattr(files, "save_png", interrupted_after_one_image)
    code, _, stderr = _run(capsys, *args)
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"rival-jax: interrupted: no result was written to {out}; rerun the same command to resume"
    )
    assert saved and not out.exists()  # the image it wrote is removed, and the folder it made
    monkeypatch.setattr(files, "save_png", real_save)
    assert _run(capsys, *args)[0] == 0
    assert _names(out) == ["exemplar.png", "grid.png", "rival.json", "variation-000.png", "variation-001.png"]


def test_every_command_accepts_the_common_flags_and_checks_its_options_before_loading(capsys, tmp_path):
    common = ["--no-progress", "--cache-dir", str(tmp_path / "cache")]
    cases = [
        (["evaluate", str(tmp_path / "missing")], "output folder"),
        (["evaluate", str(tmp_path), "--kid-features", "inception"], "needs the weights"),
        (["augment", str(tmp_path), "--batch-size", "0"], "--batch-size 0 is out of range"),
        (["ablate", str(tmp_path), "--batch-size", "0"], "--batch-size 0 is out of range"),
        (["generate", str(tmp_path / "missing.png")], "does not exist"),
    ]
    for argv, message in cases:
        code, _, stderr = _run(capsys, *argv, *common)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, (argv, stderr)
    assert not (tmp_path / "cache").exists()


def test_a_second_run_on_a_locked_folder_refuses_in_one_line(capsys, tmp_path, tiny_flax, exemplar_file):
    from rival_jax.jobs.locks import output_lock

    out = tmp_path / "busy"
    with output_lock(out):
        for command in (("generate", exemplar_file), ("augment", exemplar_file.parent)):
            code, _, stderr = _run(capsys, *command, "--model", tiny_flax, "-o", out, *FAST)
            assert code == 2 and stderr.strip() == (
                f"rival-jax: error: output {out} is in use by another rival-jax run (pid {os.getpid()}): "
                "wait for it to finish or pass another -o"
            )
        assert _names(out) == [".rival-jax-0000.lock"]
    assert not out.exists()  # the lock made the folder and took it away again


def _layered(*argv, config=None, tmp_path=None):
    from rival_jax.cli import build_parser, layer_options
    from rival_jax.jobs.options import GenerateOptions
    from rival_jax.jobs.settings import merge_settings

    if config is not None:
        (tmp_path / "settings.yaml").write_text(config)
        argv = (*argv, "--config", str(tmp_path / "settings.yaml"))
    arguments = vars(build_parser().parse_args(["generate", *argv]))
    arguments.pop("command")
    job, options, row = layer_options(GenerateOptions, arguments)
    return job, options, merge_settings(row)


def test_precedence_is_defaults_task_defaults_config_file_command_line(tmp_path):
    _, _, settings = _layered()
    assert (settings["latent_init"], settings["editing_start"], settings["t_align"]) == ("shuffle", 1000, 600)
    _, _, settings = _layered("--task", "edit", "--prompt", "a dog")
    assert (settings["latent_init"], settings["editing_start"], settings["inversion_prompt"]) == ("exemplar", 901, "")
    config = "task: edit\nediting_start: 850\nt_align: 400\nresolution: 256\nmodel: from-file\n"
    job, options, settings = _layered(config=config, tmp_path=tmp_path)
    assert (settings["task"], settings["latent_init"], settings["editing_start"]) == ("edit", "exemplar", 850)
    assert (settings["t_align"], options.resolution, job.model) == (400, 256, "from-file")
    argv = ("--editing-start", "800", "--latent-init", "shuffle", "--resolution", "128", "--model", "cli")
    job, options, settings = _layered(*argv, config=config, tmp_path=tmp_path)
    assert (settings["editing_start"], settings["latent_init"], settings["t_align"]) == (800, "shuffle", 400)
    assert (options.resolution, job.model) == ("128", "cli")
    _, _, settings = _layered("--task", "variation", config=config, tmp_path=tmp_path)
    assert (settings["task"], settings["latent_init"], settings["editing_start"]) == ("variation", "shuffle", 850)
