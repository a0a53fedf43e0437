"""What the pipeline returns: exemplars' inversion chains (alone or grouped) and the generated variations."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from PIL import Image

from rival_jax.core.reference import ReferenceFeatures


@dataclasses.dataclass
class InversionChain:
    """An exemplar's DDIM inversion chain and what made it.

    Args:
        latents: (T+1, 4, h, w), x_0 (the encoded exemplar) first, x_T last.
        timesteps: (T,) generation order.
        prompt: the inversion prompt.
        image: (H, W, 3) uint8, the exemplar as processed (resized, maybe cropped).
        source_size: (W, H) of the exemplar as given; masks drawn on it are processed like it.
        reference: the exemplar's per-step features; `RivalPipeline.generate` fills it on first use
            (reference mode "keep") and every later call with this chain reuses it.

    >>> chain = pipe.invert("photo.jpg", prompt="a photo of a lynx")
    >>> chain.exemplar_image().save("processed.png")
    """

    latents: jax.Array
    timesteps: np.ndarray
    prompt: str
    image: np.ndarray
    source_size: tuple[int, int]
    reference: ReferenceFeatures | None = None

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the processed exemplar, and so of every generated image."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    def exemplar_image(self) -> Image.Image:
        """The processed exemplar the chain was inverted from."""
        return Image.fromarray(self.image)


@dataclasses.dataclass(frozen=True)
class RivalOutput:
    """Generated variations.

    Args:
        images: per `output_type`: PIL images, an (N, H, W, 3) float array in [0, 1], or latents.
        latents: (N, 4, h, w) final latents.
        start_latents: (N, 4, h, w) the latents generation started from.
        indices: (N,) variation indices; variation i of a seed always starts from fold_in(PRNGKey(seed), i).
        seed: the seed.
        reference_mode: "keep" or "recompute", how the exemplar's features were provided.
        traces: with `generate(..., return_traces=True)`, the per-step `core.traces.GenerationTraces`.
    """

    images: Any
    latents: np.ndarray
    start_latents: np.ndarray
    indices: np.ndarray
    seed: int
    reference_mode: str
    traces: Any = None


@dataclasses.dataclass
class ExemplarGroup:
    """Chains that generate together (same image size, steps and context count), and their features once computed.

    reference: the stacked features of `chains` (padded as the last `generate_many` call padded
        them), kept for the group's later calls in reference mode "keep".

    >>> group = ExemplarGroup(pipe.invert_many(["a.jpg", "b.jpg"], ["a cat", "a dog"], 50))
    """

    chains: list[InversionChain]
    reference: ReferenceFeatures | None = None
