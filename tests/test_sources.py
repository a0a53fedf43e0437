"""Sources of exemplars (`rival_jax.data.sources`): folders, manifests, Parquet, datasets, WebDataset, s3://.

Every test uses the real libraries (pyarrow, datasets, webdataset, s3fs against a local S3 server) and no model.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rival_jax.data.sources import Row, derive_seed, list_rows, load_row
from rival_jax.errors import RivalError
from rival_jax.jobs.settings import ROW_FIELDS


def _png(path: Path, mode: str = "RGB", color=(200, 30, 30), size=(40, 32)) -> bytes:
    """An image written at `path` (folders made), returned as its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path.read_bytes()


@pytest.fixture
def train(tmp_path) -> Path:
    """An ImageFolder: train/cat/{a.png, indoor/c.png}, train/dog/b.png and a top-level top.png."""
    root = tmp_path / "train"
    for name, color in [
        ("cat/a.png", "red"),
        ("cat/indoor/c.png", "orange"),
        ("dog/b.png", "blue"),
        ("top.png", "gray"),
    ]:
        _png(root / name, color=color)
    return root


def test_a_folder_is_read_recursively_with_the_first_folder_as_label(train):
    listing = list_rows(train, {"prompt": "a photo of a {label}", "steps": 3}, model="tiny")
    assert [row.id for row in listing.rows] == ["cat/a.png", "cat/indoor/c.png", "dog/b.png", "top.png"]
    assert [row.name for row in listing.rows] == ["cat/a", "cat/indoor/c", "dog/b", "top"]
    assert [row.label for row in listing.rows] == ["cat", "cat", "dog", None]
    assert [row.settings["prompt"] for row in listing.rows[:3]] == ["a photo of a cat"] * 2 + ["a photo of a dog"]
    assert all(row.settings["steps"] == 3 for row in listing.rows)
    assert listing.problems == [] and listing.extra_columns == []
    assert listing.rows[0].settings["seed"] == derive_seed(0, "cat/a.png")


def test_a_csv_keeps_label_split_and_caption_as_data_and_prompts_from_a_column(tmp_path, train):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "image,label,split,caption,seed\n"
        "train/cat/a.png,cat,train,a red cat,\n"
        "train/dog/b.png,dog,val,a blue dog,7\n"
        "train/top.png,,val,,\n"
    )
    listing = list_rows(manifest, {"prompt": "{unknown} is not formatted"}, model="tiny", prompt_column="caption")
    assert [row.id for row in listing.rows] == ["train/cat/a.png", "train/dog/b.png"]
    cat, dog = listing.rows
    assert cat.entry.columns == {"label": "cat", "split": "train", "caption": "a red cat"}
    assert (cat.label, cat.settings["prompt"], dog.settings["prompt"]) == ("cat", "a red cat", "a blue dog")
    assert dog.settings["seed"] == 7 and cat.settings["seed"] == derive_seed(0, "train/cat/a.png")
    assert listing.extra_columns == ["caption", "label", "split"]
    assert [row.name for row in listing.rows] == ["cat/train/cat/a", "dog/train/dog/b"]  # under the label's folder
    assert listing.problems == [
        "row train/top.png skipped: its caption column (the prompt) is missing or empty: give every row one"
    ]


def test_a_template_formats_any_column_and_an_unknown_field_is_a_problem(tmp_path, train):
    manifest = tmp_path / "m.jsonl"
    rows = [{"image": "train/cat/a.png", "label": "cat", "style": "oil"}, {"image": "train/dog/b.png", "label": "dog"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    listing = list_rows(manifest, {"prompt": "an {style} painting of a {label}"}, model="tiny")
    assert [row.settings["prompt"] for row in listing.rows] == ["an oil painting of a cat"]
    assert len(listing.problems) == 1 and "row train/dog/b.png skipped: prompt template" in listing.problems[0]
    assert "{style}" in listing.problems[0]
    plain = list_rows(manifest, {"prompt": "no braces here"}, model="tiny")
    assert {row.settings["prompt"] for row in plain.rows} == {"no braces here"}


def _by_id(listing) -> dict[str, Row]:
    return {row.id: row for row in listing.rows}


def test_ids_seeds_and_names_survive_inserting_removing_and_reordering_rows(tmp_path, train):
    manifest = tmp_path / "m.jsonl"

    def listed(names):
        manifest.write_text("".join(json.dumps({"image": f"train/{n}"}) + "\n" for n in names))
        return _by_id(list_rows(manifest, {"seed": 5}, model="tiny"))

    before = listed(["dog/b.png", "top.png"])
    after = listed(["cat/a.png", "top.png", "cat/indoor/c.png", "dog/b.png"])
    fewer = listed(["top.png"])
    for id, row in before.items():
        assert (after[id].settings["seed"], after[id].name) == (row.settings["seed"], row.name)
        assert load_row(after[id], model="tiny")[1] == load_row(row, model="tiny")[1]
    assert fewer["train/top.png"].settings == before["train/top.png"].settings
    assert len({row.settings["seed"] for row in after.values()}) == 4


def test_the_key_changes_with_the_image_the_settings_and_the_model(train):
    row = list_rows(train, {}, model="tiny").rows[0]
    image, key, converted = load_row(row, model="tiny")
    assert image.mode == "RGB" and not converted
    other = list_rows(train, {"steps": 7}, model="tiny").rows[0]
    assert len({key, load_row(other, model="tiny")[1], load_row(row, model="sd15")[1]}) == 3
    _png(train / "cat" / "a.png", color="green")
    assert load_row(row, model="tiny")[1] != key


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent: white
        ("LA", (0, 128), (128, 128, 128)),  # half transparent black over white
    ],
)
def test_grayscale_cmyk_and_alpha_images_are_converted_to_rgb_over_white(tmp_path, mode, color, expected):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    _png(tmp_path / "src" / f"x{suffix}", mode, color)
    image, _, converted = load_row(list_rows(tmp_path / "src", {}, model="tiny").rows[0], model="tiny")
    assert converted and image.mode == "RGB"
    assert np.abs(np.asarray(image)[0, 0].astype(int) - expected).max() <= 2


def test_a_palette_image_with_transparency_is_laid_over_white(tmp_path):
    image = Image.new("P", (40, 32), 0)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.putpixel((5, 5), 1)
    (tmp_path / "src").mkdir()
    image.save(tmp_path / "src" / "p.png", transparency=0)
    rgb, _, converted = load_row(list_rows(tmp_path / "src", {}, model="tiny").rows[0], model="tiny")
    assert converted and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((5, 5)) == (10, 200, 10)


def test_clashing_ids_and_output_names_are_problem_lines_naming_both(tmp_path, train):
    _png(train / "cat" / "a.jpg")
    listing = list_rows(train, {}, model="tiny")
    assert "cat/a.png" not in _by_id(listing) and "cat/a.jpg" not in _by_id(listing)
    clashes = [p for p in listing.problems if "share the output name 'cat/a'" in p]
    assert len(clashes) == 2 and all("a.png" in p and "a.jpg" in p for p in clashes)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,id\ntrain/cat/a.png,one\ntrain/dog/b.png,one\ntrain/top.png,two\n")
    listing = list_rows(manifest, {}, model="tiny")
    assert [row.id for row in listing.rows] == ["two"]
    assert len(listing.problems) == 2 and all("share the id 'one'" in p for p in listing.problems)
    manifest.write_text(f"image\ntrain/top.png\n./train/../train/top.png\n{train / 'top.png'}\ntrain/dog/b.png\n")
    listing = list_rows(manifest, {}, model="tiny")  # one file three times: give each row an id to keep them
    assert [row.id for row in listing.rows] == ["train/dog/b.png"]
    assert len(listing.problems) == 3 and all("share the id 'train/top.png'" in p for p in listing.problems)


def test_bad_rows_are_problem_lines_and_a_bad_source_is_one_error(tmp_path, train):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "train/top.png", "steps": "many"}\n[1]\n{"prompt": "x"}\nnot json\n')
    listing = list_rows(manifest, {}, model="tiny")
    assert listing.rows == [] and len(listing.problems) == 4
    assert all(p.startswith("row ") and "skipped: " in p for p in listing.problems)
    (tmp_path / "m.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for source, message in [
        ("missing", "does not exist"),
        ("m.txt", "is not a folder of images"),
        ("empty", "no rows"),
    ]:
        with pytest.raises(RivalError, match=message):
            list_rows(tmp_path / source, {}, model="tiny")


def test_an_unreadable_image_is_an_error_naming_it(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.png").write_bytes(b"not a png")
    row = list_rows(tmp_path / "src", {}, model="tiny").rows[0]
    with pytest.raises(RivalError, match=r"bad.png is not a readable image"):
        load_row(row, model="tiny")


def test_rows_are_picklable(train):
    listing = list_rows(train, {}, model="tiny")
    assert pickle.loads(pickle.dumps(listing.rows))[0].entry == listing.rows[0].entry


def _parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=2)


@pytest.mark.parametrize("form", ["path", "bytes", "struct"])
def test_parquet_image_columns_as_paths_bytes_or_the_hugging_face_struct(tmp_path, train, form):
    names = ["cat/a.png", "cat/indoor/c.png", "dog/b.png"]
    data = [(train / n).read_bytes() for n in names]
    image = {
        "path": [f"../train/{n}" for n in names],
        "bytes": data,
        "struct": [{"bytes": d, "path": n} for d, n in zip(data, names, strict=True)],
    }[form]
    _parquet(tmp_path / "pq" / "data.parquet", {"image": image, "label": ["cat", "cat", "dog"], "score": [1, 2, 3]})
    listing = list_rows(tmp_path / "pq" / "data.parquet", {"prompt": "a {label}"}, model="tiny")
    expected = {"path": ["../train/" + n for n in names], "bytes": [f"data.parquet#{i}" for i in range(3)]}
    assert [row.id for row in listing.rows] == expected.get(form, names)
    assert [row.label for row in listing.rows] == ["cat", "cat", "dog"]
    if form == "bytes":
        assert [row.name for row in listing.rows] == ["cat/data/0", "cat/data/1", "dog/data/2"]
    assert [row.entry.columns["score"] for row in listing.rows] == [1, 2, 3]
    assert listing.extra_columns == ["label", "score"] and listing.problems == []
    for row, expected_bytes in zip(listing.rows, data, strict=True):
        image, _, _ = load_row(row, model="tiny")
        assert image.tobytes() == Image.open(io.BytesIO(expected_bytes)).convert("RGB").tobytes()


def test_a_folder_or_glob_of_parquet_files_is_one_source(tmp_path, train):
    for part, name in enumerate(["cat/a.png", "dog/b.png"]):
        _parquet(tmp_path / "pq" / f"part-{part}.parquet", {"image": [(train / name).read_bytes()], "n": [part]})
    by_folder = list_rows(tmp_path / "pq", {}, model="tiny")
    by_glob = list_rows(f"{tmp_path}/pq/part-*.parquet", {}, model="tiny")
    assert [row.id for row in by_folder.rows] == ["part-0.parquet#0", "part-1.parquet#0"]
    assert [row.id for row in by_glob.rows] == [row.id for row in by_folder.rows]
    assert [row.name for row in by_glob.rows] == ["part-0/0", "part-1/0"]
    assert load_row(by_glob.rows[1], model="tiny")[0].getpixel((0, 0)) == (0, 0, 255)


def test_a_datasets_folder_gives_class_label_names_and_its_split(tmp_path, train):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "caption": datasets.Value("string"),
        }
    )
    files = [str(train / n) for n in ("cat/a.png", "dog/b.png")]
    table = {"image": files, "label": [0, 1], "caption": ["a cat", "a dog"]}
    dataset = datasets.Dataset.from_dict(table, features=features)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(str(tmp_path / "ds"))
    listing = list_rows(tmp_path / "ds", {}, model="tiny", prompt_column="caption")
    assert [(row.label, row.settings["prompt"]) for row in listing.rows] == [("cat", "a cat"), ("dog", "a dog")]
    assert listing.extra_columns == ["caption", "label"]
    test = list_rows(tmp_path / "ds", {}, model="tiny", split="test")
    assert [row.label for row in test.rows] == ["dog"]
    assert load_row(test.rows[0], model="tiny")[0].getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(RivalError, match="has no split 'valid'"):
        list_rows(tmp_path / "ds", {}, model="tiny", split="valid")


def _shard(path: Path, samples: list[dict]) -> None:
    import webdataset

    path.parent.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _sample(key: str, color: str, label: str, **columns) -> dict:
    stream = io.BytesIO()
    Image.new("L" if color == "gray" else "RGB", (40, 32), color).save(stream, "PNG")
    return {"__key__": key, "png": stream.getvalue(), "cls": label, "json": columns}


def test_webdataset_shards_and_brace_patterns_give_samples_with_labels_and_columns(tmp_path):
    _shard(tmp_path / "shards" / "s-000.tar", [_sample("a", "red", "cat", caption="red"), _sample("b", "gray", "dog")])
    _shard(tmp_path / "shards" / "s-001.tar", [_sample("c", "blue", "dog", caption="blue", id="custom")])
    listing = list_rows(f"{tmp_path}/shards/s-{{000..001}}.tar", {"prompt": "a {label}"}, model="tiny")
    assert [row.id for row in listing.rows] == ["custom", "s-000/a", "s-000/b"]
    assert [row.label for row in listing.rows] == ["dog", "cat", "dog"]
    assert [row.name for row in listing.rows] == ["dog/custom", "cat/s-000/a", "dog/s-000/b"]
    assert [row.entry.origin for row in listing.rows] == ["s-001.tar#c", "s-000.tar#a", "s-000.tar#b"]
    assert listing.rows[1].entry.columns == {"caption": "red"} and listing.extra_columns == ["caption", "id"]
    image, _, converted = load_row(listing.rows[2], model="tiny")
    assert converted and image.getpixel((0, 0)) == (128, 128, 128)
    single = list_rows(tmp_path / "shards" / "s-000.tar", {}, model="tiny")
    assert [row.id for row in single.rows] == ["s-000/a", "s-000/b"]


def test_an_s3_folder_and_an_s3_manifest_with_relative_and_absolute_urls(s3_bucket, tmp_path, train):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(train), f"{s3_bucket}/train", recursive=True)
    listing = list_rows(f"{s3_bucket}/train", {}, model="tiny")
    assert [(row.id, row.label) for row in listing.rows] == [
        ("cat/a.png", "cat"),
        ("cat/indoor/c.png", "cat"),
        ("dog/b.png", "dog"),
        ("top.png", None),
    ]
    assert listing.rows[0].entry.origin == f"{s3_bucket}/train/cat/a.png"
    manifest = "image,label\ncat/a.png,cat\n" + f"{s3_bucket}/train/dog/b.png,dog\n"
    fs.pipe(f"{s3_bucket}/train/m.csv", manifest.encode())
    rows = list_rows(f"{s3_bucket}/train/m.csv", {}, model="tiny").rows
    assert [row.id for row in rows] == ["cat/a.png", "dog/b.png"]
    assert [load_row(row, model="tiny")[0].getpixel((0, 0)) for row in rows] == [(255, 0, 0), (0, 0, 255)]
    local = list_rows(train, {}, model="tiny").rows
    assert load_row(rows[0], model="tiny")[1] == load_row(local[0], model="tiny")[1]


def test_a_relative_source_gives_absolute_locations_and_a_missing_extra_names_its_install_line(
    tmp_path, train, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    row = list_rows("train", {}, model="tiny").rows[0]
    assert Path(row.entry.image).is_absolute() and row.id == "cat/a.png"
    (tmp_path / "link").symlink_to(train / "cat")
    (train / "m.csv").write_text("image\ncat/a.png\n")
    (row,) = list_rows("link/../m.csv", {}, model="tiny").rows  # ".." after a link: as open() sees it
    assert Path(row.entry.image) == train / "cat" / "a.png"
    with pytest.raises(RivalError, match=r'pip install -e "\.\[cloud\]"'):
        list_rows("nosuchprotocol://bucket/train", {}, model="tiny")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RivalError, match=r'pip install -e "\.\[datasets\]"'):
        list_rows("ds", {}, model="tiny")


settings_columns = st.sampled_from(["prompt", "seed", "steps", "guidance_scale"])
data_columns = st.text(alphabet="abcxyz_ ü", min_size=1, max_size=6).filter(
    lambda c: c not in (*ROW_FIELDS, "image", "id")
)
cell_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00\r"), max_size=8)


@settings(max_examples=40, deadline=None, database=None)
@given(
    columns=st.lists(st.one_of(settings_columns, data_columns), min_size=1, max_size=5, unique=True),
    cells=st.lists(st.lists(cell_text, min_size=5, max_size=5), min_size=1, max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_any_manifest_with_extra_columns_carries_them_whatever_the_row_order(columns, cells, order):
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for i in range(len(cells)):
            _png(folder / f"img{i}.png")
        records = [{"image": f"img{i}.png", **dict(zip(columns, row, strict=False))} for i, row in enumerate(cells)]
        listings = []
        for _ in range(2):
            order.shuffle(records)
            stream = io.StringIO()
            writer = csv.DictWriter(stream, ["image", *columns])
            writer.writeheader()
            writer.writerows(records)
            (folder / "m.csv").write_text(stream.getvalue(), encoding="utf-8")
            listings.append(list_rows(folder / "m.csv", {}, model="tiny"))
        first, second = listings
        assert [(r.id, r.settings) for r in first.rows] == [(r.id, r.settings) for r in second.rows]
        assert sorted(first.problems) == sorted(second.problems)
        assert len(first.rows) + len(first.problems) == len(records)
        assert first.extra_columns == sorted(c for c in columns if c not in ROW_FIELDS)
        expected = {r["image"]: r for r in records}
        for row in first.rows:
            assert {c: row.entry.columns.get(c, "") for c in columns} == {c: expected[row.id][c] for c in columns}


def test_s3_shards_parquet_globs_and_datasets_folders(s3_bucket, tmp_path, train):
    import datasets
    import s3fs

    fs = s3fs.S3FileSystem()
    _shard(tmp_path / "s-000.tar", [_sample("a", "red", "cat")])
    _parquet(tmp_path / "part-0.parquet", {"image": [(train / "dog/b.png").read_bytes()], "label": ["dog"]})
    datasets.Dataset.from_dict(
        {"image": [str(train / "cat/a.png")]}, features=datasets.Features({"image": datasets.Image()})
    ).save_to_disk(str(tmp_path / "ds"))
    for name in ("s-000.tar", "part-0.parquet"):
        fs.put(str(tmp_path / name), f"{s3_bucket}/data/{name}")
    fs.put(str(tmp_path / "ds"), f"{s3_bucket}/ds", recursive=True)
    for source, id, color in [
        (f"{s3_bucket}/data/s-{{000..000}}.tar", "s-000/a", (255, 0, 0)),
        (f"{s3_bucket}/data/part-*.parquet", "part-0.parquet#0", (0, 0, 255)),
        (f"{s3_bucket}/ds", None, (255, 0, 0)),
    ]:
        (row,) = list_rows(source, {}, model="tiny").rows
        assert id is None or row.id == id
        assert load_row(row, model="tiny")[0].getpixel((0, 0)) == color
