"""`rival-jax ablate`: Table 3's rows and the threshold sweep, one folder each, scored, resumable."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from rival_jax.cli import main
from rival_jax.errors import RivalError
from rival_jax.jobs.ablate import ablation_settings

TABLE3 = ["full", "no_attention_injection", "no_early_replacement", "no_latent_alignment", "no_noise_alignment"]


def test_settings_are_table3_then_the_sweep_without_the_configured_value():
    settings = ablation_settings({"t_early": 500}, {"t_align": (400, 600, 800, 400), "t_early": (500, 700)})
    assert [s.name for s in settings] == [*TABLE3, "t_align_400", "t_align_800", "t_early_700"]
    assert settings[1].overrides == {"attention_injection": False} and settings[-1].overrides == {"t_early": 700}
    with pytest.raises(RivalError, match="t_align=1200 is out of range"):
        ablation_settings({}, {"t_align": (1200,)})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--t-align-values", "400", "1500"], "t_align=1500 is out of range"),
        (["--inception", "missing.pth"], "--inception missing.pth does not exist"),
        (["--batch-size", "0"], "--batch-size 0 is out of range"),
    ],
)
def test_bad_ablation_input_exits_2_before_any_output(capsys, tmp_path, extra, message):
    code = main(["ablate", str(tmp_path), "-o", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_ablation_writes_one_table_and_plots_and_resumes(capsys, tmp_path, tiny_flax):
    pytest.importorskip("rival_jax.metrics")  # evaluate_folder comes with the metrics (issue 11, item 1)
    source = tmp_path / "exemplars"
    source.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source / "a.png")
    output = tmp_path / "ablation"
    args = ["ablate", str(source), "-o", str(output), "--model", str(tiny_flax), "--clip", "tiny"]
    # 3 steps are t = 667, 334, 1: replacement and AdaIN at 667 by default; t_align 200 adds 334, t_early 800 drops 667
    args += ["--steps", "3", "-n", "2", "--t-align-values", "200", "--t-early-values", "800", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    names = [*TABLE3, "t_align_200", "t_early_800"]
    table = json.loads((output / "ablation.json").read_text())["settings"]
    assert [row["setting"] for row in table] == names
    assert all(row["images"] == 2 for row in table)
    assert all(len(list((output / name / "images").glob("*.png"))) == 2 for name in names)
    assert table[1]["attention_injection"] is False and table[5]["t_align"] == 200 and table[6]["t_early"] == 800
    assert all(isinstance(row["clip_image"], float) for row in table)
    pixels = {
        name: [np.asarray(Image.open(p)) for p in sorted((output / name / "images").glob("*.png"))] for name in names
    }
    assert all(not np.array_equal(pixels[name][0], pixels["full"][0]) for name in names[1:])  # every setting acts
    with open(output / "ablation.csv", newline="") as handle:
        assert [row["setting"] for row in csv.DictReader(handle)] == names
    assert sum(line.startswith("| ") for line in out.splitlines()) == len(names) + 1 and "| setting |" in out
    assert Image.open(output / "ablation-thresholds.png").size[0] > 0
    before = {name: (output / name / "metrics.json").stat().st_mtime_ns for name in names}
    assert main(args) == 0
    assert "0 generated" in capsys.readouterr().err
    assert {name: (output / name / "metrics.json").stat().st_mtime_ns for name in names} == before
    assert json.loads((output / "ablation.json").read_text())["settings"] == table
