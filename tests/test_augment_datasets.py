"""Augmenting labelled datasets end to end on the tiny model: labels and layout kept for `datasets`, columns and
prompts from manifests, identities that survive edits, WebDataset and Parquet outputs, the CLIP filters, and
`--shard I/N`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax.data.sinks import OutputSpec
from rival_jax.data.sources import list_rows
from rival_jax.jobs.augment import run_augment
from rival_jax.jobs.filtering import ClipFilter

# Steps, batch and exemplar size of tests/test_augment.py, so the compiled programs are shared.
JOB = ["--steps", "2", "--batch-size", "2", "-n", "2", "--no-progress", "--no-compile-cache"]
SETTINGS = {"steps": 2, "num_variations": 2}
SIDE = 64


def _image(path: Path, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def _records(output: Path) -> list[dict]:
    lines = [line for path in sorted(output.glob("records-*.jsonl")) for line in path.read_text().splitlines()]
    return [json.loads(line) for line in lines]


def _pixels(output: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(output)): np.asarray(Image.open(p)) for p in sorted((output / "images").rglob("*.png"))}


def _run(pipe, source, output, settings=SETTINGS, **kwargs):
    listing = list_rows(str(source), settings, model="tiny", prompt_column=kwargs.pop("prompt_column", None))
    return run_augment(
        pipe, listing.rows, output, batch_size=2, problems=listing.problems, show_progress=False, model="tiny", **kwargs
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An ImageFolder: two classes, one grayscale exemplar."""
    root = tmp_path_factory.mktemp("train")
    for seed, name in enumerate(("cat/a.png", "cat/b.png", "dog/c.png")):
        _image(root / name, seed, "L" if name == "cat/b.png" else "RGB")
    return root


@pytest.fixture(scope="module")
def cli_run(tree, tiny_flax, tmp_path_factory) -> tuple[Path, int, str]:
    from rival_jax.cli import main

    output = tmp_path_factory.mktemp("cli") / "out"
    code = main(["augment", str(tree), "-o", str(output), "--model", str(tiny_flax), *JOB])
    return output, code


def test_an_imagefolder_keeps_each_images_label_for_datasets(cli_run, capsys):
    import datasets

    output, code = cli_run
    assert code == 0
    indexed = datasets.load_dataset("imagefolder", data_dir=str(output), split="train")
    assert len(indexed) == 6
    for example in indexed:
        assert example["label"] == example["source_id"].split("/")[0]
        assert example["image"].size == (128, 128)  # the tiny model's pixel budget
    inferred = datasets.load_dataset("imagefolder", data_dir=str(output / "images"), split="train")
    names = inferred.features["label"].names
    assert names == ["cat", "dog"]
    assert sorted(names[example["label"]] for example in inferred) == ["cat"] * 4 + ["dog"] * 2
    files = sorted(_pixels(output))
    assert files == [f"images/{name}_v000{i}.png" for name in ("cat/a", "cat/b", "dog/c") for i in range(2)]


def test_shards_of_two_processes_make_one_process_images_pixel_for_pixel(cli_run, tree, tiny_flax, tmp_path, capsys):
    from rival_jax.cli import main

    output = tmp_path / "sharded"
    for share in ("1/2", "0/2"):
        assert main(["augment", str(tree), "-o", str(output), "--model", str(tiny_flax), "--shard", share, *JOB]) == 0
        assert "process" in capsys.readouterr().err
    assert sorted(p.name for p in output.glob("records-*.jsonl")) == ["records-0000.jsonl", "records-0001.jsonl"]
    expected, got = _pixels(cli_run[0]), _pixels(output)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[name], expected[name]) for name in got)
    lines = (output / "metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["file_name"] for line in lines) == sorted(got)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shard", "2/2"], "--shard '2/2' is not a share: use I/N with 0 <= I < N"),
        (["--shard", "0/2", "--coordinator", "127.0.0.1:1"], "--shard splits a job without jax.distributed"),
        (["--keep-best", "3"], "num_variations 2 is below --keep-best 3"),
        (["--keep-best", "1", "--clip", "no-such-clip"], "CLIP model no-such-clip does not exist"),
        (["--min-clip-image", "1.5"], "--min-clip-image 1.5 is out of range"),
        (["--quality", "0"], "quality 0"),
        (["--output-size", "12"], "12"),
        (["--shard-size", "0"], "shard size 0"),
    ],
)
def test_bad_augment_flags_exit_2_before_the_model_loads(capsys, tmp_path, tree, extra, message):
    from rival_jax.cli import main

    argv = ["augment", str(tree), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), *JOB, *extra]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rival-jax: error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_csv_with_label_split_and_caption_gives_prompts_and_carries_its_columns(tiny_pipe, tree, tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_text(
        f"image,label,split,caption\n{tree / 'cat/a.png'},cat,train,a small cat\n{tree / 'dog/c.png'},dog,val,a dog\n"
    )
    captioned = _run(
        tiny_pipe, manifest, tmp_path / "captions", {**SETTINGS, "num_variations": 1}, prompt_column="caption"
    )
    templated = _run(
        tiny_pipe, manifest, tmp_path / "templates", {**SETTINGS, "num_variations": 1, "prompt": "a photo of a {label}"}
    )
    assert captioned.generated == templated.generated == 2 and captioned.exit_code == 0
    for folder, prompts in (
        ("captions", {"cat": "a small cat", "dog": "a dog"}),
        ("templates", {"cat": "a photo of a cat", "dog": "a photo of a dog"}),
    ):
        rows = [json.loads(line) for line in (tmp_path / folder / "metadata.jsonl").read_text().splitlines()]
        assert {row["label"]: row["prompt"] for row in rows} == prompts
        assert {row["label"]: (row["split"], row["caption"]) for row in rows} == {
            "cat": ("train", "a small cat"),
            "dog": ("val", "a dog"),
        }
        assert {row["label"]: row["settings"]["prompt"] for row in rows} == prompts


def test_inserting_removing_and_reordering_sources_generates_only_what_is_new(tiny_pipe, tmp_path):
    source = tmp_path / "src"
    for seed, name in enumerate(("dog/img.png", "dog/z.png", "cat/indoor/x.png")):
        _image(source / name, seed)
    output = tmp_path / "out"
    first = _run(tiny_pipe, source, output)
    assert (first.generated, first.already_done) == (6, 0)
    stamps = {name: (output / name).stat().st_mtime_ns for name in _pixels(output)}
    _image(source / "cat/img.png", 10)  # sorts first and shares the stem "img" with dog/img.png
    (source / "dog/z.png").unlink()
    again = _run(tiny_pipe, source, output)
    assert (again.generated, again.already_done) == (2, 4)
    assert all((output / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    records = _records(output)
    files = [r["file"] for r in records]
    assert len(files) == len(set(files)) == 8
    assert {"images/cat/img_v0000.png", "images/cat/indoor/x_v0001.png", "images/dog/img_v0001.png"} <= set(files)
    by_file = {r["file"]: r for r in records}
    assert by_file["images/cat/img_v0000.png"]["metadata"]["label"] == "cat"
    assert by_file["images/dog/img_v0000.png"]["metadata"]["label"] == "dog"


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_shard_outputs_read_back_with_their_labels(tiny_pipe, tree, tmp_path, output_format):
    output = tmp_path / output_format
    spec = OutputSpec(output_format, "jpeg", quality=90, size="48x40", shard_size=4)
    summary = _run(tiny_pipe, tree, output, spec=spec)
    assert summary.generated == 6
    if output_format == "webdataset":
        import webdataset

        shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
        samples = list(webdataset.WebDataset(shards, shardshuffle=False).decode("pil"))
        pairs = [(s["json"]["source_id"], s["json"]["label"], s["jpg"].size) for s in samples]
    else:
        import datasets

        files = sorted(str(p) for p in (output / "data").glob("*.parquet"))
        table = datasets.load_dataset("parquet", data_files=files, split="train")
        pairs = [(row["source_id"], row["label"], row["image"].size) for row in table]
    assert len(shards if output_format == "webdataset" else files) == 2
    assert sorted(pairs) == sorted(
        (f"{name}.png", name.split("/")[0], (48, 40)) for name in ("cat/a", "cat/b", "dog/c") for _ in range(2)
    )
    again = _run(tiny_pipe, tree, output, spec=spec)
    assert (again.generated, again.already_done) == (0, 6)


def test_keep_best_keeps_the_most_similar_and_records_every_score(tiny_pipe, tree, tmp_path):
    from rival_jax.metrics.clip import load_clip

    clip_filter = ClipFilter(load_clip("tiny", cache_dir=None), keep_best=2, min_clip_image=None)
    output = tmp_path / "best"
    summary = _run(tiny_pipe, tree, output, {**SETTINGS, "num_variations": 3}, clip_filter=clip_filter)
    assert (summary.generated, summary.dropped) == (9, 3) and "3 of them dropped by the CLIP filters" in summary.line()
    records = _records(output)
    assert len(records) == 9
    for source_id in ("cat/a.png", "cat/b.png", "dog/c.png"):
        mine = sorted(
            (r for r in records if r["metadata"]["source_id"] == source_id), key=lambda r: -r["metadata"]["clip_image"]
        )
        assert [r["metadata"]["dropped"] for r in mine] == [False, False, True]
        assert mine[2]["file"] is None and all(r["file"] for r in mine[:2])
    again = _run(tiny_pipe, tree, output, {**SETTINGS, "num_variations": 3}, clip_filter=clip_filter)
    assert (again.generated, again.already_done) == (0, 9)


class _Scores:
    """A CLIP stand-in whose image features make each image's score its red value at (0, 0) / 255."""

    def image_features(self, pictures: list[Image.Image]) -> np.ndarray:
        red = np.array([p.getpixel((0, 0))[0] / 255 for p in pictures])
        return np.stack([red, np.sqrt(1 - red**2)], axis=-1)


@pytest.mark.parametrize(
    ("keep_best", "floor", "kept"),
    [(2, None, [0, 2]), (None, 0.5, [0, 2]), (3, 0.85, [2]), (None, None, [0, 1, 2, 3]), (1, None, [2])],
)
def test_filters_keep_the_k_best_then_drop_those_below_the_floor(keep_best, floor, kept):
    exemplar = Image.new("RGB", (4, 4), (255, 0, 0))
    variations = {i: Image.new("RGB", (4, 4), (red, 0, 0)) for i, red in enumerate((204, 51, 255, 102))}
    decisions = ClipFilter(_Scores(), keep_best, floor).decide(exemplar, variations)
    assert [d.index for d in decisions if d.kept] == kept
    assert [round(d.score, 2) for d in decisions] == [0.8, 0.2, 1.0, 0.4]


def test_an_s3_dataset_augmented_into_s3_shards_resumes_there(s3_bucket, tree, tiny_flax, tmp_path, capsys):
    import s3fs
    import webdataset

    from rival_jax.cli import main

    fs = s3fs.S3FileSystem()
    fs.put(str(tree), f"{s3_bucket}/train", recursive=True)
    argv = ["augment", f"{s3_bucket}/train", "-o", f"{s3_bucket}/out", "--model", str(tiny_flax), *JOB]
    argv += ["--output-format", "webdataset", "--shard-size", "4"]
    assert main(argv) == 0
    assert main(argv) == 0
    assert "done: 0 generated" in (last := capsys.readouterr().err.strip().splitlines()[-1]) and "6 already" in last
    fs.get(f"{s3_bucket}/out/shards/", str(tmp_path / "shards"), recursive=True)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    samples = list(webdataset.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(shards) == 2 and sorted(s["json"]["source_id"] for s in samples) == sorted(
        f"{name}.png" for name in ("cat/a", "cat/b", "dog/c") for _ in range(2)
    )
    assert all(s["json"]["label"] == s["json"]["source_id"].split("/")[0] for s in samples)
