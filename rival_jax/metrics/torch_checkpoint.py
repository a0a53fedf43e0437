"""Reading a PyTorch state dict (`.pth`/`.pt`) into numpy arrays without torch.

Both of torch.save's formats: the zip archive (`<name>/data.pkl` plus one file per storage, torch >= 1.6)
and the legacy stream (pickled magic number, protocol, system info, the object, storage keys, then
each storage's element count and bytes). The pickle is read with a restricted unpickler: tensors,
parameters and ordered dicts are rebuilt as numpy arrays; any other class is refused, so no code
from the file runs.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rival_jax.errors import RivalError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _Tensor:
    return _Tensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: _Tensor, *_: Any) -> _Tensor:
    return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: BinaryIO, origin: Path) -> None:
        super().__init__(stream)
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise RivalError(
            f"{self.origin} holds a {module}.{name} object, not a plain state dict of tensors: "
            "save model.state_dict(), or convert the weights to .safetensors"
        )

    def persistent_load(self, saved_id: tuple) -> _Storage:
        if saved_id[0] != "storage" or (len(saved_id) > 5 and saved_id[5] is not None):
            raise RivalError(f"{self.origin} uses a storage layout this reader does not know: convert to .safetensors")
        return _Storage(str(saved_id[2]), saved_id[1])


def _materialise(tree: Any, storages: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        return {key: _materialise(value, storages) for key, value in tree.items()}
    if not isinstance(tree, _Tensor):
        return tree
    flat = storages[tree.storage.key]
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[tree.offset :], shape=tree.size, strides=tuple(s * item for s in tree.stride)
    )
    return np.array(view)


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if not pickles:
            raise RivalError(f"{path} is a zip without data.pkl, not a PyTorch checkpoint: check the file")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as stream:
            unpickler = _Unpickler(stream, path)
            tree = unpickler.load()
        keys = {t.storage.key: t.storage.dtype for t in _tensors(tree)}
        storages = {key: np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype) for key, dtype in keys.items()}
    return _materialise(tree, storages)


def _read_legacy(path: Path) -> Any:
    with open(path, "rb") as stream:
        if pickle.load(stream) != LEGACY_MAGIC:
            raise ValueError("not a legacy PyTorch file")
        pickle.load(stream)  # protocol version
        pickle.load(stream)  # system info
        tree = _Unpickler(stream, path).load()
        dtypes = {t.storage.key: t.storage.dtype for t in _tensors(tree)}
        storages = {}
        for key in pickle.load(stream):
            count = int(np.frombuffer(stream.read(8), "<i8")[0])
            dtype = np.dtype(dtypes.get(key, np.uint8))
            storages[key] = np.frombuffer(stream.read(count * dtype.itemsize), dtype)
    return _materialise(tree, storages)


def _tensors(tree: Any) -> list[_Tensor]:
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    return [tree] if isinstance(tree, _Tensor) else []


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict file as numpy arrays, by name; no torch needed.

    A checkpoint that wraps the state dict (e.g. {"state_dict": {...}}) is unwrapped when it holds only one dict.

    >>> weights = read_torch_state_dict("pt_inception-2015-12-05-6726825d.pth")
    >>> weights["Conv2d_1a_3x3.conv.weight"].shape
    (32, 3, 3, 3)
    """
    path = Path(path)
    try:
        tree = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except RivalError:
        raise
    except Exception as error:
        raise RivalError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}): check it") from None
    while isinstance(tree, dict) and len(tree) == 1 and isinstance(next(iter(tree.values())), dict):
        tree = next(iter(tree.values()))
    if not isinstance(tree, dict) or not tree or not all(isinstance(v, np.ndarray) for v in tree.values()):
        raise RivalError(f"{path} is not a state dict of tensors: save model.state_dict() or convert to .safetensors")
    return tree
