"""Augmentation jobs under faults: a full disk, an exemplar deleted mid-job, two runs on one folder, --overwrite.

Each fault leaves no half-written file, is reported, gives exit code 1 (or 2 for the refused run),
and the rerun completes the job.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax import files
from rival_jax.data import storage
from rival_jax.data.records import RecordLog
from rival_jax.data.sources import list_rows
from rival_jax.jobs.augment import run_augment

# Exemplar sizes and settings of tests/test_augment.py, so the compiled programs are shared.
SETTINGS = {"steps": 2, "num_variations": 2}


@pytest.fixture
def job(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    for name, size in (("a.png", (96, 80)), ("b.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "manifest.csv").write_text("image,seed,prompt\na.png,1,a photo of a cat\nb.png,2,\n")
    return tmp_path / "manifest.csv"


def _run(pipe, manifest, output, **kwargs):
    listing = list_rows(manifest, SETTINGS, model="tiny")
    return run_augment(
        pipe, listing.rows, output, batch_size=2, problems=listing.problems, show_progress=False, model="tiny", **kwargs
    )


def _check_folder(output: Path) -> list[dict]:
    """Every image is whole and recorded once, every record names an image, no temporary is left."""
    records = [json.loads(line) for p in output.glob("records-*.jsonl") for line in p.read_text().splitlines()]
    pngs = sorted((output / "images").iterdir())
    assert not [p for p in pngs if p.name.startswith(".")]
    assert sorted(r["file"] for r in records) == [f"images/{p.name}" for p in pngs]
    assert all(files.png_metadata(p) is not None for p in pngs)
    indexed = [json.loads(line)["file_name"] for line in (output / "metadata.jsonl").read_text().splitlines()]
    assert indexed == [f"images/{p.name}" for p in pngs]
    return records


def test_a_full_disk_fails_the_row_writes_nothing_half_and_the_rerun_completes(tiny_pipe, job, tmp_path, monkeypatch):
    output = tmp_path / "out"
    real_write, calls = storage.write_atomic, []

    def disk_fills_on_the_second_image(path, write, binary=True):
        calls.append(path)
        if len(calls) != 2:
            return real_write(path, write, binary)

        def half_then_full(stream):
            stream.write(b"\x89PNG\r\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real_write(path, half_then_full, binary)

    monkeypatch.setattr(storage, "write_atomic", disk_fills_on_the_second_image)
    summary = _run(tiny_pipe, job, output)
    assert (summary.generated, summary.failed_rows, summary.exit_code) == (3, 1, 1)  # images, not rows
    assert summary.problems == [f"row a.png failed: OSError: [Errno 28] {os.strerror(errno.ENOSPC)}"]
    assert len(_check_folder(output)) == 3  # a's first image and b's two
    monkeypatch.setattr(storage, "write_atomic", real_write)
    summary = _run(tiny_pipe, job, output)
    assert (summary.generated, summary.already_done, summary.exit_code) == (1, 3, 0)
    assert len(_check_folder(output)) == 4


def test_a_record_the_disk_cannot_take_is_cut_back_off(tmp_path, monkeypatch):
    log = RecordLog(tmp_path, 0)
    log.append([{"key": "k", "variation_index": 0, "file": "images/x.png"}])
    before = log.path.read_bytes()

    def full(_descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        log.append([{"key": "k", "variation_index": 1, "file": "images/y.png"}])
    assert log.path.read_bytes() == before


def test_an_exemplar_deleted_mid_job_skips_its_row_only(tiny_pipe, job, tmp_path, monkeypatch):
    output, moved = tmp_path / "out", tmp_path / "b.png.away"
    real_append = RecordLog.append

    def delete_b_after_the_first_image(self, records):
        real_append(self, records)
        if records and (job.parent / "b.png").exists():
            (job.parent / "b.png").rename(moved)

    monkeypatch.setattr(RecordLog, "append", delete_b_after_the_first_image)
    summary = _run(tiny_pipe, job, output)
    assert (summary.generated, summary.skipped_rows, summary.exit_code) == (2, 1, 1)
    assert summary.problems == [
        f"row b.png skipped: {job.parent / 'b.png'} cannot be read (No such file or directory): check the path"
    ]
    monkeypatch.setattr(RecordLog, "append", real_append)
    moved.rename(job.parent / "b.png")
    summary = _run(tiny_pipe, job, output)
    assert (summary.generated, summary.already_done, summary.exit_code) == (2, 2, 0)
    assert len(_check_folder(output)) == 4


def test_overwrite_starts_over_and_keeps_files_no_run_recorded(tiny_pipe, job, tmp_path):
    output = tmp_path / "out"
    _run(tiny_pipe, job, output)
    before = {p.name: p.stat().st_mtime_ns for p in (output / "images").iterdir()}
    (output / "images" / "mine.png").write_bytes(b"not recorded")
    summary = _run(tiny_pipe, job, output, overwrite=True)
    assert (summary.generated, summary.already_done) == (4, 0)
    after = {p.name: p.stat().st_mtime_ns for p in (output / "images").iterdir()}
    assert after.keys() == {*before, "mine.png"} and all(after[n] != t for n, t in before.items())
    assert (output / "images" / "mine.png").read_bytes() == b"not recorded"
    assert len([r for p in output.glob("records-*.jsonl") for r in p.read_text().splitlines()]) == 4


def test_ctrl_c_mid_job_prints_one_line_exits_130_and_the_rerun_resumes(capsys, job, tmp_path, tiny_flax, monkeypatch):
    from rival_jax.cli import main

    output, real_write, saved = tmp_path / "out", storage.write_atomic, []

    def interrupted_after_two_images(path, write, binary=True):
        saved.append(path)
        if len(saved) == 3:
            raise KeyboardInterrupt
        return real_write(path, write, binary)

    argv = ["augment", str(job), "-o", str(output), "--model", str(tiny_flax), "--steps", "2", "-n", "2"]
    argv += ["--batch-size", "2", "--no-progress"]
    monkeypatch.setattr(storage, "write_atomic", interrupted_after_two_images)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"rival-jax: interrupted: 2 of 4 images finished in {output}; rerun the same command to resume"
    )
    assert len(_check_folder(output)) == 2 and not list(output.glob(".rival-jax-0*.lock"))
    monkeypatch.setattr(storage, "write_atomic", real_write)
    assert main(argv) == 0
    assert "done: 2 generated" in (err := capsys.readouterr().err) and "2 already done" in err, err
    assert len(_check_folder(output)) == 4


def test_a_second_process_on_the_same_folder_refuses_until_the_first_is_gone(job, tmp_path, tiny_flax, cache_dir):
    from rival_jax.jobs.locks import output_lock

    output = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from rival_jax.jobs.locks import output_lock\n"
            f"with output_lock({str(output)!r}): print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    command = [sys.executable, "-m", "rival_jax", "augment", str(job), "-o", str(output), "--model", str(tiny_flax)]
    env = {**os.environ, "RIVAL_JAX_CACHE": str(cache_dir)}
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 2 and second.stderr.strip() == (
        f"rival-jax: error: output {output} is in use by another rival-jax run (pid {holder.pid}): "
        "wait for it to finish or pass another -o"
    )
    holder.send_signal(signal.SIGKILL)  # its lock file stays behind, naming a dead process
    holder.wait()
    lock = output / ".rival-jax-0000.lock"
    assert lock.read_text() == str(holder.pid)
    with output_lock(output):
        assert lock.read_text() == str(os.getpid())
    assert list(output.iterdir()) == []
