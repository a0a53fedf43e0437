"""Job outputs as users train from them: files (imagefolder), WebDataset and Parquet, locally and on S3.

No model: the images are small PIL images, one colour per exemplar, so every image read back can be
matched to the exemplar (and label) it was made for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax.data.records import load_records
from rival_jax.data.sinks import Item, OutputSpec, open_sink
from rival_jax.errors import RivalError

# (name, label, colour) of each exemplar; "top" is a file at the source's top level, so it has no label.
SOURCES = [("cat/a", "cat", (200, 30, 30)), ("cat/b", "cat", (30, 200, 30)), ("dog/c", "dog", (30, 30, 200))]
WITH_TOP = [*SOURCES, ("top", None, (200, 200, 30))]


def _items(sources=SOURCES, variations=2) -> list[tuple[Item, Image.Image | None]]:
    """Two variations per exemplar; the last variation of "cat/b" dropped by a filter (no image)."""
    found = []
    for name, label, colour in sources:
        for index in range(variations):
            metadata = {"label": label, "source_id": f"{name}.png", "source": f"/data/{name}.png", "seed": 7}
            metadata |= {"prompt": f"a photo of a {label}", "clip_image": 0.9, "caption": name.upper()}
            image = Image.new("RGB", (16, 16), colour)
            dropped = name == "cat/b" and index == variations - 1
            found.append((Item(f"key-{name}", index, name, metadata | {"dropped": dropped}, (24, 20)), image))
            if dropped:
                found[-1] = (found[-1][0], None)
    return found


def _write(output, spec: OutputSpec, items=None, process: int = 0, overwrite: bool = False, close: bool = True):
    sink = open_sink(output, spec, process=process, overwrite=overwrite, log=lambda line: None)
    done = sink.finished()
    for item, image in _items() if items is None else items:
        if (item.key, item.variation_index) not in done:
            sink.add(item, image)
    if close:
        sink.close()
    return sink


def _colour_label(image: Image.Image) -> str | None:
    """The label of the exemplar whose colour `image` has (JPEG/WebP change colours a little)."""
    pixel = np.asarray(image.convert("RGB"), dtype=float).mean(axis=(0, 1))
    distances = {name: np.abs(pixel - colour).sum() for name, _, colour in WITH_TOP}
    return next(label for name, label, _ in WITH_TOP if name == min(distances, key=distances.get))


def _no_file_twice(output) -> list[dict]:
    records = load_records(output)
    listed = [(r["file"], r.get("sample")) for r in records if r["file"] is not None]
    assert len(listed) == len(set(listed)), "an output file (or shard sample) is listed by two records"
    assert len({(r["key"], r["variation_index"]) for r in records}) == len(records)
    return records


def test_files_load_in_datasets_imagefolder_with_each_images_label(tmp_path):
    import datasets

    output = tmp_path / "out"
    _write(output, OutputSpec(), _items(WITH_TOP))
    assert sorted(p.relative_to(output / "images").as_posix() for p in (output / "images").rglob("*.png")) == [
        "cat/a_v0000.png", "cat/a_v0001.png", "cat/b_v0000.png", "dog/c_v0000.png", "dog/c_v0001.png",
        "top_v0000.png", "top_v0001.png",
    ]  # fmt: skip
    lines = [json.loads(line) for line in (output / "metadata.jsonl").read_text().splitlines()]
    assert list(lines[0])[:7] == ["file_name", "label", "source_id", "source", "variation_index", "seed", "prompt"]
    assert {line["caption"] for line in lines} == {"CAT/A", "CAT/B", "DOG/C", "TOP"}
    loaded = datasets.load_dataset("imagefolder", data_dir=str(output), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == 7
    for row in loaded:
        assert row["label"] == _colour_label(row["image"]) and row["source_id"].startswith(row["label"] or "top")


def test_files_folders_give_each_image_its_class_as_an_image_folder(tmp_path):
    import datasets

    output = tmp_path / "out"
    _write(output, OutputSpec())
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(output / "images"), split="train", cache_dir=str(tmp_path)
    )
    names = loaded.features["label"].names
    assert names == ["cat", "dog"] and len(loaded) == 5
    for row in loaded:
        assert names[row["label"]] == _colour_label(row["image"])


def test_webdataset_shards_read_back_with_webdataset_image_and_metadata_per_sample(tmp_path):
    import webdataset

    output = tmp_path / "out"
    _write(output, OutputSpec(format="webdataset", image_format="jpeg", shard_size=2), _items(WITH_TOP))
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    assert [Path(s).name for s in shards] == [
        "0000-000001.tar",
        "0000-000002.tar",
        "0000-000003.tar",
        "0000-000004.tar",
    ]
    samples = list(webdataset.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(
        f"{n}_v{i:04d}" for n, _, _ in WITH_TOP for i in range(2) if (n, i) != ("cat/b", 1)
    )
    for sample in samples:
        assert sample["json"]["label"] == _colour_label(sample["jpg"])
        assert sample["json"]["key"] == f"key-{sample['json']['source_id'][:-4]}" and not sample["json"]["dropped"]
    assert not (output / "metadata.jsonl").exists()
    _no_file_twice(output)


def test_parquet_loads_in_datasets_with_images_and_metadata_columns(tmp_path):
    import datasets

    output = tmp_path / "out"
    _write(output, OutputSpec(format="parquet", image_format="webp", shard_size=3))
    files = sorted(str(p) for p in (output / "data").glob("*.parquet"))
    assert len(files) == 2  # five kept images, three per file
    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(loaded.features["image"], datasets.Image) and len(loaded) == 5
    for row in loaded:
        assert row["label"] == _colour_label(row["image"]) and row["image"].format == "WEBP"
        assert row["variation_index"] in (0, 1) and row["seed"] == 7


@pytest.mark.parametrize(
    ("image_format", "size", "expected"),
    [("png", "model", (16, 16)), ("jpeg", "source", (24, 20)), ("webp", "32x8", (32, 8))],
)
def test_image_formats_and_sizes_are_written_and_carry_their_item(tmp_path, image_format, size, expected):
    output = tmp_path / "out"
    _write(output, OutputSpec(image_format=image_format, quality=80, size=size))
    extension = {"png": "png", "jpeg": "jpg", "webp": "webp"}[image_format]
    written = sorted((output / "images").rglob(f"*.{extension}"))
    assert len(written) == 5
    for path in written:
        with Image.open(path) as image:
            assert image.format == image_format.upper() and image.size == expected
    (output / "records-0000.jsonl").unlink()  # killed after writing the files, before recording them
    assert _write(output, OutputSpec(image_format=image_format), items=[]).finished() == {
        (item.key, item.variation_index) for item, image in _items() if image is not None
    }
    records = _no_file_twice(output)
    assert all(r["adopted"] for r in records) and {r["metadata"]["caption"] for r in records} == {
        "CAT/A",
        "CAT/B",
        "DOG/C",
    }
    assert len((output / "metadata.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"format": "tfrecord"}, "output format 'tfrecord' is not one of files, webdataset, parquet"),
        ({"image_format": "gif"}, "image format 'gif' is not one of png, jpeg, webp"),
        ({"quality": 0}, "quality 0 is outside 1..100"),
        ({"size": "512"}, "output size '512' is not model, source or WxH"),
        ({"shard_size": 0}, "shard size 0 is below 1"),
    ],
)
def test_a_bad_output_spec_is_one_line(spec, message):
    with pytest.raises(RivalError, match=message) as raised:
        OutputSpec(**spec)
    assert "\n" not in str(raised.value)
