"""Augment jobs with a ControlNet map per variation: the pipeline's pixels, resumed rows keep their maps, and
lists of the wrong length refused before anything runs."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from rival_jax import RivalPipeline
from rival_jax.cli import main
from rival_jax.data.sources import list_rows
from rival_jax.errors import RivalError
from rival_jax.jobs.augment import run_augment
from rival_jax.jobs.common import control_entries
from rival_jax.options import RunOptions

N = 3
SETTINGS = {"steps": 2, "num_variations": N}


def _noise(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)


def _manifest(folder: Path, maps: int) -> Path:
    """A JSONL manifest of one 64 px exemplar `p` with `maps` edge maps, one per variation."""
    _noise(folder / "p.png", 0)
    for i in range(maps):
        _noise(folder / f"e{i}.png", 10 + i)
    row = {"id": "p", "image": "p.png", "control_image": [f"e{i}.png" for i in range(maps)]}
    (folder / "m.jsonl").write_text(json.dumps(row) + "\n")
    return folder / "m.jsonl"


def _augment(pipe, manifest: Path, output: Path, settings=SETTINGS, **kwargs):
    listing = list_rows(manifest, settings, model="tiny")
    assert listing.problems == []
    return run_augment(pipe, listing.rows, output, batch_size=4, show_progress=False, model="tiny", **kwargs)


def _pixels(output: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((output / "images").iterdir())}


def _expected(pipe, manifest: Path, variations: int) -> tuple[list[np.ndarray], Any, int]:
    """What the pipeline makes of the manifest's row called with its list of maps, its chain and seed."""
    folder, row = manifest.parent, list_rows(manifest, SETTINGS, model="tiny").rows[0]
    maps = [Image.open(folder / f"e{i}.png") for i in range(variations)]
    chain = pipe.invert(Image.open(folder / "p.png").convert("RGB"), "", 2)
    seed = row.settings["seed"]
    out = pipe.generate(chain, num_variations=variations, seed=seed, control_image=maps, batch_size=4)
    return [np.asarray(image) for image in out.images], chain, seed


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return _manifest(tmp_path_factory.mktemp("maps"), N)


@pytest.fixture(scope="module")
def pipe(tiny_flax, tiny_controlnet) -> RivalPipeline:
    return RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, controlnet=tiny_controlnet)


@pytest.fixture(scope="module")
def whole_run(pipe, manifest, tmp_path_factory) -> dict[str, np.ndarray]:
    output = tmp_path_factory.mktemp("whole")
    assert _augment(pipe, manifest, output).generated == N
    return _pixels(output)


def test_each_variation_is_the_pipelines_image_with_its_own_map(pipe, manifest, whole_run):
    expected, chain, seed = _expected(pipe, manifest, N)
    assert sorted(whole_run) == [f"p_v{i:04d}.png" for i in range(N)]
    for i in range(N):
        np.testing.assert_array_equal(whole_run[f"p_v{i:04d}.png"], expected[i])
    maps = manifest.parent / "e1.png"
    other_map = pipe.generate(chain, variation_indices=[0], seed=seed, control_image=maps, batch_size=4)
    assert np.abs(np.asarray(other_map.images[0]).astype(int) - whole_run["p_v0000.png"]).max() > 8


def test_a_rerun_makes_the_missing_variations_each_with_its_own_map(pipe, manifest, whole_run, tmp_path):
    output = tmp_path / "out"
    first = _augment(pipe, manifest, output, process_index=0, process_count=2)  # --shard 1/2: variation 0
    assert first.generated == 1 and sorted(_pixels(output)) == ["p_v0000.png"]
    rest = _augment(pipe, manifest, output)  # variations 1 and 2, with maps 1 and 2
    assert (rest.generated, rest.already_done) == (N - 1, 1)
    got = _pixels(output)
    assert got.keys() == whole_run.keys()
    for name, pixels in whole_run.items():
        np.testing.assert_array_equal(got[name], pixels)


def test_the_ray_engine_gives_the_same_images(manifest, whole_run, tiny_flax, tiny_controlnet):
    from rival_jax.jobs.ray_engine import RivalVariations

    rows = list_rows(manifest, SETTINGS, model="tiny").rows
    options = RunOptions(controlnet=(str(tiny_controlnet),))
    actor = RivalVariations(str(tiny_flax), options=options, settings=SETTINGS, batch_size=4, compile_cache=False)
    out = actor({"row": [pickle.dumps(row) for row in rows]})
    assert out["status"] == ["generated"] * N and out["variation_index"] == list(range(N))
    for i, data in enumerate(out["image"]):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), whole_run[f"p_v{i:04d}.png"])


def test_sdxl_rows_follow_their_maps_per_variation(tiny_sdxl, tmp_path):
    from rival_jax.models.random_controlnet import write_tiny_controlnet

    controlnet = write_tiny_controlnet(tmp_path / "controlnet", tiny_sdxl, seed=1)
    pipe = RivalPipeline.from_pretrained(tiny_sdxl, cache_dir=None, controlnet=controlnet)
    manifest = _manifest(tmp_path, 2)
    assert _augment(pipe, manifest, tmp_path / "out", {**SETTINGS, "num_variations": 2}).generated == 2
    got, (expected, _, _) = _pixels(tmp_path / "out"), _expected(pipe, manifest, 2)
    for i in range(2):
        np.testing.assert_array_equal(got[f"p_v{i:04d}.png"], expected[i])


def test_a_csv_list_of_the_wrong_length_is_one_line_and_exit_2(capsys, tmp_path, tiny_flax, tiny_controlnet):
    _manifest(tmp_path, 2)
    (tmp_path / "m.csv").write_text('id,image,control_image\np,p.png,"[""e0.png"", ""e1.png""]"\n')
    row = list_rows(tmp_path / "m.csv", {"num_variations": 2}, model="tiny").rows[0]
    assert row.settings["control_image"] == [str(tmp_path / "e0.png"), str(tmp_path / "e1.png")]
    args = ["augment", tmp_path / "m.csv", "-o", tmp_path / "out", "--model", tiny_flax, "-n", "3"]
    code = main([str(a) for a in [*args, "--controlnet", tiny_controlnet, "--steps", "2", "--no-progress"]])
    stderr = capsys.readouterr().err
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "row p: control_image has 2 maps for 3 variations" in stderr and "a list of 3 maps" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("maps", "controlnets", "expected"),
    [
        ("e.png", 1, ["e.png"]),
        (["e0.png", "e1.png", "e2.png"], 1, [["e0.png", "e1.png", "e2.png"]]),
        ([["e0.png", "e1.png", "e2.png"]], 1, [["e0.png", "e1.png", "e2.png"]]),
        (["canny", ["d0.png", "d1.png", "d2.png"]], 2, ["canny", ["d0.png", "d1.png", "d2.png"]]),
        (["canny", ["d.png"]], 2, ["canny", "d.png"]),  # a list of one map is that map
        (["canny"], 2, ["canny", "canny"]),  # one entry for every ControlNet
    ],
)
def test_control_entries_are_one_map_or_a_list_per_variation_for_each_controlnet(maps, controlnets, expected):
    assert control_entries(maps, controlnets, 3) == expected


@pytest.mark.parametrize(
    ("maps", "controlnets", "message"),
    [
        (["e0.png", "e1.png"], 1, "2 maps for 3 variations"),
        (["a.png", "b.png", "c.png"], 2, "3 control images for 2 ControlNets"),
        (["canny", ["d0.png", "d1.png"]], 2, r"2 maps for 3 variations \(ControlNet 2 of 2\)"),
        ([["e0.png", ["e1.png"], "e2.png"]], 1, "nests a list in a list of maps"),
        (["canny", "e1.png", "e2.png"], 1, '"canny" among maps per variation'),
        (None, 1, "needs a map"),
        ("e.png", 0, "needs a ControlNet"),
    ],
)
def test_ambiguous_or_wrong_length_maps_are_refused_in_one_line(maps, controlnets, message):
    with pytest.raises(RivalError, match=message) as error:
        control_entries(maps, controlnets, 3)
    assert "\n" not in str(error.value)
