"""Augmentation jobs: manifests, bad rows, resuming after a kill, and two hosts via jax.distributed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax.data.sources import derive_seed, list_rows
from rival_jax.errors import RivalError
from rival_jax.jobs.augment import run_augment

JOB = ["--steps", "2", "--batch-size", "2", "--no-progress"]  # programs kept in the session's cache (conftest)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("job")
    rng = np.random.default_rng(1)
    for name, size in (("a.png", (96, 80)), ("b.jpg", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    (folder / "gray.png").write_bytes((folder / "a.png").read_bytes())
    Image.new("L", (40, 40)).save(folder / "gray.png")
    rows = [
        {"image": "a.png", "prompt": "a photo of a cat", "num_variations": 3, "t_align": 500},
        {"image": "missing.png", "num_variations": 2},
        {"image": "b.jpg", "num_variations": 4, "seed": 7, "negative_prompt": "blue"},
        {"image": "a.png", "num_variations": 2, "guidance_scale": "loud"},
        {"image": "gray.png", "num_variations": 1},
    ]
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def _rows(manifest, defaults=None):
    listing = list_rows(manifest, defaults or {"steps": 2}, model="tiny")
    return listing.rows, listing.problems


def _images(rows) -> list[Path]:
    return [Path(row.entry.image) for row in rows]


def test_manifest_rows_and_problems(manifest, tmp_path):
    rows, problems = _rows(manifest)
    assert [row.id for row in rows] == ["a.png", "b.jpg", "gray.png", "missing.png"]
    assert problems == ["row a.png skipped: guidance_scale='loud' is not a number"]
    first, second, _, missing = rows
    assert first.settings["t_align"] == 500 and first.settings["inversion_prompt"] == "a photo of a cat"
    assert first.settings["seed"] == derive_seed(0, "a.png") and second.settings["seed"] == 7
    assert missing.settings["seed"] == derive_seed(0, "missing.png")
    csv = tmp_path / "m.csv"
    csv.write_text(f"image,num_variations,noise_alignment\n{manifest.parent / 'a.png'},2,false\n,1,\n")
    csv_rows, csv_problems = _rows(csv, {})
    assert csv_rows[0].settings["noise_alignment"] is False and csv_rows[0].settings["num_variations"] == 2
    assert len(csv_problems) == 1 and "no image" in csv_problems[0]


def _run(pipe, manifest, output, **kwargs):
    rows, problems = _rows(manifest)
    return run_augment(pipe, rows, output, batch_size=2, problems=problems, show_progress=False, model="tiny", **kwargs)


@pytest.fixture(scope="module")
def single_run(manifest, tiny_pipe, tmp_path_factory):
    output = tmp_path_factory.mktemp("single")
    return output, _run(tiny_pipe, manifest, output)


def _records(output: Path) -> list[dict]:
    lines = [line for path in sorted(output.glob("records-*.jsonl")) for line in path.read_text().splitlines()]
    return [json.loads(line) for line in lines]


def _pixels(output: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((output / "images").iterdir())}


def test_single_run_outputs_and_summary(single_run):
    output, summary = single_run
    assert (summary.generated, summary.already_done, summary.skipped_rows, summary.failed_rows) == (8, 0, 2, 0)
    assert len(summary.problems) == 2 and any("missing.png" in p for p in summary.problems)
    assert summary.converted == 1  # gray.png
    names = sorted(_pixels(output))
    expected = [f"a_v000{i}.png" for i in range(3)] + [f"b_v000{i}.png" for i in range(4)] + ["gray_v0000.png"]
    assert names == expected
    records = _records(output)
    assert sorted(r["file"] for r in records) == [f"images/{n}" for n in names]
    assert all(r["metadata"]["settings"]["steps"] == 2 for r in records)
    assert all(r["metadata"]["random_weights"] is True for r in records)  # the tiny model: evaluate warns of it
    assert 0 < summary.compile_seconds < summary.seconds and summary.exit_code == 1
    rate = summary.generated / (summary.seconds - summary.compile_seconds)
    assert f"8 generated ({rate:.2f} img/s, compile {summary.compile_seconds:.1f} s excluded)" in summary.line()


@pytest.mark.parametrize(
    ("rows", "output", "code", "last_line"),
    [
        ([{"image": "gone.png"}, {"image": "b.jpg", "guidance_scale": "loud"}], "out", 1, "rows skipped: 2"),
        ([{"image": "a.png"}], "taken", 2, "rival-jax: error: output {taken} is a file, not a folder"),
    ],
)
def test_augment_exit_codes_tell_bad_input_from_rows_not_done(
    capsys, tmp_path, manifest, tiny_flax, rows, output, code, last_line
):
    from rival_jax.cli import main

    source = manifest.parent / f"exit-{code}.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "taken").write_text("a file")
    argv = ["augment", str(source), "-o", str(tmp_path / output), "--model", str(tiny_flax), *JOB]
    assert main(argv) == code
    assert last_line.format(taken=tmp_path / "taken") in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-processes", "2", "--process-id", "1"], "--num-processes and --process-id need --coordinator"),
        (["--process-id", "0"], "--process-id needs --coordinator HOST:PORT (or --distributed)"),
    ],
)
def test_multi_host_flags_without_a_coordinator_are_refused_before_loading(capsys, tmp_path, manifest, extra, message):
    from rival_jax.cli import main

    argv = ["augment", str(manifest), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), *extra]
    assert main([*argv, *JOB]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rival-jax: error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def _cli(manifest, output, *extra):
    return [sys.executable, "-m", "rival_jax.cli", "augment", str(manifest), "-o", str(output), *JOB, *extra]


def _env(cache_dir):
    return {**os.environ, "RIVAL_JAX_CACHE": str(cache_dir)}


def test_killed_job_resumes_without_loss_duplicates_or_rework(manifest, tiny_flax, single_run, tmp_path, cache_dir):
    output = tmp_path / "out"
    command = _cli(manifest, output, "--model", str(tiny_flax))  # single_run's batches: its programs, cached
    process = subprocess.Popen(command, env=_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(_records(output) if output.exists() else []) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in (output / "images").glob("*.png")}
    assert 3 <= len(before) < 8

    result = subprocess.run(command, env=_env(cache_dir), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 1, result.stderr  # the manifest's bad rows are skipped
    summary = result.stderr.strip().splitlines()[-1]
    assert f"{8 - len(before)} generated" in summary and f"{len(before)} already done" in summary
    after = {p.name: p.stat().st_mtime_ns for p in (output / "images").glob("*.png")}
    assert all(after[name] == stamp for name, stamp in before.items())
    assert not list((output / "images").glob(".*"))
    records = _records(output)
    assert len(records) == 8 and len({(r["key"], r["variation_index"]) for r in records}) == 8
    expected = _pixels(single_run[0])
    got = _pixels(output)
    assert got.keys() == expected.keys()
    assert all(np.abs(got[k].astype(int) - expected[k]).max() <= 1 for k in got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_match_one(manifest, tiny_flax, single_run, tmp_path, cache_dir):
    output = tmp_path / "shared-out"
    port = _free_port()
    processes = [
        subprocess.Popen(
            _cli(
                manifest,
                output,
                "--model",
                str(tiny_flax),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(k),
            ),
            env=_env(cache_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    logs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [1, 1], logs  # each meets a bad row of the manifest in its share
    assert sorted(p.name for p in output.glob("records-*.jsonl")) == ["records-0000.jsonl", "records-0001.jsonl"]
    assert all(_records(output)) and len(_records(output)) == 8
    expected, got = _pixels(single_run[0]), _pixels(output)
    assert got.keys() == expected.keys()
    assert all(np.abs(got[k].astype(int) - expected[k]).max() <= 1 for k in got)


def test_manifest_rows_carry_their_control_maps(tmp_path, tiny_flax, tiny_controlnet):
    from rival_jax import RivalPipeline

    rng = np.random.default_rng(2)
    for name in ("p.png", "q.png"):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / name)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "p-edges.png")
    (tmp_path / "m.csv").write_text(
        "id,image,control_image,control_scale\np,p.png,p-edges.png,0.5\nq,q.png,canny,\nq-bad,q.png,missing-edges.png,\n"
    )
    rows, problems = _rows(tmp_path / "m.csv", {"steps": 2, "num_variations": 1})
    assert problems == [] and rows[0].settings["control_image"] == [str(tmp_path / "p-edges.png")]
    assert rows[0].settings["control_scale"] == 0.5 and rows[1].settings["control_image"] == ["canny"]
    pipe = RivalPipeline.from_pretrained(tiny_flax, cache_dir=None, controlnet=tiny_controlnet)
    output = tmp_path / "out"
    summary = run_augment(pipe, rows, output, batch_size=1, show_progress=False, model="tiny")
    assert (summary.generated, summary.skipped_rows) == (2, 1)
    assert "missing-edges.png does not exist" in summary.problems[0]
    assert {r["metadata"]["settings"]["control_scale"] for r in _records(output)} == {0.5, 1.0}


def test_a_relative_image_folder_is_read_once_not_joined_twice(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "apple.png")
    monkeypatch.chdir(tmp_path)
    rows, problems = _rows("src", {})
    assert problems == [] and [image.resolve() for image in _images(rows)] == [folder.resolve() / "apple.png"]
    assert _images(rows)[0].is_file()


@pytest.fixture
def path_layout(tmp_path, monkeypatch):
    """data/set/{a.png, manifest.csv}, data/other/b.png, a link to data/set, a link to the manifest; cwd = work/."""
    data = tmp_path / "data"
    (data / "set").mkdir(parents=True)
    (data / "other").mkdir()
    for path in (data / "set" / "a.png", data / "other" / "b.png"):
        Image.new("RGB", (48, 40)).save(path)
    (data / "set" / "manifest.csv").write_text(
        f"id,image,mask\n1,a.png,\n2,./a.png,\n3,../other/b.png,\n4,{data / 'other' / 'b.png'},\n"
    )
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "set-link").symlink_to(data / "set")
    (tmp_path / "work" / "manifest-link.csv").symlink_to(data / "set" / "manifest.csv")
    monkeypatch.chdir(tmp_path / "work")
    return data


@pytest.mark.parametrize(
    "source",
    [
        "../data/set/manifest.csv",
        "./set-link/manifest.csv",
        "manifest-link.csv",
        "set-link/../set/manifest.csv",  # ".." after a link: the link target's parent, as open() sees it
        "ABSOLUTE",
    ],
)
def test_manifest_paths_are_relative_to_the_manifests_folder_whatever_the_manifest_path(path_layout, source):
    source = path_layout / "set" / "manifest.csv" if source == "ABSOLUTE" else source
    rows, problems = _rows(source, {})
    assert problems == []
    assert [image.resolve() for image in _images(rows)] == [
        (path_layout / p).resolve() for p in ("set/a.png", "set/a.png", "other/b.png", "other/b.png")
    ]
    assert all(image.is_absolute() and image.is_file() for image in _images(rows))


@pytest.mark.parametrize("folder", ["../data/set", "./set-link", "set-link/", "ABSOLUTE"])
def test_image_folders_are_relative_to_the_current_folder(path_layout, folder):
    folder = path_layout / "set" if folder == "ABSOLUTE" else folder
    rows, problems = _rows(folder, {})
    assert problems == [] and [image.resolve() for image in _images(rows)] == [
        (path_layout / "set" / "a.png").resolve()
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [("image,prompt\n", "has no rows"), ("", "no 'image' column"), ("image\n\xff\n", "UTF-8")],
)
def test_an_empty_or_unreadable_manifest_is_bad_input(tmp_path, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content.encode("latin-1"))
    with pytest.raises(RivalError, match=message):
        _rows(manifest, {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RivalError, match="has no rows"):
        _rows(tmp_path / "empty", {})


def test_manifest_rows_override_the_command_line(tmp_path):
    from rival_jax.cli import build_parser, layer_options
    from rival_jax.jobs.options import AugmentOptions

    Image.new("RGB", (48, 40)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "edited", "image": "a.png", "t_align": 300, "task": "edit"})
        + "\n"
        + json.dumps({"id": "plain", "image": "a.png"})
        + "\n"
    )
    arguments = vars(build_parser().parse_args(["augment", str(tmp_path / "m.jsonl"), "--t-align", "500", "-n", "3"]))
    arguments.pop("command")
    _, _, cli_row = layer_options(AugmentOptions, arguments)
    rows, problems = _rows(tmp_path / "m.jsonl", cli_row)
    assert problems == []
    edited, plain = (row.settings for row in rows)
    assert (edited["t_align"], plain["t_align"]) == (300, 500)
    assert edited["num_variations"] == plain["num_variations"] == 3
    assert (edited["latent_init"], edited["editing_start"]) == ("exemplar", 901)
    assert (plain["latent_init"], plain["editing_start"]) == ("shuffle", 1000)
