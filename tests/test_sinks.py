"""Job outputs as users train from them: files (imagefolder), WebDataset and Parquet, locally and on S3.

No model: the images are small PIL images, one colour per exemplar, so every image read back can be
matched to the exemplar (and label) it was made for.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax.data import storage
from rival_jax.data.records import RecordLog, load_records
from rival_jax.data.sinks import STALE_SECONDS, Item, OutputSpec, open_sink
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


def _no_file_twice(output, processes=(0, 1)) -> list[dict]:
    """Every record as written (none superseded), checked: no output file or shard sample in two of them."""
    records = [record for process in processes for record in RecordLog(output, process).own()]
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


def _kill_at(monkeypatch, count: int) -> None:
    """Interrupt the job as it encodes image number `count` (from 0), as a kill would: the sink is never closed."""
    from rival_jax.data import sinks

    calls = []

    def encode(*args, **kwargs):
        calls.append(1)
        if len(calls) > count:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = sinks.encode
    monkeypatch.setattr(sinks, "encode", encode)


def test_a_kill_mid_shard_redoes_only_that_shards_items(tmp_path, monkeypatch):
    import webdataset

    output, spec = tmp_path / "out", OutputSpec(format="webdataset", shard_size=2)
    _kill_at(monkeypatch, 5)  # shards 1 (cat/a) and 2 (cat/b, dog/c v0) committed; shard 3 holds dog/c v1
    with pytest.raises(KeyboardInterrupt):
        _write(output, spec, _items(WITH_TOP))
    monkeypatch.undo()
    (output / "shards" / ".0000-000003.tar.x1.tmp").write_bytes(b"half a shard")  # a kill while committing
    (output / "shards" / ".0001-000001.tar.x2.tmp").write_bytes(b"process 1 is writing this")
    added = []
    sink = open_sink(output, spec, process=0, overwrite=False, log=print)
    done = sink.finished()
    for item, image in _items(WITH_TOP):
        if (item.key, item.variation_index) not in done:
            added.append((item.name, item.variation_index))
            sink.add(item, image)
    sink.close()
    assert added == [("dog/c", 1), ("top", 0), ("top", 1)]  # the killed shard's item, then those never started
    assert sorted(p.name for p in (output / "shards").iterdir()) == [
        ".0001-000001.tar.x2.tmp", "0000-000001.tar", "0000-000002.tar", "0000-000003.tar", "0000-000004.tar",
    ]  # fmt: skip
    shards = sorted(str(p) for p in (output / "shards").glob("*.tar"))
    keys = [s["__key__"] for s in webdataset.WebDataset(shards, shardshuffle=False, empty_check=False)]
    assert len(keys) == len(set(keys)) == 7
    assert len(_no_file_twice(output)) == 8  # seven kept, one dropped


def test_a_shard_committed_but_not_recorded_is_adopted_not_written_again(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    output, spec = tmp_path / "out", OutputSpec(format="parquet", shard_size=3)
    real = RecordLog.append

    def killed_after_the_commit(self, records):
        if records:
            raise KeyboardInterrupt
        real(self, records)

    monkeypatch.setattr(RecordLog, "append", killed_after_the_commit)
    with pytest.raises(KeyboardInterrupt):
        _write(output, spec)
    monkeypatch.undo()
    assert [p.name for p in (output / "data").iterdir()] == ["0000-000001.parquet"] and not load_records(output)
    _write(output, spec)
    records = _no_file_twice(output)
    assert [r["sample"] for r in records if r["adopted"]] == ["cat/a_v0000", "cat/a_v0001", "cat/b_v0000"]
    rows = [row for p in sorted((output / "data").iterdir()) for row in pq.read_table(p).to_pylist()]
    assert len(rows) == len({(r["key"], r["variation_index"]) for r in rows}) == 5


def test_only_whole_files_this_process_stamped_are_adopted(tmp_path):
    output = tmp_path / "out"
    _write(output, OutputSpec(), process=1)
    (output / "records-0001.jsonl").unlink()  # process 1 killed before recording
    Image.new("RGB", (4, 4)).save(output / "images" / "cat" / "foreign.png")
    cut = output / "images" / "dog" / "c_v0001.png"
    cut.write_bytes(cut.read_bytes()[:-40])  # a file cut short (not written by the sink, whose writes are atomic)
    assert _write(output, OutputSpec(), items=[], process=0).finished() == set()
    assert not (output / "records-0000.jsonl").exists()
    assert _write(output, OutputSpec(), items=[], process=1).finished() == {
        ("key-cat/a", 0),
        ("key-cat/a", 1),
        ("key-cat/b", 0),
        ("key-dog/c", 0),
    }
    assert [json.loads(line)["file_name"] for line in (output / "metadata.jsonl").read_text().splitlines()] == [
        "images/cat/a_v0000.png", "images/cat/a_v0001.png", "images/cat/b_v0000.png", "images/dog/c_v0000.png",
    ]  # fmt: skip
    _write(output, OutputSpec(), process=1)  # the cut file is generated again, and recorded once
    assert [r["file"] for r in _no_file_twice(output) if not r["adopted"]] == [None, "images/dog/c_v0001.png"]


def test_overwrite_removes_what_this_process_recorded_and_starts_over(tmp_path):
    output = tmp_path / "out"
    _write(output, OutputSpec(), process=0)
    other = [(Item("key-other", 0, "other/z", {"label": "other"}, (8, 8)), Image.new("RGB", (8, 8)))]
    _write(output, OutputSpec(), other, process=1)
    Image.new("RGB", (4, 4)).save(output / "images" / "cat" / "mine.png")
    lines = []
    sink = open_sink(output, OutputSpec(), process=0, overwrite=True, log=lines.append)
    assert lines == [f"--overwrite: removed 5 files the earlier run recorded in {output}"]
    assert sink.finished() == set() and not (output / "records-0000.jsonl").exists()
    assert sorted(p.name for p in (output / "images").rglob("*.png")) == ["mine.png", "z_v0000.png"]
    sink.close()
    assert [json.loads(line)["file_name"] for line in (output / "metadata.jsonl").read_text().splitlines()] == [
        "images/other/z_v0000.png"
    ]
    shards = tmp_path / "shards"
    _write(shards, OutputSpec(format="webdataset", shard_size=2))
    (shards / "records-0000.jsonl").write_text("")  # its shards unrecorded: still this process's, removed too
    open_sink(shards, OutputSpec(format="webdataset"), process=0, overwrite=True, log=lines.append)
    assert lines[-1].startswith("--overwrite: removed 3 files") and not list((shards / "shards").iterdir())


def test_two_processes_index_every_kept_image_once(tmp_path):
    output = tmp_path / "out"
    items = _items(WITH_TOP)
    first = open_sink(output, OutputSpec(), process=0, overwrite=False, log=print)
    second = open_sink(output, OutputSpec(), process=1, overwrite=False, log=print)
    for number, (item, image) in enumerate(items):
        (first if number < 4 else second).add(item, image)
    first.close()
    second.close()
    lines = [json.loads(line) for line in (output / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == sorted(f"images/{p}" for p in storage.list_files(output / "images"))
    assert len(lines) == 7 and len(_no_file_twice(output)) == 8


def test_every_output_file_is_readable_as_the_umask_says(tmp_path):
    previous = os.umask(0o027)
    try:
        _write(tmp_path / "files", OutputSpec())
        _write(tmp_path / "shards", OutputSpec(format="webdataset"))
    finally:
        os.umask(previous)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 10  # five images, the index, the records lock, a shard, two records files
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o640"}


def test_outputs_round_trip_through_a_local_s3_server(s3_bucket, tmp_path, monkeypatch):
    import webdataset

    url = f"{s3_bucket}/out"
    _kill_at(monkeypatch, 4)  # three items recorded (one object); dog/c v0 written, not recorded (as cat/b v1)
    with pytest.raises(KeyboardInterrupt):
        _write(url, OutputSpec(image_format="jpeg", shard_size=3))
    monkeypatch.undo()
    assert len(load_records(url)) == 3
    _write(url, OutputSpec(image_format="jpeg", shard_size=3))
    records = _no_file_twice(url)
    assert len(records) == 6 and [r["file"] for r in records if r["adopted"]] == ["images/dog/c_v0000.jpg"]
    assert [n for n in storage.list_files(url) if n.startswith("records")] == [
        "records-0000-000001.jsonl", "records-0000-000002.jsonl", "records-0000-000003.jsonl",
    ]  # fmt: skip
    lines = [json.loads(line) for line in storage.read_bytes(f"{url}/metadata.jsonl").decode().splitlines()]
    assert len(lines) == 5
    for line in lines:
        image = Image.open(io.BytesIO(storage.read_bytes(f"{url}/{line['file_name']}")))
        assert image.format == "JPEG" and _colour_label(image) == line["label"]
    assert _write(url, OutputSpec(), items=[]).finished() == {(r["key"], r["variation_index"]) for r in records}
    shards = f"{s3_bucket}/shards"
    _write(shards, OutputSpec(format="webdataset", shard_size=3))
    names = storage.list_files(f"{shards}/shards")
    assert names == ["0000-000001.tar", "0000-000002.tar"]
    for name in names:
        (tmp_path / name).write_bytes(storage.read_bytes(f"{shards}/shards/{name}"))
    local = [str(tmp_path / name) for name in names]
    samples = list(webdataset.WebDataset(local, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == 5 and all(_colour_label(s["png"]) == s["json"]["label"] for s in samples)
    done = {(item.key, item.variation_index) for item, _ in _items()}
    assert _write(shards, OutputSpec(format="webdataset"), items=[]).finished() == done


def test_items_finished_in_another_format_are_written_in_this_one(tmp_path):
    output = tmp_path / "out"
    _write(output, OutputSpec(format="webdataset"))
    added = []
    sink = open_sink(output, OutputSpec(), process=0, overwrite=False, log=print)
    done = sink.finished()
    for item, image in _items():
        if (item.key, item.variation_index) not in done:
            added.append(image is not None)
            sink.add(item, image)
    sink.close()
    assert added == [True] * 5, "the kept images again, as files; the dropped one stays dropped"
    assert len((output / "metadata.jsonl").read_text().splitlines()) == 5


def test_a_damaged_shard_is_named_kept_and_its_items_written_again(tmp_path):
    output = tmp_path / "out"
    (output / "shards").mkdir(parents=True)
    (output / "shards" / "0000-000001.tar").write_bytes(b"not a tar")
    lines = []
    sink = open_sink(output, OutputSpec(format="webdataset"), process=0, overwrite=False, log=lines.append)
    assert sink.finished() == set()
    assert lines == [f"{output}/shards/0000-000001.tar is damaged: its items are generated again; remove it"]
    for item, image in _items():
        sink.add(item, image)
    sink.close()
    assert sorted(p.name for p in (output / "shards").iterdir()) == ["0000-000001.tar", "0000-000002.tar"]


def test_a_url_output_is_checked_but_not_locked(s3_bucket):
    from rival_jax.jobs.locks import check_output, output_lock

    assert check_output(f"{s3_bucket}/out") == f"{s3_bucket}/out"
    storage.write_bytes(f"{s3_bucket}/file", b"x")
    with pytest.raises(RivalError, match="is a file, not a folder: pass a folder URL with -o"):
        check_output(f"{s3_bucket}/file")
    with output_lock(f"{s3_bucket}/out", 3) as held, output_lock(f"{s3_bucket}/out", 3):
        assert held == f"{s3_bucket}/out" and storage.list_files(held) == []


def test_a_file_rewritten_for_a_changed_row_counts_only_as_the_new_row(tmp_path):
    spec = OutputSpec()
    first, second = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    _write(tmp_path, spec, [(Item("old-key", 0, "cat/a", {"label": "cat"}, (8, 8)), first)])
    _write(tmp_path, spec, [(Item("new-key", 0, "cat/a", {"label": "cat"}, (8, 8)), second)])
    assert open_sink(tmp_path, spec, process=0, overwrite=False, log=print).finished() == {("new-key", 0)}
    assert [r["key"] for r in load_records(tmp_path)] == ["new-key"]
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["key"] == "new-key"


def test_an_image_temporary_is_removed_only_once_no_live_write_can_own_it(tmp_path):
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    live, stale = folder / ".a_v0000.png.x1.tmp", folder / ".b_v0000.png.x2.tmp"
    live.write_bytes(b"another process is writing this")
    stale.write_bytes(b"a killed run left this")
    old = time.time() - 2 * STALE_SECONDS
    os.utime(stale, (old, old))
    open_sink(tmp_path, OutputSpec(), process=1, overwrite=False, log=lambda line: None)
    assert live.is_file() and not stale.exists()
