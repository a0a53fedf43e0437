"""Throughput at scale: the reference pass split over devices, exemplars batched, the same images either way."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rival_jax.core.parallel import exemplar_rows, spread
from rival_jax.data.sources import list_rows
from rival_jax.jobs.augment import run_augment

from .conftest import eight_devices

STEPS, BATCH = 2, 2
ROWS = [
    {"image": "x.png", "prompt": "a photo of a cat", "num_variations": 3},
    {"image": "y.png", "prompt": "a dog", "negative_prompt": "blue", "num_variations": 2, "seed": 9},
    {"image": "missing.png", "num_variations": 2},
    {"image": "z.png", "prompt": "a photo of a cat", "num_variations": 1},
]

# On 8 host devices: the sharded reference pass against the single-device one, a batch of three
# exemplars against exemplar-by-exemplar generation, then the manifest as a job (exemplar batch: 8).
EIGHT_DEVICES = textwrap.dedent(
    """
    import json, sys, jax, numpy as np
    from rival_jax import RivalPipeline, RunOptions
    from rival_jax.core.reference import reference_pass
    from pathlib import Path
    from rival_jax.data.sources import list_rows
    from rival_jax.jobs.augment import run_augment
    from rival_jax.pipeline import ExemplarGroup, Request
    from rival_jax.models.loading import load_models
    checkpoint, manifest, output, result = sys.argv[1:]
    pipe = RivalPipeline(load_models(checkpoint, np.float32, None), RunOptions(resolution=64))
    rows = [row for row in list_rows(manifest, {"steps": 2}, model="tiny").rows if Path(row.entry.image).is_file()]
    chain = pipe.invert(rows[0].entry.image, rows[0].settings["inversion_prompt"], 2)
    sharded = pipe.reference_pass(chain)
    timesteps = jax.numpy.asarray(chain.timesteps)
    args = (pipe.params["unet"], pipe.models.schedule, chain.latents, pipe.contexts(chain), timesteps)
    single = jax.jit(lambda *a: reference_pass(pipe.models.unet, *a))(*args)
    reference = [float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
                 for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(single))]
    exemplars = [str(row.entry.image) for row in rows]
    chains = pipe.invert_many(exemplars, [row.settings["inversion_prompt"] for row in rows], 2)
    requests = [Request([1, 0], r.settings["seed"], r.settings["prompt"], r.settings["negative_prompt"]) for r in rows]
    group = ExemplarGroup(chains)
    together = pipe.generate_many(group, requests, output_type="latent", batch_size=2, exemplar_count=8)
    alone = [pipe.generate(pipe.invert(e, r.settings["inversion_prompt"], 2), variation_indices=[1, 0], seed=q.seed,
                           prompt=q.prompt, negative_prompt=q.negative_prompt, output_type="latent")
             for e, r, q in zip(exemplars, rows, requests)]
    generation = [float(np.abs(t.latents - a.latents).max() / np.abs(a.latents).max()) for t, a in zip(together, alone)]
    listing = list_rows(manifest, {"steps": 2}, model="tiny")
    summary = run_augment(pipe, listing.rows, output, batch_size=2, problems=listing.problems, show_progress=False)
    json.dump({"devices": pipe.mesh.size, "reference": reference, "generation": generation,
               "summary": [summary.generated, summary.skipped_rows, summary.failed_rows]}, open(result, "w"))
    """
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("batch-job")
    rng = np.random.default_rng(3)
    for name in ("x.png", "y.png", "z.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    return path


def _pipe(tiny_pipe, exemplar_batch: int):
    from rival_jax import RivalPipeline, RunOptions

    return RivalPipeline(tiny_pipe.models, RunOptions(resolution=64, exemplar_batch=exemplar_batch))


def _pixels(output: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((output / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def one_at_a_time(manifest, tiny_pipe, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("one-at-a-time")
    listing = list_rows(manifest, {"steps": STEPS}, model="tiny")
    summary = run_augment(
        _pipe(tiny_pipe, 1), listing.rows, output, BATCH, problems=listing.problems, show_progress=False
    )
    assert (summary.generated, summary.skipped_rows, summary.failed_rows) == (6, 1, 0)
    return output


def test_exemplar_batches_of_two_write_the_same_images_and_resume(manifest, tiny_pipe, one_at_a_time, tmp_path):
    """x and y share a batch, z fills a batch padded to two; then a lost image is redone alone."""
    pipe = _pipe(tiny_pipe, 2)
    listing = list_rows(manifest, {"steps": STEPS}, model="tiny")
    rows = listing.rows
    summary = run_augment(pipe, rows, tmp_path, BATCH, problems=listing.problems, show_progress=False)
    assert (summary.generated, summary.skipped_rows, summary.failed_rows) == (6, 1, 0)
    expected, got = _pixels(one_at_a_time), _pixels(tmp_path)
    assert got.keys() == expected.keys() and len(got) == 6
    assert all(np.abs(got[name] - expected[name]).max() <= 1 for name in got)

    lost = "x_v0001.png"
    (tmp_path / "images" / lost).unlink()
    records = tmp_path / "records-0000.jsonl"
    records.write_text("".join(line + "\n" for line in records.read_text().splitlines() if lost not in line))
    again = run_augment(pipe, rows, tmp_path, BATCH, show_progress=False)
    assert (again.generated, again.already_done) == (1, 5)
    assert np.abs(_pixels(tmp_path)[lost] - expected[lost]).max() <= 1


def test_eight_devices_split_the_reference_pass_and_batch_exemplars_to_the_same_images(
    manifest, tiny_flax, one_at_a_time, tmp_path
):
    env = eight_devices()
    output, result = tmp_path / "out", tmp_path / "result.json"
    command = [sys.executable, "-c", EIGHT_DEVICES, str(tiny_flax), str(manifest), str(output), str(result)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr
    measured = json.loads(result.read_text())
    assert measured["devices"] == 8
    assert max(measured["reference"]) < 1e-5  # float32 rounding of another batch layout
    assert len(measured["generation"]) == 3 and max(measured["generation"]) < 1e-4
    assert measured["summary"] == [6, 1, 0]
    expected, got = _pixels(one_at_a_time), _pixels(output)
    assert got.keys() == expected.keys()
    assert all(np.abs(got[name] - expected[name]).max() <= 1 for name in got)


def test_exemplar_layout_keeps_the_busiest_device_least_loaded():
    """8 devices: one exemplar spreads its variations, eight take a device each, three of 16 share all devices."""
    cases = ((1, 16), (8, 16), (2, 16), (3, 16), (3, 2), (16, 4), (1, 1))
    assert [exemplar_rows(8, e, n) for e, n in cases] == [1, 8, 2, 1, 4, 8, 1]  # one exemplar: never padded
    assert exemplar_rows(1, 5, 3) == 1
    assert spread(6, 8) == (6, 1) and spread(100, 8) == (8, 13) and spread(10, 8) == (5, 2)
