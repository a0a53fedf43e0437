"""`rival-jax evaluate` end to end on tiny models: generate and augment folders, the report, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax.cli import main
from rival_jax.data.sinks import Item, OutputSpec, open_sink
from rival_jax.jobs.evaluate import evaluate_folder
from rival_jax.metrics.palette import palette, palette_distance

# As tests/test_cli.py's variation run, so the suite's compiled programs (XLA's disk cache) are reused.
GENERATE = ["--task", "variation", "--prompt", "a photo of a cat", "--seed", "5", "--steps", "3", "-n", "2"]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def generated(tmp_path_factory, exemplar, tiny_flax) -> Path:
    """A `rival-jax generate` folder from the tiny model: 2 variations, 3 steps."""
    folder = tmp_path_factory.mktemp("generated")
    Image.fromarray(exemplar).save(folder / "exemplar.jpg")
    out = folder / "out"
    arguments = ["generate", str(folder / "exemplar.jpg"), "--model", str(tiny_flax), *GENERATE, "--no-progress"]
    assert main([*arguments, "-o", str(out)]) == 0
    return out


def test_evaluate_a_generate_folder_writes_metrics_and_a_self_contained_report(capsys, generated, cache_dir):
    code, stdout, stderr = _run(capsys, "evaluate", generated, "--clip", "tiny", "--cache-dir", cache_dir)
    assert code == 0, stderr
    assert stdout.strip() == str(generated / "report.html")
    assert "RANDOM weights - scores are meaningless" in stderr
    metrics = json.loads((generated / "metrics.json").read_text())
    summary = metrics["summary"]
    assert summary["images"] == 2 and summary["exemplars"] == 1
    assert summary["kid"] is None, "one exemplar: KID compares two sets of at least two images"
    assert all(isinstance(summary[k], float) for k in ("clip_image", "clip_text", "palette", "diversity"))
    assert -1 <= summary["clip_image"] <= 1 and summary["diversity"] >= 0
    assert metrics["random_weights"] == {"generator": True, "clip": True}
    rows = list(csv.DictReader((generated / "metrics.csv").open()))
    assert [r["file"] for r in rows] == ["variation-000.png", "variation-001.png"]
    assert all(r["prompt"] == "a photo of a cat" for r in rows)
    exemplar = np.asarray(Image.open(generated / "exemplar.png").convert("RGB"))
    for row, scores in zip(rows, metrics["images"], strict=True):
        variation = np.asarray(Image.open(generated / row["file"]).convert("RGB"))
        expected = palette_distance(palette(variation), palette(exemplar))
        assert float(row["palette"]) == pytest.approx(expected) == scores["palette"]
    report = (generated / "report.html").read_text()
    assert '<table id="summary">' in report and '<table id="images">' in report
    assert "scores are meaningless" in report and "variation-001.png" in report
    assert report.count("data:image/png;base64,") == 1 + 1 + 2  # plots, one grid, one thumbnail per image
    assert 'src="http' not in report and 'src="file' not in report


def test_traces_are_plotted_when_present_and_skipped_when_malformed(generated, cache_dir, capsys):
    steps = [981, 661, 341]
    traces = {
        "timesteps": steps,
        "layers": ["down.0", "up.1"],
        "exemplar_attention_share": [[0.6, 0.5], [0.5, 0.4], [0.4, 0.3]],
        "latent_stat_distance": [0.0, 0.1, 0.3],
    }
    (generated / "traces.json").write_text(json.dumps(traces))
    try:
        evaluate_folder(generated, clip="tiny", cache_dir=cache_dir)
        report = (generated / "report.html").read_text()
        assert "Inside the method (traces)" in report
        assert report.count("data:image/png;base64,") == 5
        (generated / "traces.json").write_text(json.dumps({**traces, "latent_stat_distance": [0.0]}))
        evaluate_folder(generated, clip="tiny", cache_dir=cache_dir)
        assert "traces.json skipped" in capsys.readouterr().err
        assert "Inside the method" not in (generated / "report.html").read_text()
    finally:
        (generated / "traces.json").unlink()


def test_evaluate_an_augment_folder_scores_each_image_against_its_own_exemplar(tmp_path, cache_dir):
    rng = np.random.default_rng(4)
    colours = {"red.png": (200, 40, 30), "blue.png": (20, 50, 210)}
    prompts = {"red.png": "a red house", "blue.png": ""}
    sink = open_sink(tmp_path / "out", OutputSpec(), process=0, overwrite=False, log=print)
    for name, colour in colours.items():
        pixels = np.clip(np.asarray(colour) + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
        metadata = {"source": str(tmp_path / name), "prompt": prompts[name], "random_weights": True}
        for index in range(2):
            variation = Image.fromarray(np.roll(pixels, 8 * index, axis=0))
            sink.add(Item(f"key-{name}", index, Path(name).stem, metadata, (64, 64)), variation)
    sink.add(Item("key-red.png", 2, "red", {"source": str(tmp_path / "red.png"), "dropped": True}, (64, 64)), None)
    sink.close()
    summary = evaluate_folder(tmp_path / "out", clip="tiny", cache_dir=cache_dir)
    assert summary["images"] == 4 and summary["exemplars"] == 2, "the dropped variation is not scored"
    assert isinstance(summary["kid"], float) and isinstance(summary["kid_std"], float)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for row in metrics["images"]:
        name = Path(row["exemplar"]).name
        assert row["file"].startswith(f"images/{Path(name).stem}_v") and row["prompt"] == prompts[name]
        assert (row["clip_text"] is None) == (prompts[name] == "")
    assert [group["images"] for group in metrics["exemplars"]] == [2, 2]
    assert metrics["random_weights"]["generator"] is True, "the tiny model's random weights must be reported"


def test_shard_and_url_outputs_are_refused_in_one_line(capsys, tmp_path):
    sink = open_sink(tmp_path / "out", OutputSpec(format="webdataset"), process=0, overwrite=False, log=print)
    sink.add(Item("k", 0, "a", {"prompt": ""}, (8, 8)), Image.new("RGB", (8, 8)))
    sink.close()
    for folder, message in [(tmp_path / "out", "holds shards"), ("s3://bucket/out", "is a URL")]:
        code, stdout, stderr = _run(capsys, "evaluate", folder, "--clip", "tiny")
        assert code == 2 and stdout == "" and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["missing-folder"], "does not exist"),
        (["{empty}"], "holds no rival.json or records"),
        (["{out}", "--clip", "no-such-model"], "CLIP model no-such-model does not exist"),
        (["{out}", "--kid-features", "inception"], "needs the weights"),
        (["{out}", "--inception", "missing.pth"], "Inception weights missing.pth do not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, arguments, message):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "variation-000.png")
    sidecar = {"prompt": "", "random_weights": True, "images": [{"file": "variation-000.png"}]}
    (out / "rival.json").write_text(json.dumps(sidecar))
    Image.new("RGB", (8, 8)).save(out / "exemplar.png")
    (tmp_path / "empty").mkdir()
    filled = [a.format(out=out, empty=tmp_path / "empty") for a in arguments]
    code, _, stderr = _run(capsys, "evaluate", *filled, *([] if "--clip" in filled else ["--clip", "tiny"]))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()
