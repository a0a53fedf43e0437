"""Several exemplars in flight: their inversions, reference passes and variations as shared, sharded batches.

A `RivalPipeline` works one exemplar at a time, and on many devices its batch-1 inversion and its
reference pass leave most devices idle. Here E exemplars of one image size and step count move
together: their inversions are one UNet batch split over the devices (one exemplar per device), their
reference passes' E*T*C evaluations are split evenly over every device, and their variations are
denoised in one program on a 2-D mesh (`parallel.exemplar_mesh`): each row of devices keeps its
exemplars' chains and features, each device denoises its slice of their variations. Variation i of
a seed is the same image whatever else shares its batch, on any device count (to float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax import images
from rival_jax.config import RivalConfig
from rival_jax.core import parallel
from rival_jax.core.inversion import invert
from rival_jax.core.reference import ReferenceFeatures, choose_reference_mode, reference_pass_many
from rival_jax.core.sampler import GenerationInputs, aligned_generate_many
from rival_jax.core.unet import Conditioning
from rival_jax.errors import RivalError
from rival_jax.outputs import InversionChain, RivalOutput


@dataclasses.dataclass(frozen=True)
class Request:
    """One exemplar's share of a `generate_many` call: which variations of which seed, with which prompts and mask.

    Args:
        variation_indices: variation i of `seed` starts from fold_in(PRNGKey(seed), i); may be empty.
        seed: the exemplar's seed.
        prompt: the generated images' prompt (None: the inversion prompt).
        negative_prompt: of the generated images.
        mask: inpainting region, as `RivalPipeline.generate` takes it.
    """

    variation_indices: Sequence[int]
    seed: int = 0
    prompt: str | None = None
    negative_prompt: str = ""
    mask: Any = None


@dataclasses.dataclass
class ExemplarGroup:
    """Chains that generate together (same image size, steps and context count), and their features once computed.

    reference: the stacked features of `chains` (padded as the last `generate_many` call padded
        them), kept for the group's later calls in reference mode "keep".
    """

    chains: list[InversionChain]
    reference: ReferenceFeatures | None = None


def _stacked(parts: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *parts)


def invert_many(
    pipe: Any, exemplars: Sequence[Any], prompts: Sequence[str], num_inference_steps: int
) -> list[InversionChain]:
    """DDIM-invert several exemplars as one UNet batch split over the local devices.

    Args:
        pipe: a `RivalPipeline`.
        exemplars: paths, PIL images or uint8 arrays that come out the same size (`pipe.image_size`).
        prompts: each exemplar's inversion prompt.
        num_inference_steps: T.

    >>> chains = invert_many(pipe, ["a.jpg", "b.jpg"], ["a cat", "a dog"], 50)
    """
    timesteps = pipe.models.schedule.timesteps(num_inference_steps)
    encoded = [pipe.encode_image(exemplar) for exemplar in exemplars]
    if len({pixels.shape for pixels, _, _ in encoded}) > 1:
        sizes = sorted({f"{p.shape[1]}x{p.shape[0]}" for p, _, _ in encoded})
        raise RivalError(f"exemplars inverted together must come out one size, not {', '.join(sizes)}: group by size")
    pixels = encoded[0][0]
    size = (pixels.shape[1], pixels.shape[0])
    used, per_device = parallel.spread(len(encoded), pipe.mesh.size)
    order = np.minimum(np.arange(used * per_device), len(encoded) - 1)
    x0 = jnp.stack([encoded[k][1] for k in order])
    cond = Conditioning.concat([pipe.encode_prompt([prompts[k]], size) for k in order])
    sharded = (False, False, True, True, False)  # (params, schedule, x0, cond, timesteps)
    program = parallel.over_items(
        functools.partial(invert, pipe.models.unet), parallel.sub_mesh(pipe.mesh, used), sharded
    )
    args = (pipe.params["unet"], pipe.models.schedule, x0, cond, jnp.asarray(timesteps))
    chains = np.asarray(pipe._run("inversion (exemplars)", lambda _: program, num_inference_steps, False, args))
    return [
        InversionChain(jnp.asarray(chains[k]), timesteps, prompt, pixels, source)
        for k, ((pixels, _, source), prompt) in enumerate(zip(encoded, prompts, strict=True))
    ]


def reference_many(pipe: Any, chains: Sequence[InversionChain]) -> ReferenceFeatures:
    """The reference passes of same-size chains stacked (E, ...), their E*T*C evaluations split over every device."""
    contexts = Conditioning.concat([pipe.contexts(chain) for chain in chains])
    batch = pipe.options.reference_batch_size
    program = functools.partial(reference_pass_many, pipe.models.unet, batch_size=batch, mesh=pipe.mesh)
    chain_latents, timesteps = jnp.stack([c.latents for c in chains]), jnp.asarray(chains[0].timesteps)
    args = (pipe.params["unet"], pipe.models.schedule, chain_latents, contexts, timesteps)
    return pipe._run("reference pass (exemplars)", lambda _: program, 1, False, args)


def _check_compatible(pipe: Any, chains: Sequence[InversionChain]) -> None:
    if pipe.controlnets:
        raise RivalError("several exemplars in one batch cannot use ControlNets: generate them one at a time")
    kinds = {(c.latents.shape, tuple(c.timesteps), len(pipe._context_prompts(c))) for c in chains}
    if len(kinds) > 1:
        raise RivalError(
            "exemplars generated together must share image size, steps and prompt contexts (inversion prompt "
            "empty or not): group them by these"
        )


def _reference_mode(pipe: Any, group: ExemplarGroup, exemplars_per_device: int) -> str:
    mode, chains = pipe.options.reference_mode, group.chains
    if mode == "auto" and group.reference is not None:
        return "keep"
    per_device = pipe.reference_feature_bytes(chains[0]) * exemplars_per_device
    return choose_reference_mode(mode, per_device, parallel.device_memory_bytes())


def generate_many(
    pipe: Any,
    group: ExemplarGroup,
    requests: Sequence[Request],
    config: RivalConfig | None = None,
    output_type: str = "pil",
    batch_size: int | None = None,
    exemplar_count: int | None = None,
) -> list[RivalOutput]:
    """Variations of several exemplars in one program over the local devices; one `RivalOutput` per request.

    Args:
        pipe: a `RivalPipeline` without ControlNets.
        group: the exemplars' chains; request k is for chain k.
        requests: one per chain (an empty `variation_indices` generates nothing for that exemplar).
        config: the method's settings, shared by every request (numbers and switches).
        output_type: "pil", "np" or "latent".
        batch_size: pad every exemplar's variations to at least this many (compiled programs are reused).
        exemplar_count: pad the exemplars to at least this many, likewise.

    In reference mode "keep" the group's features come from one `reference_many` on its first call;
    each device keeps the features of its own exemplars only (`auto` sizes them per device).

    >>> group = ExemplarGroup(invert_many(pipe, ["a.jpg", "b.jpg"], ["a cat", "a dog"], 50))
    >>> outs = generate_many(pipe, group, [Request(range(16), seed=0), Request(range(16), seed=1)])
    """
    config = config or RivalConfig()
    chains = group.chains
    _check_compatible(pipe, chains)
    if len(requests) != len(chains):
        raise RivalError(f"{len(requests)} requests for {len(chains)} exemplars: give one request per exemplar")
    variations = max(max(len(r.variation_indices) for r in requests), batch_size or 0, 1)
    count = max(len(chains), exemplar_count or 0)
    mesh = parallel.exemplar_mesh(pipe.mesh, count, variations)
    rows, columns = mesh.devices.shape
    order = np.minimum(np.arange(-(-count // rows) * rows), len(chains) - 1)  # padding repeats the last
    mode = _reference_mode(pipe, group, len(order) // rows)
    reference = None
    if mode == "keep":
        if group.reference is None or group.reference.eps.shape[0] != len(order):
            group.reference = reference_many(pipe, [chains[k] for k in order])
        reference = group.reference
    grid = tuple(chains[0].latents.shape[-2:])
    regions, starts = [], []
    for chain, request in zip(chains, requests, strict=True):
        mask = request.mask
        region = np.ones(grid, bool) if mask is None else images.mask_region(mask, chain.source_size, chain.size, grid)
        indices = np.asarray(request.variation_indices or [0], dtype=np.int32)
        regions.append(region)
        starts.append(np.asarray(pipe.start_latents(chain, indices, request.seed, config, region)))
    length = -(-variations // columns) * columns

    def prompts(k: int) -> list[str]:
        prompt = requests[k].prompt
        return [requests[k].negative_prompt, chains[k].prompt if prompt is None else prompt]

    inputs = GenerationInputs(
        start=np.stack([parallel.pad_to(starts[k], length) for k in order]),
        chain=jnp.stack([chains[k].latents for k in order]),
        conditioning=_stacked([pipe.encode_prompt(prompts(k), chains[k].size) for k in order]),
        contexts=_stacked([pipe.contexts(chains[k]) for k in order]),
        reference=reference,
        region=np.stack([regions[k] for k in order]),
        settings=config.as_arrays(),
        timesteps=jnp.asarray(chains[0].timesteps),
    )
    shared = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    per_exemplar = {
        name: jax.device_put(shared.pop(name), parallel.per_exemplar_sharding(mesh, name in inputs.PER_VARIATION))
        for name in inputs.PER_EXEMPLAR
    }
    unet, schedule, implementation = pipe.models.unet, pipe.models.schedule, pipe.options.attention

    def generate(params: Any, stacked: GenerationInputs) -> jax.Array:
        return aligned_generate_many(unet, params, schedule, stacked, implementation)

    program = parallel.over_exemplars(generate, mesh, GenerationInputs)
    args = (pipe.params["unet"], per_exemplar, shared)
    final = np.asarray(pipe._run("generation (exemplars)", lambda _: program, 1, False, args))
    return _outputs(pipe, requests, final, starts, mode, output_type)


def _outputs(pipe, requests, final, starts, mode, output_type) -> list[RivalOutput]:
    latents = [final[k, : len(r.variation_indices)] for k, r in enumerate(requests)]
    starts = [start[: len(r.variation_indices)] for start, r in zip(starts, requests, strict=True)]
    if output_type == "latent":
        results: list[Any] = latents
    else:
        decoded = pipe.decode(np.concatenate(latents)) if sum(map(len, latents)) else np.zeros((0,))
        cuts = np.cumsum([len(x) for x in latents])[:-1]
        results = [d if output_type == "np" else images.to_pil(d) for d in np.split(decoded, cuts)]
    return [
        RivalOutput(result, latent, start, np.asarray(r.variation_indices, dtype=np.int32), r.seed, mode)
        for r, result, latent, start in zip(requests, results, latents, starts, strict=True)
    ]
