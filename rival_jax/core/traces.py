"""Per-step traces of aligned generation, for looking inside the method (`generate(..., return_traces=True)`).

Two quantities per denoising step, collected as outputs of the generation scan (no host callbacks):

- exemplar attention share, per self-attention layer: the softmax mass the generated queries give
  to the exemplar's tokens (`attention.exemplar_share`), averaged over heads, queries, the two
  guidance halves and the variations. 1.0 in replacement steps (the exemplar's tokens are all there
  is), NaN (`null` in traces.json) in steps without attention injection.
- latent statistic distance: the Euclidean distance between the per-channel (mean, std) of each
  generated latent and of the exemplar's inversion-chain latent entering the same step, averaged
  over the variations. The paper argues aligned chains stay close; with the shuffle
  initialisation it is 0 at the first step.

The traced program is a separate variant (`aligned_generate(..., return_traces=True)`); the usual
one is unchanged and computes none of this.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rival_jax.core.unet import Conditioning, unet_output_recording

Layers = tuple[tuple[str, ...], ...]


@struct.dataclass
class StepTraces:
    """Per-variation traces as the generation program returns them, variation axis first.

    share: (N, T, L) exemplar attention share per step and self-attention layer.
    distance: (N, T) latent statistic distance per step.
    """

    share: jnp.ndarray
    distance: jnp.ndarray


def attention_layers(unet: Any, params: Any, latent_shape: tuple[int, ...], cond: Conditioning) -> Layers:
    """The UNet's self-attention layers (module paths), sorted, from the shapes of one traced call."""

    def shapes(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)

    latents = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
    one = shapes(cond.take(slice(0, 1)))
    _, hidden = jax.eval_shape(
        lambda p, x, c: unet_output_recording(unet, p, x, jnp.int32(1), c), shapes(params), latents, one
    )
    return tuple(sorted(hidden))


def statistic_distance(latents: jnp.ndarray, reference: jnp.ndarray) -> jnp.ndarray:
    """Per latent of (N, C, h, w), the distance of its per-channel (mean, std) to those of reference (C, h, w)."""

    def statistics(x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(jnp.float32)
        return jnp.concatenate([x.mean(axis=(-2, -1)), x.std(axis=(-2, -1))], axis=-1)

    return jnp.linalg.norm(statistics(latents) - statistics(reference)[None], axis=-1)


def stacked_shares(shares: dict, layers: Layers) -> jnp.ndarray:
    """The shares a step's `shares` dict received, as (L, entries) in the order of `layers`."""
    return jnp.stack([shares[layer] for layer in layers])


@dataclasses.dataclass(frozen=True)
class GenerationTraces:
    """Traces of one `generate` call, averaged over its variations.

    Args:
        timesteps: (T,) the steps, in generation order.
        layers: the self-attention layers' module paths joined by "/".
        exemplar_attention_share: (T, L), NaN where no attention was injected.
        latent_stat_distance: (T,).

    >>> out = pipe.generate(chain, num_variations=4, return_traces=True)
    >>> files.save_json(out.traces.as_json(), "traces.json")
    """

    timesteps: np.ndarray
    layers: tuple[str, ...]
    exemplar_attention_share: np.ndarray
    latent_stat_distance: np.ndarray

    @classmethod
    def from_steps(cls, steps: StepTraces, count: int, timesteps: np.ndarray, layers: Layers) -> GenerationTraces:
        """Average the first `count` variations of one exemplar's `steps` (the rest is batch padding)."""
        share = np.asarray(steps.share)[:count].mean(axis=0)
        distance = np.asarray(steps.distance)[:count].mean(axis=0)
        return cls(np.asarray(timesteps), tuple("/".join(layer) for layer in layers), share, distance)

    def as_json(self) -> dict[str, list]:
        """{"timesteps", "layers", "exemplar_attention_share" (per step, per layer; null without injection),
        "latent_stat_distance" (per step)}."""
        return {
            "timesteps": [int(t) for t in self.timesteps],
            "layers": list(self.layers),
            "exemplar_attention_share": [
                [None if np.isnan(v) else float(v) for v in step] for step in self.exemplar_attention_share
            ],
            "latent_stat_distance": [float(v) for v in self.latent_stat_distance],
        }
