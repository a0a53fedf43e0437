"""Aligned generation (docs/method.md, "Aligned generation") as pure functions of arrays.

`aligned_generate` denoises the variations with cross-image self-attention against the exemplar's
hidden states, AdaIN onto the exemplar's noise, and classifier-free guidance. The exemplar's side
comes from `reference` (stored once, or recomputed in every step beside the variations). The
attention stage (inside each hooked layer, so the UNet is traced once) and the AdaIN stage are chosen
per step by `lax` control flow on the timestep.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from rival_jax import progress
from rival_jax.core import traces
from rival_jax.core.attention import FUSION, PLAIN, REPLACEMENT, Stage
from rival_jax.core.control import ControlInputs, control_residuals
from rival_jax.core.ddim import DDIMSchedule, ddim_step
from rival_jax.core.parallel import DATA, EXEMPLARS
from rival_jax.core.reference import ReferenceFeatures
from rival_jax.core.unet import Conditioning, unet_output_alongside, unet_output_injected

ADAIN_EPS = 1e-5


@struct.dataclass
class GenerationInputs:
    """Everything `aligned_generate` reads, as one pytree that crosses `jit` and `shard_map`.

    start: (N, 4, h, w) the variations' start latents; the one per-variation field (`PER_VARIATION`),
        split over devices and donated to the program.
    chain: (T+1, 4, h, w) the exemplar's inversion chain, x_0 first.
    conditioning: 2 entries, [negative prompt, prompt] of the generated images.
    contexts: C entries, the exemplar's [empty prompt, inversion prompt] (one when equal).
    reference: the exemplar's stored features (`keep`), or None to recompute them every step.
    region: (h, w) where the variations are generated; elsewhere each step copies the exemplar's
        chain latent (inpainting; all-true otherwise).
    settings: `RivalConfig.as_arrays()`.
    timesteps: (T,) generation order.
    control: the ControlNets' inputs (`control.ControlInputs`), or None without ControlNet.

    Several exemplars (`aligned_generate_many`) stack the `PER_EXEMPLAR` fields on a leading axis.
    `control` is for one exemplar: its ControlNet maps are shared by the whole batch.
    """

    PER_VARIATION: ClassVar[tuple[str, ...]] = ("start",)
    PER_EXEMPLAR: ClassVar[tuple[str, ...]] = ("start", "chain", "conditioning", "contexts", "reference", "region")
    # How `parallel.sharded` splits the stacked fields: exemplars over the mesh rows, variations over its columns.
    SPLIT: ClassVar[dict[str, tuple[str, ...]]] = {
        "start": (EXEMPLARS, DATA),
        **{name: (EXEMPLARS,) for name in ("chain", "conditioning", "contexts", "reference", "region")},
    }

    start: jnp.ndarray
    chain: jnp.ndarray
    conditioning: Conditioning
    contexts: Conditioning
    reference: ReferenceFeatures | None
    region: jnp.ndarray
    settings: dict[str, jnp.ndarray]
    timesteps: jnp.ndarray
    control: ControlInputs | None = None


def shuffle_within(x: jnp.ndarray, region: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """Randomly permute the spatial positions of x (C, h, w) inside `region` (h, w), channels together.

    Positions outside the region keep their value; with an all-true region this is a full spatial shuffle.
    """
    channels = x.shape[0]
    flat = x.reshape(channels, -1)
    inside = region.reshape(-1)
    order = jnp.arange(inside.shape[0])
    scores = jax.random.uniform(key, inside.shape)
    sources = jnp.argsort(jnp.where(inside, scores, 2.0), stable=True)
    targets = jnp.argsort(jnp.where(inside, order, inside.shape[0] + order), stable=True)
    shuffled = flat.at[:, targets].set(flat[:, sources])
    return shuffled.reshape(x.shape)


def start_latent(
    key: jax.Array, x_t: jnp.ndarray, region: jnp.ndarray, *, latent_init: str, latent_alignment: bool
) -> jnp.ndarray:
    """One variation's start latent from x_T (latent initialisation, docs/method.md; `RivalConfig`'s fields).

    Inside `region` (everything, unless inpainting) the latent comes from the chosen initialisation;
    outside it is x_T itself.
    """
    if not latent_alignment:
        init = jax.random.normal(key, x_t.shape, x_t.dtype)
    elif latent_init == "shuffle":
        init = shuffle_within(x_t, region, key)
    elif latent_init == "adaptive_gaussian":
        mean = x_t.mean(axis=(1, 2), keepdims=True)
        std = x_t.std(axis=(1, 2), keepdims=True)
        init = mean + std * jax.random.normal(key, x_t.shape, x_t.dtype)
    else:
        init = x_t
    return jnp.where(region[None], init, x_t)


def start_latents(
    seed_key: jax.Array,
    indices: jnp.ndarray,
    x_t: jnp.ndarray,
    region: jnp.ndarray,
    *,
    latent_init: str,
    latent_alignment: bool,
) -> jnp.ndarray:
    """Start latents (N, 4, h, w) for variations `indices`: variation i always uses fold_in(seed_key, i).

    >>> start = start_latents(key, jnp.arange(4), x_t, region, latent_init="shuffle", latent_alignment=True)
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(indices)
    init = {"latent_init": latent_init, "latent_alignment": latent_alignment}
    return jax.vmap(lambda k: start_latent(k, x_t, region, **init))(keys)


def adain(x: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """Give each channel of x (N, C, h, w) the spatial mean and std of target (C, h, w).

    std is sqrt(unbiased variance + 1e-5), as in the authors' release.
    """

    def stats(a: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return a.mean(axis=(-2, -1), keepdims=True), jnp.sqrt(a.var(axis=(-2, -1), ddof=1, keepdims=True) + ADAIN_EPS)

    mean_x, std_x = stats(x)
    mean_t, std_t = stats(target)
    return (x - mean_x) / std_x * std_t + mean_t


def attention_stage(t: jnp.ndarray, settings: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """PLAIN (no injection), REPLACEMENT (t > t_align) or FUSION (t <= t_align), per the switches."""
    inject = settings["attention_injection"] & (t <= settings["editing_start"])
    fuse = (t <= settings["t_align"]) | ~settings["early_replacement"]
    return jnp.where(inject, jnp.where(fuse, FUSION, REPLACEMENT), PLAIN)


def aligned_generate(
    unet: Any,
    params: Any,
    schedule: DDIMSchedule,
    inputs: GenerationInputs,
    *,
    report_progress: bool = False,
    attention_implementation: str | None = None,
    controlnets: tuple[Any, ...] = (),
    return_traces: bool = False,
) -> jnp.ndarray | tuple[jnp.ndarray, traces.StepTraces]:
    """Denoise the variations `inputs.start` (N, 4, h, w) along the exemplar's chain; returns final latents.

    report_progress (static): tick `progress` every step (host callbacks keep the program out of
        XLA's persistent cache, so batch work leaves it off).
    attention_implementation (static): how the injected layers attend: None/"xla" (blockwise, see
        `attention`) or "cudnn" (`jax.nn.dot_product_attention`'s flash attention, NVIDIA GPUs, bf16/fp16).
    controlnets (static): the Flax ControlNets whose params and images are `inputs.control`; their
        residuals go to the variations only.
    return_traces (static): also return `traces.StepTraces` (a separate program; see `core.traces`).

    >>> final = aligned_generate(unet, params["unet"], schedule, inputs)
    """
    count = inputs.start.shape[0]
    settings, contexts = inputs.settings, inputs.contexts
    steps = inputs.timesteps.shape[0]
    stride = schedule.stride(steps)
    batch_cond = inputs.conditioning.repeat(count)
    # The batch is [uncond x N, cond x N]; the two groups pair with the contexts [empty prompt, inversion prompt].
    group_context = jnp.array([0, contexts.size - 1])
    implementation = attention_implementation
    layers = traces.attention_layers(unet, params, inputs.start.shape[1:], batch_cond) if return_traces else ()

    def stored_exemplar(latents, t, stored, residuals, stage: Stage, shares: dict | None):
        hidden, eps_reference = stored
        grouped = {path: states[group_context] for path, states in hidden.items()}
        output = unet_output_injected(
            unet, params, latents, t, batch_cond, grouped, stage, implementation, residuals, shares
        )
        return output, eps_reference

    def recomputed_exemplar(latents, t, x_reference, residuals, stage: Stage, shares: dict | None):
        leading = contexts.size
        both = jnp.concatenate([jnp.broadcast_to(x_reference, (leading, *x_reference.shape)), latents])
        cond = Conditioning.concat([contexts, batch_cond])
        residuals = None if residuals is None else residuals.after_zeros(leading)
        output = unet_output_alongside(
            unet, params, both, t, cond, leading, group_context, stage, implementation, residuals, shares
        )
        eps_reference = schedule.epsilon(output[leading - 1].astype(jnp.float32), x_reference, schedule.alpha(t))
        return output[leading:], eps_reference

    def step(x: jnp.ndarray, xs: tuple) -> tuple[jnp.ndarray, tuple | None]:
        index, t = xs
        # Step-dependent inputs are read by index, not scanned over: under `vmap` (several exemplars) a
        # scanned input would be transposed to steps-first, a copy of the whole chain and features.
        x_reference, x_reference_next = inputs.chain[steps - index], inputs.chain[steps - index - 1]
        reference = inputs.reference
        stored = (
            None if reference is None else jax.tree_util.tree_map(lambda a: a[index], (reference.hidden, reference.eps))
        )
        latents = jnp.concatenate([x, x])
        residuals = None
        if controlnets:
            residuals = control_residuals(controlnets, inputs.control, latents, t, batch_cond, index, steps)
        stage, shares = attention_stage(t, settings), {} if return_traces else None
        if stored is None:
            output, eps_reference = recomputed_exemplar(latents, t, x_reference, residuals, stage, shares)
        else:
            output, eps_reference = stored_exemplar(latents, t, stored, residuals, stage, shares)
        alpha = schedule.alpha(t)
        eps = schedule.epsilon(output.astype(jnp.float32), latents.astype(jnp.float32), alpha)
        eps_uncond, eps_cond = jnp.split(eps, 2)
        guided = eps_uncond + settings["guidance_scale"] * (eps_cond - eps_uncond)
        guided = jax.lax.cond(
            settings["noise_alignment"] & (t > settings["t_early"]),
            lambda g: adain(g, eps_reference.astype(jnp.float32)),
            lambda g: g,
            guided,
        )
        x_next = ddim_step(x, guided, alpha, schedule.alpha(t - stride)).astype(x.dtype)
        x_next = jnp.where(inputs.region[None, None], x_next, x_reference_next[None])
        if report_progress:
            progress.tick(t)
        if return_traces:
            per_variation = traces.stacked_shares(shares, layers).reshape(len(layers), 2, count).mean(axis=1)
            return x_next, (per_variation, traces.statistic_distance(x, x_reference))
        return x_next, None

    xs = (jnp.arange(steps), inputs.timesteps)
    final, ys = jax.lax.scan(step, inputs.start, xs)
    if return_traces:
        return final, traces.StepTraces(share=ys[0].transpose(2, 0, 1), distance=ys[1].T)
    return final


def aligned_generate_many(
    unet: Any, params: Any, schedule: DDIMSchedule, inputs: GenerationInputs, **statics: Any
) -> jnp.ndarray | tuple[jnp.ndarray, traces.StepTraces]:
    """`aligned_generate` of E exemplars in one program: each exemplar's variations against its own side.

    inputs: `PER_EXEMPLAR` fields with a leading exemplar axis (start (E, N, 4, h, w), chain
        (E, T+1, 4, h, w), conditioning and contexts (E, ...) per leaf, reference leaves (E, ...),
        region (E, h, w)); settings, timesteps and control are shared, so the attention and AdaIN
        stages stay one branch per step for the whole batch. statics: `aligned_generate`'s keyword
        arguments. Returns (E, N, 4, h, w) (and traces with the same leading axes).

    >>> finals = aligned_generate_many(unet, params["unet"], schedule, stacked_inputs)
    """
    per_exemplar = {name: getattr(inputs, name) for name in GenerationInputs.PER_EXEMPLAR}

    def one(fields: dict[str, Any]) -> Any:
        return aligned_generate(unet, params, schedule, inputs.replace(**fields), **statics)

    return jax.vmap(one)(per_exemplar)
