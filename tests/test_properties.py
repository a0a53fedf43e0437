"""Property-based tests: whatever a manifest, config file or mask holds, the answer is a result or one clean error.

No model runs here: readers and validators are called directly, and the CLI is stopped where compute
would begin. Never a traceback (only `RivalError` / exit code 2), never a file left behind.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from rival_jax.data.sources import list_rows
from rival_jax.errors import RivalError
from rival_jax.images import mask_region, open_mask
from rival_jax.jobs.options import GenerateOptions
from rival_jax.jobs.settings import ROW_FIELDS
from rival_jax.options import FIELDS as RUN_OPTION_FIELDS

EXAMPLES = settings(max_examples=40, deadline=None, database=None)
IMAGES = ("a.png", "sp ace ü.png", "dir/b.png")  # existing exemplars; paths with spaces and unicode
COLUMNS = ("image", "prompt", "seed", "num_variations", "t_align", "guidance_scale", "noise_alignment", "mask")
odd_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
cells = st.one_of(
    st.sampled_from([*IMAGES, "", "missing.png", "../a.png", "/abs/none.png", "3", "-1", "true"]), odd_text
)
names = st.one_of(st.sampled_from(COLUMNS), odd_text)


@contextlib.contextmanager
def _folder():
    """A fresh folder holding the exemplars of `IMAGES`, as the current folder."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for image in IMAGES:
            (folder / image).parent.mkdir(exist_ok=True)
            Image.new("RGB", (48, 40), "red").save(folder / image)
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(previous)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def _read(manifest: Path, count: int) -> None:
    """list_rows gives one row or one problem per manifest row, or one RivalError; it writes nothing.

    Rows come sorted by id with unique ids and names; every column but `image` is kept as data, and the
    ones that are not settings are listed once.
    """
    before = _files(manifest.parent)
    try:
        listing = list_rows(manifest, {"steps": 2}, model="tiny")
    except RivalError as error:
        assert "\n" not in str(error)
        return
    finally:
        assert _files(manifest.parent) == before
    rows = listing.rows
    assert len(rows) + len(listing.problems) == count
    ids = [row.id for row in rows]
    assert ids == sorted(set(ids)) and len({row.name for row in rows}) == len(rows)
    assert all(Path(row.entry.image).is_absolute() and row.settings["steps"] == 2 for row in rows)
    assert all("\n" not in problem for problem in listing.problems)
    for row in rows:
        assert "image" not in row.entry.columns
        assert {c for c in row.entry.columns if c not in ROW_FIELDS} <= set(listing.extra_columns)
    assert not set(listing.extra_columns) & {*ROW_FIELDS, "image"}


@EXAMPLES
@given(header=st.lists(names, min_size=1, max_size=5), body=st.lists(st.lists(cells, max_size=6), max_size=5))
def test_any_csv_manifest_reads_as_rows_and_one_line_problems(header, body):
    with _folder() as folder:
        text = io.StringIO()
        csv.writer(text).writerows([header, *body, *body[:1]])  # the first row twice
        manifest = folder / "m.csv"
        manifest.write_text(text.getvalue(), encoding="utf-8")
        records = list(csv.DictReader(io.StringIO(text.getvalue())))
        _read(manifest, len(records))


@EXAMPLES
@given(raw=st.text(alphabet=st.sampled_from('image,prompt"\n\r ü\\a.png;'), max_size=60))
def test_a_csv_with_odd_quoting_is_rows_or_one_error(raw):
    with _folder() as folder:
        manifest = folder / "m.csv"
        manifest.write_text(raw, encoding="utf-8")
        try:
            count = len(list(csv.DictReader(io.StringIO(raw, newline=""))))
        except csv.Error:
            count = -1
        _read(manifest, count) if count >= 0 else _expect_error(manifest)


def _expect_error(manifest: Path) -> None:
    try:
        list_rows(manifest, {}, model="tiny")
    except RivalError:
        return
    raise AssertionError("a CSV the csv module cannot read must be a RivalError")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | cells,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6,
)


@EXAMPLES
@given(lines=st.lists(st.dictionaries(names, json_values, max_size=5) | json_values | odd_text, max_size=6))
def test_any_jsonl_manifest_reads_as_rows_and_one_line_problems(lines):
    with _folder() as folder:
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
        manifest = folder / "m.jsonl"
        manifest.write_text(text, encoding="utf-8")
        _read(manifest, len([line for line in text.splitlines() if line.strip()]))


class ComputeReached(Exception):
    """Raised where a job would start computing: every check before it passed."""


# Job options of generate and augment's own but the multi-host ones (they would start jax.distributed).
JOB_FIELDS = (*(field.name for field in dataclasses.fields(GenerateOptions)), "source", "batch_size")
CONFIG_KEYS = (*JOB_FIELDS, *RUN_OPTION_FIELDS, *ROW_FIELDS, "unknown key", "ü")


@settings(max_examples=60, deadline=None, database=None)
@given(
    values=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4),
    kind=st.sampled_from(["json", "yaml"]),
    command=st.sampled_from(["generate", "augment"]),
)
def test_any_config_file_passes_the_checks_or_is_one_line_with_exit_code_2(values, kind, command):
    from rival_jax.cli import main

    with _folder() as folder:
        config = folder / f"settings.{kind}"
        config.write_text(json.dumps(values) if kind == "json" else yaml.safe_dump(values, allow_unicode=True))
        before = _files(folder)
        target = (
            "rival_jax.jobs.generate.prepare_runtime"
            if command == "generate"
            else "rival_jax.jobs.augment.prepare_runtime"
        )
        stderr = io.StringIO()
        with mock.patch(target, side_effect=ComputeReached), contextlib.redirect_stderr(stderr):
            try:
                code = main(
                    [
                        command,
                        str(folder / IMAGES[0]) if command == "generate" else str(folder),
                        "--config",
                        str(config),
                        "-o",
                        "out",
                    ]
                )
            except ComputeReached:
                code = None
        if code is not None:
            lines = stderr.getvalue().strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("rival-jax: error: "), stderr.getvalue()
        assert _files(folder) == before


MASK_SIZE, GRID = (64, 48), (6, 8)  # (W, H) processed, (h, w) latent grid


@EXAMPLES
@given(
    mask=hnp.arrays(
        dtype=st.sampled_from([np.bool_, np.uint8, np.float32, np.float64, np.int64]),
        shape=st.sampled_from([(48, 64), (6, 8), (48, 64, 3), (48, 64, 1), (64, 48), (6,), (), (2, 6, 8), (47, 64)]),
    )
)
def test_any_mask_array_is_a_region_or_one_error(mask):
    try:
        region = mask_region(mask, (160, 120), MASK_SIZE, GRID)
    except RivalError as error:
        assert "\n" not in str(error)
        return
    assert region.shape == GRID and region.dtype == np.bool_ and region.any()
    if mask.ndim == 2 and mask.dtype in (np.uint8, np.bool_):  # a gray mask as RGB marks the same cells
        assert (mask_region(np.repeat(mask[..., None], 3, -1), (160, 120), MASK_SIZE, GRID) == region).all()


@EXAMPLES
@given(
    mode=st.sampled_from(["1", "L", "LA", "RGB", "RGBA", "I", "F", "P", "I;16"]),
    size=st.sampled_from([(160, 120), (120, 160), (1, 1)]),
    garbage=st.binary(max_size=64) | st.none(),
)
def test_any_mask_file_is_a_mask_or_one_error(mode, size, garbage):
    with _folder() as folder:
        path = folder / "mask.tiff"  # TIFF holds every one of these modes
        if garbage is None:
            Image.new(mode, size, 1).save(path)
        else:
            path.write_bytes(garbage)
        try:
            mask = open_mask(path, (160, 120))
        except RivalError as error:
            assert "\n" not in str(error)
            return
        assert mask.mode == "L" and mask.size == (160, 120)
        mask_region(mask, (160, 120), MASK_SIZE, GRID) if np.asarray(mask).max() >= 128 else None
