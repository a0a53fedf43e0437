"""The benchmark's plain SDXL + ControlNet baseline is diffusers' pipeline, and the benchmark runs with a ControlNet."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rival_jax import RivalPipeline
from rival_jax.core import parallel
from rival_jax.core.control import ControlInputs
from rival_jax.models.random_controlnet import write_tiny_controlnet
from rival_jax.pipeline import baseline, programs

from .conftest import PARITY

META = json.loads((PARITY / "sdxl_controlnet.json").read_text())
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def controlnet(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL model's ControlNet, the weights (same seeds) `scripts/make_sdxl_controlnet_reference.py` ran."""
    return write_tiny_controlnet(tmp_path_factory.mktemp("sdxl-controlnet"), tiny_sdxl, seed=1)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl: Path, controlnet: Path) -> RivalPipeline:
    return RivalPipeline.from_pretrained(tiny_sdxl, cache_dir=None, controlnet=controlnet)


@pytest.mark.parametrize("case", ["full", "half"])
def test_plain_sdxl_controlnet_baseline_equals_diffusers_controlnet_pipeline(pipe, case):
    """`baseline.plain` with the pipeline's ControlNet = PyTorch's StableDiffusionXLControlNetPipeline, same start."""
    with np.load(PARITY / "sdxl_controlnet.npz") as arrays:
        start, theirs = arrays["start"], arrays[f"final_{case}"]
    timesteps = pipe.models.schedule.timesteps(META["steps"])
    np.testing.assert_array_equal(timesteps, META["timesteps"])
    scale, begin, end = META["cases"][case]
    edges = np.asarray(Image.open(PARITY / "sdxl_controlnet_map.png"))
    control = ControlInputs(
        params=(pipe.controlnets[0].params,),
        images=(jnp.asarray(edges.transpose(2, 0, 1)[None] / 255.0, jnp.float32),),
        scales=jnp.float32([scale]),
        starts=jnp.float32([begin]),
        ends=jnp.float32([end]),
    )
    side = META["side"]
    conditioning = pipe.encode_prompt(["", META["prompt"]], (side, side))
    padded = parallel.pad_to(start, parallel.padded_length(len(start), pipe.mesh.size))
    inputs = programs.PlainInputs(
        padded, conditioning, jnp.asarray(timesteps), jnp.float32(META["guidance_scale"]), control
    )
    program = programs.Program(baseline.plain, dataclasses.replace(pipe.statics, attention=None))
    ours = np.asarray(jax.jit(program(False))(pipe.params["unet"], parallel.place(inputs, pipe.mesh)))[: len(start)]
    error = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    assert error < 5e-4, error


def test_benchmark_times_rival_and_plain_with_a_random_controlnet_and_its_share(tiny_sdxl, monkeypatch, capsys):
    """`benchmark.py --random-controlnet` on the tiny SDXL model: its row for N has the ControlNet's columns."""
    spec = importlib.util.spec_from_file_location("rival_benchmark", SCRIPTS / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    arguments = ["--model", str(tiny_sdxl), "--random-controlnet", "--steps", "2", "--counts", "2", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *arguments])
    benchmark.main()
    printed = capsys.readouterr().out
    assert "ControlNet: random-controlnet-sdxl (random), params float32, on Canny edges" in printed
    lines = printed.splitlines()
    header = next(line for line in lines if line.strip().startswith("N |") and "ratio" in line)
    columns = [name.strip() for name in header.split("|")]
    assert columns[-2:] == ["plain-CN s", "CN share"]
    row = [float(value) for value in lines[lines.index(header) + 1].split("|")]
    assert row[0] == 2 and np.isfinite(row).all()
    share, plain, without = (columns.index(name) for name in ("CN share", "plain s", "plain-CN s"))
    half = 5e-4  # the table prints 3 decimals: each printed figure is within half a unit of its value
    lowest = 1 - (row[without] + half) / (row[plain] - half)
    highest = 1 - (row[without] - half) / (row[plain] + half)
    assert lowest - half <= row[share] <= highest + half
