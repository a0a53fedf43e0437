"""FID's InceptionV3 in Flax: the 2048-d pool3 features KID (and FID) are computed on.

The architecture is pytorch-fid's port of the TensorFlow FID graph (its FIDInceptionA/C/E blocks: average
pools that exclude padding, a max pool in the last block), with the PyTorch module names, so the standard
weights file `pt_inception-2015-12-05-6726825d.pth` loads by name (read without torch) as do a
`.safetensors` or `.npz` holding the same names. Images of any size are resized to 299x299 (bilinear, no
antialiasing) and scaled to [-1, 1], as pytorch-fid does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rival_jax.errors import RivalError
from rival_jax.metrics.batched import run_batched
from rival_jax.models.checkpoints import _check_against_layout, _transformers_rename, convert_pytorch_state_dict

SIZE = 299
FEATURES = 2048
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


class BatchNorm(nn.Module):
    """Inference batch norm whose statistics are params (PyTorch's running_mean/running_var)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1],)
        scale, bias = self.param("scale", nn.initializers.ones, shape), self.param("bias", nn.initializers.zeros, shape)
        mean, var = self.param("mean", nn.initializers.zeros, shape), self.param("var", nn.initializers.ones, shape)
        return (x - mean) * scale * jax.lax.rsqrt(var + 1e-3) + bias


class ConvBN(nn.Module):
    """torchvision's BasicConv2d: convolution without bias, batch norm, ReLU."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = [(p, p) for p in self.padding]
        x = nn.Conv(self.features, self.kernel, self.stride, padding=pad, use_bias=False, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _avg_pool(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, padding: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((padding, padding), (padding, padding)))


def _to_input_size(images: jax.Array) -> jax.Array:
    """(..., H, W, 3) -> (..., 299, 299, 3), as pytorch-fid resizes (an exact copy when already that size)."""
    return jax.image.resize(images, (*images.shape[:-3], SIZE, SIZE, images.shape[-1]), "bilinear", antialias=False)


def _chain(x: jax.Array, *layers: nn.Module) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(
            [
                ConvBN(64, name="branch1x1")(x),
                _chain(x, ConvBN(48, name="branch5x5_1"), ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")),
                _chain(
                    x,
                    ConvBN(64, name="branch3x3dbl_1"),
                    ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2"),
                    ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3"),
                ),
                ConvBN(self.pool_features, name="branch_pool")(_avg_pool(x)),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(
            [
                ConvBN(384, (3, 3), stride=2, name="branch3x3")(x),
                _chain(
                    x,
                    ConvBN(64, name="branch3x3dbl_1"),
                    ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2"),
                    ConvBN(96, (3, 3), stride=2, name="branch3x3dbl_3"),
                ),
                _max_pool(x),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        row, column = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        return jnp.concatenate(
            [
                ConvBN(192, name="branch1x1")(x),
                _chain(
                    x,
                    ConvBN(c, name="branch7x7_1"),
                    ConvBN(c, **row, name="branch7x7_2"),
                    ConvBN(192, **column, name="branch7x7_3"),
                ),
                _chain(
                    x,
                    ConvBN(c, name="branch7x7dbl_1"),
                    ConvBN(c, **column, name="branch7x7dbl_2"),
                    ConvBN(c, **row, name="branch7x7dbl_3"),
                    ConvBN(c, **column, name="branch7x7dbl_4"),
                    ConvBN(192, **row, name="branch7x7dbl_5"),
                ),
                ConvBN(192, name="branch_pool")(_avg_pool(x)),
            ],
            axis=-1,
        )


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(
            [
                _chain(x, ConvBN(192, name="branch3x3_1"), ConvBN(320, (3, 3), stride=2, name="branch3x3_2")),
                _chain(
                    x,
                    ConvBN(192, name="branch7x7x3_1"),
                    ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2"),
                    ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3"),
                    ConvBN(192, (3, 3), stride=2, name="branch7x7x3_4"),
                ),
                _max_pool(x),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    """FID's InceptionE: average pool excluding padding (Mixed_7b) or max pool (Mixed_7c) on the pool branch."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, column = {"kernel": (1, 3), "padding": (0, 1)}, {"kernel": (3, 1), "padding": (1, 0)}
        branch3x3 = ConvBN(384, name="branch3x3_1")(x)
        double = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(ConvBN(448, name="branch3x3dbl_1")(x))
        pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return jnp.concatenate(
            [
                ConvBN(320, name="branch1x1")(x),
                ConvBN(384, **row, name="branch3x3_2a")(branch3x3),
                ConvBN(384, **column, name="branch3x3_2b")(branch3x3),
                ConvBN(384, **row, name="branch3x3dbl_3a")(double),
                ConvBN(384, **column, name="branch3x3dbl_3b")(double),
                ConvBN(192, name="branch_pool")(pooled),
            ],
            axis=-1,
        )


class FIDInceptionV3(nn.Module):
    """(N, H, W, 3) images in [0, 1] -> (N, 2048) pool3 features."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = 2.0 * _to_input_size(images) - 1.0
        x = ConvBN(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _max_pool(ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x))
        x = ConvBN(80, name="Conv2d_3b_1x1")(x)
        x = _max_pool(ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x))
        x = _chain(
            x,
            InceptionA(32, name="Mixed_5b"),
            InceptionA(64, name="Mixed_5c"),
            InceptionA(64, name="Mixed_5d"),
            InceptionB(name="Mixed_6a"),
            *(InceptionC(c, name=f"Mixed_6{n}") for c, n in ((128, "b"), (160, "c"), (160, "d"), (192, "e"))),
            InceptionD(name="Mixed_7a"),
            InceptionE(name="Mixed_7b"),
            InceptionE(max_pool=True, name="Mixed_7c"),
        )
        return jnp.mean(x, axis=(1, 2))


def inception_layout() -> dict:
    """The abstract params tree of `FIDInceptionV3` (shapes only, nothing computed)."""
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]


def check_inception_file(path: str | Path) -> Path:
    """The weights file, checked to exist and to have a known suffix (before anything is computed)."""
    path = Path(path)
    if not path.is_file():
        raise RivalError(
            f"Inception weights {path} do not exist: download pt_inception-2015-12-05-6726825d.pth "
            "(pytorch-fid's release) and pass it to --inception"
        )
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise RivalError(f"Inception weights {path} must be {', '.join(WEIGHT_SUFFIXES)}: pass FID's .pth file")
    return path


def load_inception(path: str | Path) -> dict:
    """FID Inception params from a PyTorch state dict file (.pth/.pt, read without torch), .safetensors or .npz.

    >>> params = load_inception("pt_inception-2015-12-05-6726825d.pth")
    >>> inception_features(params, pictures).shape
    (len(pictures), 2048)
    """
    path = check_inception_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(str(path))
    elif suffix == ".npz":
        with np.load(path) as archive:
            state = dict(archive)
    else:
        from rival_jax.metrics.torch_checkpoint import read_torch_state_dict

        state = read_torch_state_dict(path)
    shapes = inception_layout()
    rename = functools.partial(_transformers_rename, prefix="")
    return _check_against_layout(convert_pytorch_state_dict(state, shapes, rename), shapes, path)


@functools.cache
def _program():
    return jax.jit(lambda params, images: FIDInceptionV3().apply({"params": params}, images))


@functools.cache
def _resize_program():
    return jax.jit(_to_input_size)


def inception_features(params: dict, pictures: list[Image.Image]) -> np.ndarray:
    """(N, 2048) pool3 features of RGB images of any sizes, each resized to 299x299, in fixed-size batches."""
    resize = _resize_program()
    pixels = np.stack([np.asarray(resize(np.asarray(p.convert("RGB"), np.float32) / 255.0)) for p in pictures])
    return run_batched(_program(), params, pixels)
