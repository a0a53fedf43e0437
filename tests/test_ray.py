"""Augmentation on Ray Data, on a local two-CPU Ray cluster and the tiny model: the same images as the local
engine, a killed actor's rows redone once, resume, bad addresses, and `RivalVariations` in a Ray user's pipeline."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from rival_jax.cli import main  # noqa: E402
from rival_jax.jobs.ray_engine import FAULT, RivalVariations  # noqa: E402

SIDE = 64
SETTINGS = ["--steps", "2", "-n", "2", "--batch-size", "1", "--no-progress"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray of two CPUs on 127.0.0.1 for this module; its workers see the fault switch (`FAULT`)."""
    switch = tmp_path_factory.mktemp("fault") / "armed"
    os.environ[FAULT] = str(switch)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield switch
    ray.shutdown()
    os.environ.pop(FAULT)


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    """An ImageFolder of two classes, four exemplars (one grayscale: converted to RGB)."""
    root = tmp_path_factory.mktemp("train")
    for seed, name in enumerate(("cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert("L" if name == "cat/b.png" else "RGB").save(root / name)
    return root


@pytest.fixture(scope="module")
def job(tiny_flax) -> list[str]:
    """The flags of every run here: the tiny model and the tests' compilation cache (shared with the actors)."""
    return ["--model", str(tiny_flax), "--compile-cache", os.environ["RIVAL_JAX_TEST_XLA_CACHE"], *SETTINGS]


@pytest.fixture(scope="module")
def local(train, job, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("local") / "out"
    assert main(["augment", str(train), "-o", str(output), *job]) == 0
    return output


def _pixels(output: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(output)): np.asarray(Image.open(p)) for p in sorted((output / "images").rglob("*.png"))}


def _index(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metadata.jsonl").read_text().splitlines()]


def _ray(train: Path, output: Path, job: list[str], *flags: str, workers: int = 2) -> int:
    return main(["augment", str(train), "-o", str(output), *job, "--engine", "ray", "--workers", str(workers), *flags])


def test_ray_engine_makes_the_local_images_once_though_an_actor_is_killed(cluster, train, job, local, tmp_path, capfd):
    cluster.touch()  # the first actor to commit an image dies right after it; Ray retries its batch
    output = tmp_path / "out"
    assert _ray(train, output, job, workers=1) == 0  # one actor: its restart redoes the batch
    assert not cluster.exists()
    expected, made = _pixels(local), _pixels(output)
    assert sorted(made) == sorted(expected) and len(made) == 8
    for name, pixels in expected.items():
        np.testing.assert_array_equal(made[name], pixels, err_msg=name)
    assert _index(output) == _index(local)  # every image once, with the local engine's metadata
    records = [json.loads(line) for p in output.glob("records-*.jsonl") for line in p.read_text().splitlines()]
    assert len(records) == 8 and len({r["file"] for r in records}) == 8  # nothing written twice
    assert not (output / "records-0000.jsonl").exists()  # the actors' sinks wrote, the driver's none
    err = capfd.readouterr().err
    assert "1 exemplars were converted to RGB" in err
    assert "7 generated" in err and "1 already done" in err  # the retried batch skipped the dead actor's image

    assert _ray(train, output, job) == 0  # resumed: every row is finished, no actor starts
    err = capfd.readouterr().err
    assert "ray: 0 of 4 rows to do" in err and "0 generated" in err and "8 already done" in err
    assert _pixels(output).keys() == expected.keys() and _index(output) == _index(local)


def test_a_bad_ray_address_is_one_line_and_exit_2(cluster, train, job, tmp_path, capfd):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for address, says in (("not an address", "is not a Ray address"), (f"127.0.0.1:{port}", "no Ray cluster answers")):
        assert _ray(train, tmp_path / "out", job, "--address", address) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert main(["augment", str(train), "--workers", "2"]) == 2
    assert "--address and --workers are for the Ray engine" in capfd.readouterr().err


def test_rival_variations_in_a_ray_data_pipeline_gives_the_local_images(cluster, train, tiny_flax, local, tmp_path):
    from rival_jax.data.sinks import OutputSpec

    kwargs = {
        "model": str(tiny_flax),
        "settings": {"steps": 2, "num_variations": 2},
        "batch_size": 1,
        "root": str(train),
        "spec": OutputSpec(image_format="png"),
        "compile_cache": os.environ["RIVAL_JAX_TEST_XLA_CACHE"],
    }
    images = ray.data.read_images(str(train), include_paths=True, mode="RGB")
    variations = images.map_batches(
        RivalVariations, fn_constructor_kwargs=kwargs, batch_size=2, compute=ray.data.ActorPoolStrategy(size=1)
    )
    variations.write_parquet(str(tmp_path / "parquet"))
    rows = ray.data.read_parquet(str(tmp_path / "parquet")).take_all()
    names = [f"{name}_v000{i}" for name in ("cat/a", "cat/b", "dog/c", "dog/d") for i in (0, 1)]
    assert sorted(row["name"] for row in rows) == names
    expected = _pixels(local)
    for row in rows:
        pixels = np.asarray(Image.open(io.BytesIO(row["image"])))
        np.testing.assert_array_equal(pixels, expected[f"images/{row['name']}.png"], err_msg=row["name"])
        assert json.loads(row["metadata"])["label"] == row["name"].split("/")[0]
