"""Shared fixtures: a private cache folder, tiny checkpoints in both formats, one loaded tiny pipeline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="rival-jax-tests-"))
os.environ["RIVAL_JAX_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu lets one process at a time hold it; the test workers only compile for TPUs, so they may share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# pytest-xdist workers inherit this from the controller: they share compiled programs, not converted weights.
_XLA_CACHE = Path(os.environ.setdefault("RIVAL_JAX_TEST_XLA_CACHE", str(_CACHE / "xla")))

from rival_jax.runtime import enable_compilation_cache  # noqa: E402

enable_compilation_cache(_XLA_CACHE)
# A job keeps its programs in <RIVAL_JAX_CACHE>/xla unless told otherwise, in this process (moving it there)
# or in a subprocess given this cache: that folder is the shared one too.
if _XLA_CACHE != _CACHE / "xla":
    (_CACHE / "xla").symlink_to(_XLA_CACHE, target_is_directory=True)
    enable_compilation_cache(_CACHE / "xla")


def eight_devices() -> dict[str, str]:
    """The environment of a subprocess with 8 host devices and this session's XLA flags, offline."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    return {"XLA_FLAGS": flags, "PATH": "", "HF_HUB_OFFLINE": "1"}


# The authors' outputs on a tiny checkpoint, kept in the repository (tests/data/parity/README.md).
PARITY = Path(__file__).resolve().parent / "data" / "parity"


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return _CACHE


@pytest.fixture
def fresh_programs() -> None:
    """No compiled program in the process's shared store: a test of what compiling shows compiles."""
    from rival_jax.pipeline.compiled import Executables

    Executables.forget_shared()


@pytest.fixture(scope="session")
def tiny_flax(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rival_jax.models.random_models import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-flax"), seed=0, weight_format="flax")


@pytest.fixture(scope="session")
def tiny_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rival_jax.models.random_models import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-st"), seed=0, weight_format="safetensors")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_flax: Path):
    from rival_jax import RivalPipeline

    return RivalPipeline.from_pretrained(tiny_flax, cache_dir=None)


@pytest.fixture(scope="session")
def exemplar():
    import numpy as np

    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 160, dtype=np.float32)
    image = np.stack(
        [np.add.outer(base[:120] * 0.5, base * 0.5), np.tile(base, (120, 1)), rng.uniform(0, 255, (120, 160))], -1
    )
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_chain(tiny_pipe, exemplar):
    return tiny_pipe.invert(exemplar, prompt="a photo of a cat", num_inference_steps=6)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rival_jax.models.random_models import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd2"), seed=0, family="sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rival_jax.models.random_models import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, family="sdxl")


@pytest.fixture(scope="session")
def family_pipes(tiny_pipe, tiny_sd2: Path, tiny_sdxl: Path) -> dict:
    """One loaded tiny pipeline per family."""
    from rival_jax import RivalPipeline

    return {
        "sd1": tiny_pipe,
        "sd2": RivalPipeline.from_pretrained(tiny_sd2, cache_dir=None),
        "sdxl": RivalPipeline.from_pretrained(tiny_sdxl, cache_dir=None),
    }


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_flax: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ControlNet for the tiny SD 1 model, its residuals non-zero."""
    from rival_jax.models.random_controlnet import write_tiny_controlnet

    return write_tiny_controlnet(tmp_path_factory.mktemp("controlnet"), tiny_flax, seed=1)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto) on 127.0.0.1, with fsspec's s3:// pointed at it; stopped after the session."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in credentials}
    os.environ.update(credentials)
    fsspec.config.conf["s3"] = {"endpoint_url": f"http://{host}:{port}"}
    yield f"http://{host}:{port}"
    fsspec.config.conf.pop("s3", None)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh empty bucket on the local S3 server, as an s3:// URL."""
    import s3fs

    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
