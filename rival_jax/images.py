"""Images at the edges: reading exemplars, masks and control maps, their geometry, grids."""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rival_jax.errors import RivalError

# The processed exemplar fills at least this share of the model's pixel budget.
MIN_FILL = 0.7
# Exemplars below this shorter side, or (when their aspect ratio is kept) longer than MAX_ASPECT:1, are refused:
# they would be blown up or squeezed into a shape far from any the models were trained on.
MIN_SIDE = 32
MAX_ASPECT = 4.0


def example_image() -> Path:
    """The photograph shipped with the package: the CLI's default exemplar, for trying the API.

    >>> pipe = rival_jax.RivalPipeline.from_pretrained("tiny")
    >>> chain = pipe.invert(rival_jax.example_image(), num_inference_steps=10)
    """
    return Path(str(resources.files("rival_jax") / "assets" / "exemplar.png"))


def open_image(path: str | os.PathLike, what: str = "exemplar") -> Image.Image:
    """Open an image file fully, with one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise RivalError(f"{what} {path} does not exist: check the path")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as error:
        raise RivalError(f"{what} {path} is not a readable image ({type(error).__name__}): use a PNG or JPEG") from None


def as_rgb(image: Image.Image, name: str = "exemplar") -> Image.Image:
    """RIVAL needs 3-channel colour: palette images are expanded, anything else is refused."""
    if image.mode == "P" and "transparency" not in image.info:
        image = image.convert("RGB")
    if image.mode != "RGB":
        kind = {"L": "grayscale", "1": "black-and-white", "LA": "grayscale+alpha", "RGBA": "RGBA", "P": "RGBA"}
        raise RivalError(
            f"{name} is {kind.get(image.mode, image.mode)} ({image.mode}): RIVAL needs an RGB image, "
            "convert it first (e.g. PIL's image.convert('RGB'))"
        )
    return image


def check_exemplar_size(
    image_size: tuple[int, int], size: int | tuple[int, int] | None, square: bool, name: str = "exemplar"
) -> None:
    """Refuse an exemplar smaller than `MIN_SIDE` or, when its aspect ratio is kept, beyond `MAX_ASPECT`:1.

    With `square` or an exact (W, H) `size` the exemplar is centre-cropped, so only its size matters.
    """
    width, height = image_size
    problems = []
    if not isinstance(size, tuple) and not square and max(width, height) > MAX_ASPECT * min(width, height):
        problems.append(
            f"its aspect ratio {max(width, height) / min(width, height):.1f}:1 is beyond {MAX_ASPECT:g}:1 "
            "(crop it, or centre-crop with --square-crop or --resolution WxH)"
        )
    if min(width, height) < MIN_SIDE:
        problems.append(f"its shorter side is under {MIN_SIDE} px (use a larger image)")
    if problems:
        raise RivalError(f"{name} is {width}x{height}: {'; '.join(problems)}")


def target_size(
    image_size: tuple[int, int], size: int | tuple[int, int] | None, default_side: int, multiple: int, square: bool
) -> tuple[int, int]:
    """(W, H) the exemplar is processed at (docs/method.md, "Geometry").

    `size` None or W is a pixel budget (default_side^2 or W^2) and sides are multiples of `multiple`:
    of the sizes that fill at least `MIN_FILL` of the budget without exceeding it, the one nearest
    to the image's aspect ratio (1:1 with `square`), the larger on a tie. (W, H) is taken as is.
    Exemplars outside `check_exemplar_size`'s limits are refused.
    """
    check_exemplar_size(image_size, size, square)
    if isinstance(size, tuple):
        width, height = size
        if width % multiple or height % multiple:
            raise RivalError(
                f"resolution {width}x{height} is not supported: use sides that are multiples of {multiple}"
            )
        return width, height
    budget = (size or default_side) ** 2
    aspect = 1.0 if square else image_size[0] / image_size[1]
    sides = range(multiple, budget // multiple + 1, multiple)
    fitting = [(w, h) for h in sides for w in sides if w * h <= budget] or [(multiple, multiple)]
    largest = max(w * h for w, h in fitting)
    candidates = [(w, h) for w, h in fitting if w * h >= MIN_FILL * largest]
    return min(candidates, key=lambda c: (round(abs(float(np.log(c[0] / c[1] / aspect))), 6), -c[0] * c[1]))


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop to the aspect ratio of `size` (W, H) and resize to it; masks go through the same."""
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def rgb_image(image: Any) -> Image.Image:
    """A path, PIL image or uint8 (H, W, 3) array as an RGB PIL image, with one-line errors."""
    if isinstance(image, (str, os.PathLike)):
        return as_rgb(open_image(image), f"exemplar {image}")
    if isinstance(image, Image.Image):
        return as_rgb(image)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise RivalError(
            f"exemplar array has shape {array.shape} and dtype {array.dtype}: "
            "pass uint8 (H, W, 3) RGB, a PIL image or a path"
        )
    return Image.fromarray(array)


def open_mask(path: str | os.PathLike, exemplar_size: tuple[int, int]) -> Image.Image:
    """Read a mask drawn on the exemplar (white = regenerate) as grayscale; it must match the exemplar's size.

    The pipeline crops and resizes it with `fit`, like the exemplar.
    """
    image = open_image(path, "mask")
    if image.size != exemplar_size:
        raise RivalError(
            f"mask {path} is {image.size[0]}x{image.size[1]} but the exemplar is "
            f"{exemplar_size[0]}x{exemplar_size[1]}: draw the mask at the exemplar's size"
        )
    return image.convert("L")


def mask_region(mask: Any, source_size: tuple[int, int], size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """A mask (white/True/1 = regenerate) to a boolean latent-grid region (h, w).

    A PIL mask is at the exemplar's original size `source_size` (W, H) and goes through `fit` like
    the exemplar; an array is at the processed size `size` (W, H) or at the latent `grid` (h, w).
    """
    if isinstance(mask, Image.Image):
        if mask.size != tuple(source_size):
            raise RivalError(
                f"mask is {mask.size[0]}x{mask.size[1]} but the exemplar is {source_size[0]}x{source_size[1]}: "
                "draw the mask at the exemplar's size"
            )
        mask = fit(mask.convert("L"), tuple(size))
    array = np.asarray(mask)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise RivalError("mask has values that are not finite numbers: use 0/1, booleans or uint8 0..255")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    if array.ndim == 3:
        array = array.astype(np.float64).mean(axis=-1)
    height, width = grid
    if array.shape not in ((size[1], size[0]), (height, width)):
        raise RivalError(
            f"mask has shape {array.shape}: use {size[1]}x{size[0]} (rows x columns, the exemplar after "
            f"resizing), {height}x{width} (the latent grid), or a PIL image at the exemplar's size"
        )
    values = array.astype(np.float64) / scale
    factor = array.shape[0] // height
    pooled = values.reshape(height, factor, width, factor).mean(axis=(1, 3))
    region = pooled >= 0.5
    if not region.any():
        raise RivalError("mask marks no region to regenerate: paint the area to repaint white")
    return region


def control_array(image: Any, source_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A ControlNet conditioning map (path, PIL image or uint8 array) as (H, W, 3) uint8 at the processed `size`.

    Like a mask it is drawn on the exemplar: at the exemplar's size `source_size` (W, H) it goes through
    `fit` like the exemplar; at the processed size `size` it is taken as is.
    """
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, "control image")
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    if picture.size == tuple(size):
        return np.asarray(picture)
    if picture.size != tuple(source_size):
        raise RivalError(
            f"control image is {picture.size[0]}x{picture.size[1]} but the exemplar is {source_size[0]}x"
            f"{source_size[1]} ({size[0]}x{size[1]} processed): make the map at the exemplar's size"
        )
    return np.asarray(fit(picture, tuple(size)))


@dataclasses.dataclass(frozen=True)
class CannyEdges:
    """A control map to compute: the processed exemplar's Canny edges (`canny`) with these settings."""

    sigma: float = 2.0
    low: float | None = None
    high: float | None = None


def canny(pixels: np.ndarray, sigma: float = 2.0, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Canny edges of an RGB image (H, W, 3) uint8, white on black, as an RGB uint8 map (scikit-image).

    The grayscale is PIL's (ITU-R 601 luma) in [0, 1], as the authors' ControlNet example computes it;
    `low`/`high` are hysteresis thresholds on its gradient (None: scikit-image's defaults); sigma is
    the Gaussian blur's.
    """
    from skimage.feature import canny as skimage_canny

    gray = np.asarray(Image.fromarray(pixels).convert("L"), np.float64) / 255.0
    edges = skimage_canny(gray, sigma=sigma, low_threshold=low, high_threshold=high)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] to PIL images."""
    return [Image.fromarray(np.round(np.clip(i, 0, 1) * 255).astype(np.uint8)) for i in images]


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images left to right, top to bottom."""
    columns = columns or min(len(images), 5)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet
