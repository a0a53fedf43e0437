"""Input preparation for every entry point (`invert`, `invert_many`, `generate`, `generate_many`).

What a request asks for, the prompts of the exemplar's guidance contexts and of the generated images,
mask regions, given start latents, the reference-mode choice, and the images in the form asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax import images
from rival_jax.core.reference import choose_reference_mode
from rival_jax.errors import RivalError
from rival_jax.pipeline.results import InversionChain, RivalOutput

OutputType = Literal["pil", "np", "latent"]


@dataclasses.dataclass(frozen=True)
class Request:
    """One exemplar's share of a `generate_many` call: which variations of which seed, with what.

    Args:
        variation_indices: variation i of `seed` starts from fold_in(PRNGKey(seed), i); may be empty.
        seed: the exemplar's seed.
        prompt: the generated images' prompt (None: the inversion prompt).
        negative_prompt: of the generated images.
        mask: inpainting region, as `RivalPipeline.generate` takes it.
        latents: start latents (N, 4, h, w) that replace the initialisation, one per variation index.
        control_image: the ControlNets' maps, as `RivalPipeline.generate` takes them (one exemplar only).
        control_settings: (conditioning scale, guidance start, guidance end), each one value or one per ControlNet.

    >>> request = Request(range(16), seed=1, prompt="a watercolor of a lynx")
    """

    variation_indices: Sequence[int]
    seed: int = 0
    prompt: str | None = None
    negative_prompt: str = ""
    mask: Any = None
    latents: Any = None
    control_image: Any = None
    control_settings: tuple[Any, Any, Any] = (1.0, 0.0, 1.0)


def context_prompts(inversion_prompt: str) -> list[str]:
    """The prompts of the exemplar's guidance contexts: [empty prompt, inversion prompt], one when they are equal."""
    return [""] if inversion_prompt == "" else ["", inversion_prompt]


def context_count(inversion_prompt: str) -> int:
    """How many guidance contexts an exemplar inverted with `inversion_prompt` has (1 or 2)."""
    return len(context_prompts(inversion_prompt))


def generated_prompts(chain: InversionChain, request: Request) -> list[str]:
    """[negative prompt, prompt] of the generated images; the prompt defaults to the inversion prompt."""
    return [request.negative_prompt, chain.prompt if request.prompt is None else request.prompt]


def mask_region(chain: InversionChain, mask: Any) -> np.ndarray:
    """(h, w) latent cells to generate: the mask's region, or everything without a mask."""
    grid = tuple(chain.latents.shape[-2:])
    return np.ones(grid, bool) if mask is None else images.mask_region(mask, chain.source_size, chain.size, grid)


def variation_indices(num_variations: int | None, indices: Sequence[int] | None, latents: Any) -> np.ndarray:
    """The variation indices `generate` makes: `indices`, else 0..num_variations-1 (default: one per latent, or 1)."""
    if indices is None:
        if num_variations is None:
            num_variations = 1 if latents is None else len(latents)
        if not isinstance(num_variations, int) or num_variations < 1:
            raise RivalError(f"num_variations={num_variations!r} is out of range: use an integer >= 1")
        indices = range(num_variations)
    found = np.asarray(indices, dtype=np.int32).reshape(-1)
    if found.size == 0 or found.min() < 0:
        raise RivalError("variation_indices must be a non-empty list of integers >= 0")
    return found


def check_output_type(output_type: str) -> None:
    if output_type not in ("pil", "np", "latent"):
        raise RivalError(f"output_type {output_type!r} is unknown: use 'pil', 'np' or 'latent'")


def given_start(chain: InversionChain, request: Request) -> np.ndarray | None:
    """The request's own start latents, checked against its variations and the chain; None when not given."""
    if request.latents is None:
        return None
    start = np.asarray(request.latents, dtype=np.float32)
    expected = (len(request.variation_indices), *chain.latents.shape[1:])
    if start.shape != expected:
        raise RivalError(f"latents have shape {start.shape}: expected {expected} (N, 4, h, w)")
    return start


def reference_mode(option: str, kept: bool, feature_bytes: Callable[[], int], device_memory: int | None) -> str:
    """ "keep" or "recompute": the option; for "auto", "keep" when the features are kept already, else their
    size (`feature_bytes()`, per device) against the device's memory."""
    if option == "auto" and kept:
        return "keep"
    if option != "auto":
        return option
    return choose_reference_mode("auto", feature_bytes(), device_memory)


def stacked(parts: Sequence[Any]) -> Any:
    """Pytrees of equal structure stacked on a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *parts)


def entry(tree: Any, index: int) -> Any:
    """Entry `index` of a pytree stacked on its leading axis."""
    return jax.tree_util.tree_map(lambda x: x[index], tree)


def in_form(latents: list[np.ndarray], output_type: str, decode: Callable[[np.ndarray], np.ndarray]) -> list[Any]:
    """Per request, its final latents as asked: "latent" as they are, "np" decoded, "pil" decoded images."""
    if output_type == "latent":
        return latents
    decoded = decode(np.concatenate(latents)) if sum(map(len, latents)) else np.zeros((0,))
    cuts = np.cumsum([len(x) for x in latents])[:-1]
    return [d if output_type == "np" else images.to_pil(d) for d in np.split(decoded, cuts)]


def outputs(
    requests: Sequence[Request], final: np.ndarray, starts: list[np.ndarray], mode: str, results: Callable, traced: Any
) -> list[RivalOutput]:
    """One `RivalOutput` per request from the program's final latents (E, N, ...), padding dropped.

    results: `in_form` bound to the output type and decoder; traced: per request `GenerationTraces`, or None.
    """
    latents = [final[k, : len(r.variation_indices)] for k, r in enumerate(requests)]
    starts = [start[: len(r.variation_indices)] for start, r in zip(starts, requests, strict=True)]
    traced = traced or [None] * len(requests)
    return [
        RivalOutput(result, latent, start, np.asarray(r.variation_indices, dtype=np.int32), r.seed, mode, trace)
        for r, result, latent, start, trace in zip(requests, results(latents), latents, starts, traced, strict=True)
    ]
