"""The authors' experiment files (tests/data/authors-configs, from their release) are accepted as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax.cli import main
from rival_jax.data.sources import list_rows
from rival_jax.errors import RivalError
from rival_jax.jobs.augment import run_augment
from rival_jax.jobs.settings import ROW_FIELDS, merge_settings, read_settings_file

AUTHORS = Path(__file__).parent / "data" / "authors-configs"
INFERENCE = sorted((AUTHORS / "configs").glob("*.json"))
IMAGE_CONFIGS = sorted((AUTHORS / "assets" / "images").glob("configs_*.json"))


@pytest.fixture(scope="module")
def authors_tree(tmp_path_factory) -> Path:
    """A copy of the authors' repository layout with small made-up images at every path their configs name."""
    root = tmp_path_factory.mktemp("RIVAL")
    shutil.copytree(AUTHORS / "assets", root / "assets")
    shutil.copytree(AUTHORS / "configs", root / "configs")
    rng = np.random.default_rng(3)
    for config in IMAGE_CONFIGS:
        values = json.loads(config.read_text())
        image_root = root / values["image_root"]
        for row in values["image_exps"]:
            for key in ("image_path", "control_image_path"):
                if key in row and not (image_root / row[key]).exists():
                    (image_root / row[key]).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image_root / row[key])
            if "mask_path" in row:
                mask = np.full((64, 64), 255, np.uint8)
                mask[16:48, 8:40] = 0  # their masks are black where to regenerate
                (image_root / row["mask_path"]).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(image_root / row["mask_path"])
    return root


@pytest.mark.parametrize("path", INFERENCE, ids=lambda p: p.name)
def test_every_inference_config_maps_to_settings(path):
    values = json.loads(path.read_text())
    mapped = read_settings_file(path, ROW_FIELDS)
    inference = values["inference"]
    assert mapped["authors_t_align"] == values["self_attn"]["t_align"] and mapped["t_early"] == inference["t_early"]
    assert mapped["t_align"] == values["self_attn"]["t_align"] + 1  # their layer's step counter is t - 1
    assert mapped["guidance_scale"] == inference["cfg"] and mapped["steps"] == inference["ddim_step"]
    assert mapped["attention_injection"] is True
    settings = merge_settings(mapped, {"prompt": "a lynx"})
    expected_inversion = "" if inference["is_null_prompt"] else "a lynx"
    assert settings["inversion_prompt"] == expected_inversion
    assert settings["config"].t_align == values["self_attn"]["t_align"] + 1


def test_attention_frames_minus_one_switches_injection_off_and_unequal_steps_are_refused(tmp_path):
    path = tmp_path / "off.json"
    path.write_text(json.dumps({"self_attn": {"atten_frames": -1, "t_align": 600}}))
    expected = {"attention_injection": False, "t_align": 601, "authors_t_align": 600}
    assert read_settings_file(path, ROW_FIELDS) == expected
    path.write_text(json.dumps({"inference": {"invert_step": 50, "ddim_step": 20}}))
    with pytest.raises(RivalError, match="invert_step 50 and ddim_step 20 differ"):
        read_settings_file(path, ROW_FIELDS)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda v: v["inference"].update(scheduler="ddim"), "section inference: unknown key(s) scheduler"),
        (lambda v: v.update(lora={}), "unknown key(s) lora"),
        (lambda v: v["inference"].update(is_null_prompt="yes"), "is_null_prompt='yes' is not a boolean"),
    ],
)
def test_unknown_or_bad_inference_keys_exit_2_with_one_line(capsys, tmp_path, edit, message):
    values = json.loads((AUTHORS / "configs" / "rival_variation.json").read_text())
    edit(values)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    code = main(["generate", "--config", str(path), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", IMAGE_CONFIGS, ids=lambda p: p.name)
def test_every_image_config_is_a_manifest(authors_tree, config):
    path = authors_tree / "assets" / "images" / config.name
    values = json.loads(path.read_text())
    task = "edit" if "editing" in config.name else "variation"
    listing = list_rows(path, {"task": task, "negative_prompt": "blurry"}, model="tiny")
    assert listing.problems == [] and len(listing.rows) == len(values["image_exps"])
    image_root = authors_tree / values["image_root"]
    rows = {row.id: row for row in listing.rows}  # each row's id is its exp_name
    for spec in values["image_exps"]:
        row = rows[spec["exp_name"]]
        assert Path(row.entry.image) == image_root / spec["image_path"] and Path(row.entry.image).is_file()
        assert row.settings["prompt"] == spec["prompt"] + values["prompt_postfix"]
        assert row.settings["negative_prompt"] == "blurry" + values["neg_prompt"]
        if "control_image_path" in spec:
            assert row.settings["control_image"] == [str(image_root / spec["control_image_path"])]
        if task == "edit":
            assert row.settings["inversion_prompt"] == spec["prompt_ori"]
        if "mask_path" in spec:
            assert row.settings["task"] == "inpaint"
            theirs = np.asarray(Image.open(image_root / spec["mask_path"]))
            ours = np.asarray(Image.open(row.settings["mask"]))
            assert ours.shape == Image.open(row.entry.image).size[::-1] and np.array_equal(ours == 255, theirs == 0)


def test_unknown_image_config_keys_are_named(tmp_path):
    values = json.loads((AUTHORS / "assets" / "images" / "configs_variation.json").read_text())
    values["image_exps"][1]["strength"] = 0.5
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(values))
    with pytest.raises(RivalError, match=r"image_exps\[1\]: unknown key\(s\) strength"):
        list_rows(path, {}, model="tiny")


def test_authors_inpainting_experiment_runs_end_to_end(authors_tree, tiny_pipe, tmp_path):
    defaults = read_settings_file(authors_tree / "configs" / "rival_inpainting.json", ROW_FIELDS)
    defaults.update(steps=2, num_variations=1)
    listing = list_rows(authors_tree / "assets" / "images" / "configs_inpainting.json", defaults, model="tiny")
    summary = run_augment(
        tiny_pipe, listing.rows, tmp_path, batch_size=2, problems=listing.problems, show_progress=False
    )
    assert (summary.generated, summary.skipped_rows, summary.failed_rows) == (2, 0, 0), summary.problems
    records = [json.loads(line) for line in next(tmp_path.glob("records-*.jsonl")).read_text().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(f"images/{p.name}" for p in (tmp_path / "images").iterdir())
    for record in records:
        settings = record["metadata"]["settings"]
        assert settings["task"] == "inpaint" and settings["inversion_prompt"] == ""
        assert (settings["guidance_scale"], settings["t_align"], settings["t_early"]) == (7.0, 601, 600)
        assert settings["authors_t_align"] == 600
        assert settings["prompt"].endswith(", best quality, extremely detailed")
