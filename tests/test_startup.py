"""Start-up as a user meets it: compile lines and timings, cacheable programs, the Python API's notices."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import rival_jax
from rival_jax import RandomWeightsWarning, RivalPipeline, progress, runtime
from rival_jax.cli import main
from rival_jax.pipeline.compiled import Executables


def _counting_program(ticks: bool):
    """A scan of `steps` additions; ticks every step when asked (as the core's scans do)."""

    def program(x: jax.Array, steps: jax.Array) -> jax.Array:
        def body(carry, step):
            if ticks:
                progress.tick(step)
            return carry + 1.0, None

        return jax.lax.scan(body, x, steps)[0]

    return program


def _cache_entries() -> set[str]:
    return {path.name for path in Path(jax.config.jax_compilation_cache_dir).iterdir()}


def test_programs_shown_with_progress_are_stored_in_the_persistent_cache(capsys):
    assert runtime.persistent_cache_enabled()  # conftest enables it, as the CLI does
    before = _cache_entries()
    # An argument shape no other test uses, so this program is compiled here.
    x, steps = jnp.zeros((3, 7, 5)), jnp.arange(4)
    result = Executables().run("counting", _counting_program, steps=4, show=True, args=(x, steps))
    np.testing.assert_array_equal(result, np.full((3, 7, 5), 4.0))
    assert _cache_entries() - before, "the program run with progress shown was not written to the cache"
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ... ")[0] for line in lines] == ["compiling counting program", "running counting"]
    assert all(line.endswith(" s") for line in lines)


def test_compile_line_shows_once_per_shape_and_timings_split_compile_from_run(capsys):
    runs = Executables()
    args = (jnp.zeros((2, 9)), jnp.arange(3))
    for _ in range(2):
        runs.run("counting", _counting_program, steps=3, show=True, args=args)
    runs.run("counting", _counting_program, steps=3, show=False, args=args)
    err = capsys.readouterr().err
    assert err.count("compiling counting program") == 1
    assert err.count("running counting") == 2
    assert set(runs.timings["counting"]) == {"compile_s", "run_s"}
    assert runs.timings["counting"]["compile_s"] > 0 and runs.timings["counting"]["run_s"] > 0


def test_without_the_persistent_cache_progress_is_a_step_bar(capsys, monkeypatch):
    monkeypatch.setattr(runtime, "persistent_cache_enabled", lambda: False)
    assert progress.step_ticks(True) and not progress.step_ticks(False)
    Executables().run("counting", _counting_program, steps=5, show=True, args=(jnp.zeros(2), jnp.arange(5)))
    err = capsys.readouterr().err
    assert "compiling counting program" in err
    assert "5/5" in err  # the bar advanced once per step, from inside the compiled scan
    assert "running counting" not in err


def test_activity_is_silent_when_progress_is_off(capsys):
    with progress.compiling("quiet", enabled=False) as clock:
        pass
    assert clock.seconds >= 0
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def full_config_checkpoint(tiny_flax, tmp_path_factory) -> Path:
    """The tiny checkpoint with the PyTorch-side config keys a real SD 1.5 config.json carries."""
    folder = tmp_path_factory.mktemp("full-config") / "model"
    shutil.copytree(tiny_flax, folder)
    extra = {
        "unet": {"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "norm_eps": 1e-05},
        "vae": {"force_upcast": True, "latents_mean": None, "mid_block_add_attention": True},
    }
    for component, keys in extra.items():
        config_file = folder / component / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **keys}))
    return folder


def test_python_api_warns_of_random_weights_and_keeps_library_notices_out(full_config_checkpoint, capfd):
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with pytest.warns(RandomWeightsWarning, match="RANDOM weights - its images are noise"):
            pipe = RivalPipeline.from_pretrained(full_config_checkpoint, cache_dir=None)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert pipe.random_weights
    noisy = [r.getMessage() for r in records if r.levelno >= logging.WARNING and "ignored" in r.getMessage()]
    assert noisy == []
    assert "will be ignored" not in capfd.readouterr().err


def test_example_image_is_the_bundled_photograph():
    path = rival_jax.example_image()
    assert isinstance(path, Path) and path.is_file()
    with Image.open(path) as image:
        assert image.mode == "RGB" and min(image.size) >= 64


def test_generate_with_progress_logs_compile_and_run_apart(capsys, tmp_path, tiny_flax, exemplar, fresh_programs):
    photo, out = tmp_path / "exemplar.jpg", tmp_path / "out"
    Image.fromarray(exemplar).save(photo)  # test_cli's exemplar and settings: its compiled programs serve here
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # the job says it in its own line instead
        arguments = ["generate", photo, "--model", tiny_flax, "-o", out, "--steps", 3, "-n", 2, "--progress"]
        code = main([str(a) for a in arguments])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("RANDOM weights") == 1
    for label in ("inversion", "generation"):
        assert f"compiling {label} program ... " in err and f"running {label} ... " in err
    summary = next(line for line in err.splitlines() if line.startswith("compile "))
    run = summary.split("; run: ")[1]
    assert "inversion" in run and "generation" in run
    sidecar = json.loads((out / "rival.json").read_text())
    assert {"compile_s", "inversion_run_s", "generation_run_s"} <= set(sidecar["timings"])


def test_python_dash_m_runs_the_cli_with_its_exit_codes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rival_jax", "generate", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("rival-jax: error:") and "missing.png" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_second_cache_folder_receives_the_programs_compiled_after_it(tmp_path):
    first = Path(jax.config.jax_compilation_cache_dir)
    try:
        runtime.enable_compilation_cache(tmp_path / "other")
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(11)).block_until_ready()
        assert list((tmp_path / "other").iterdir()), "JAX kept writing to the first cache folder"
    finally:
        runtime.enable_compilation_cache(first)
