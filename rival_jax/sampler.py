"""Aligned generation (ALGORITHM.md sections 3-4) as pure functions of arrays.

The exemplar's side of every step depends only on its chain and prompt, so `reference_pass` runs it
once for all steps and any number of variations; `aligned_generate` then denoises the variations
with cross-image self-attention against the stored hidden states, AdaIN onto the stored noise, and
classifier-free guidance. The attention stage and the AdaIN stage are chosen per step by `lax`
control flow on the timestep.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rival_jax import progress
from rival_jax.attention import FUSE, REPLACE, unet_eps, unet_eps_injected, unet_eps_recording
from rival_jax.config import REFERENCE_BATCH_SIZE, RivalConfig
from rival_jax.ddim import DDIMSchedule, ddim_step

ADAIN_EPS = 1e-5
PLAIN, REPLACEMENT, FUSION = 0, 1, 2


@struct.dataclass
class ReferenceFeatures:
    """The exemplar's per-step work, shared by every variation.

    hidden: {attn1 path: (T, C, L, D)} hidden states entering each self-attention layer, for the
        C guidance contexts [empty prompt, inversion prompt] (C = 1 when the inversion prompt is empty).
    eps: (T, 4, h, w) the exemplar's conditional noise prediction (inversion prompt).
    contexts: C.
    """

    hidden: dict[tuple[str, ...], jnp.ndarray]
    eps: jnp.ndarray
    contexts: int = struct.field(pytree_node=False)


def reference_pass(
    unet: Any,
    params: Any,
    chain: jnp.ndarray,
    contexts: jnp.ndarray,
    timesteps: jnp.ndarray,
    batch_size: int = REFERENCE_BATCH_SIZE,
    report_progress: bool = False,
) -> ReferenceFeatures:
    """Evaluate the exemplar at every generation step j on its stored latent x_{T-j}, for every context.

    `contexts` (C, L, D) are the text embeddings [empty prompt, inversion prompt], or just one when equal.
    No step depends on another, so the T*C evaluations run as UNet batches of up to `batch_size`
    (static), each entry at its own timestep; the last batch is padded with repeats that are dropped.
    """
    steps, count = timesteps.shape[0], contexts.shape[0]
    items = steps * count
    batches, per_batch = reference_batches(items, batch_size)
    item = np.minimum(np.arange(batches * per_batch), items - 1)
    step_of, context_of = item // count, item % count
    latents_by_step = chain[::-1][:-1]

    def batched(x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(batches, per_batch, *x.shape[1:])

    def run(_: None, xs: tuple) -> tuple[None, tuple[dict, jnp.ndarray]]:
        x, t, text = xs
        eps, hidden = unet_eps_recording(unet, params, x, t, text)
        if report_progress:
            progress.tick(t[0])
        return None, (hidden, eps)

    inputs = (latents_by_step[step_of], timesteps[step_of].astype(jnp.float32), contexts[context_of])
    _, outputs = jax.lax.scan(run, None, tuple(batched(x) for x in inputs))

    def by_step(x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(-1, *x.shape[2:])[:items].reshape(steps, count, *x.shape[2:])

    hidden, eps = jax.tree_util.tree_map(by_step, outputs)
    return ReferenceFeatures(hidden=hidden, eps=eps[:, -1], contexts=count)


def reference_batches(items: int, batch_size: int) -> tuple[int, int]:
    """(UNet batches, entries per batch) that `reference_pass` runs for `items` = steps x contexts evaluations.

    The fewest batches of at most `batch_size`, as even as possible, so padding stays under one per batch.
    """
    batches = -(-items // batch_size)
    return batches, -(-items // batches)


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


def start_latent(key: jax.Array, x_t: jnp.ndarray, region: jnp.ndarray, config: RivalConfig) -> jnp.ndarray:
    """One variation's start latent from x_T (latent initialisation, ALGORITHM.md section 3/4).

    Inside `region` (everything, unless inpainting) the latent comes from the chosen initialisation;
    outside it is x_T itself.
    """
    if not config.latent_alignment:
        init = jax.random.normal(key, x_t.shape, x_t.dtype)
    elif config.latent_init == "shuffle":
        init = shuffle_within(x_t, region, key)
    elif config.latent_init == "adaptive_gaussian":
        mean = x_t.mean(axis=(1, 2), keepdims=True)
        std = x_t.std(axis=(1, 2), keepdims=True)
        init = mean + std * jax.random.normal(key, x_t.shape, x_t.dtype)
    else:
        init = x_t
    return jnp.where(region[None], init, x_t)


def start_latents(
    seed_key: jax.Array, indices: jnp.ndarray, x_t: jnp.ndarray, region: jnp.ndarray, config: RivalConfig
) -> jnp.ndarray:
    """Start latents (N, 4, h, w) for variations `indices`: variation i always uses fold_in(seed_key, i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(indices)
    return jax.vmap(lambda k: start_latent(k, x_t, region, config))(keys)


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
    reference: ReferenceFeatures,
    chain: jnp.ndarray,
    start: jnp.ndarray,
    texts: jnp.ndarray,
    region: jnp.ndarray,
    settings: dict[str, jnp.ndarray],
    timesteps: jnp.ndarray,
    report_progress: bool = False,
    attention_implementation: str | None = None,
) -> jnp.ndarray:
    """Denoise the variations `start` (N, 4, h, w) along the exemplar's chain; returns final latents.

    texts (2, L, D): [negative prompt, prompt] embeddings of the generated images.
    region (h, w): where the variations are generated; elsewhere each step copies the exemplar's
        chain latent (inpainting; all-true otherwise).
    settings: `RivalConfig.as_arrays()`.
    report_progress (static): tick `progress` every step (host callbacks keep the program out of
        XLA's persistent cache, so batch work leaves it off).
    attention_implementation (static): how the injected layers attend: None/"xla" (blockwise, see
        `attention`) or "cudnn" (`jax.nn.dot_product_attention`'s flash attention, NVIDIA GPUs, bf16/fp16).
    """
    count = start.shape[0]
    stride = schedule.stride(timesteps.shape[0])
    batch_texts = jnp.repeat(texts, count, axis=0)
    next_reference_latents = chain[::-1][1:]
    # The batch is [uncond x N, cond x N]; the two groups pair with the contexts [empty prompt, inversion prompt].
    group_context = jnp.array([0, reference.contexts - 1])

    def step(x: jnp.ndarray, xs: tuple) -> tuple[jnp.ndarray, None]:
        t, hidden, eps_reference, x_reference_next = xs
        latents = jnp.concatenate([x, x])
        grouped = {path: states[group_context] for path, states in hidden.items()}
        branches = [
            lambda: unet_eps(unet, params, latents, t, batch_texts),
            lambda: unet_eps_injected(
                unet, params, latents, t, batch_texts, grouped, REPLACE, attention_implementation
            ),
            lambda: unet_eps_injected(unet, params, latents, t, batch_texts, grouped, FUSE, attention_implementation),
        ]
        eps = jax.lax.switch(attention_stage(t, settings), branches).astype(jnp.float32)
        eps_uncond, eps_cond = jnp.split(eps, 2)
        guided = eps_uncond + settings["guidance_scale"] * (eps_cond - eps_uncond)
        guided = jax.lax.cond(
            settings["noise_alignment"] & (t > settings["t_early"]),
            lambda g: adain(g, eps_reference.astype(jnp.float32)),
            lambda g: g,
            guided,
        )
        x_next = ddim_step(x, guided, schedule.alpha(t), schedule.alpha(t - stride)).astype(x.dtype)
        x_next = jnp.where(region[None, None], x_next, x_reference_next[None])
        if report_progress:
            progress.tick(t)
        return x_next, None

    final, _ = jax.lax.scan(step, start, (timesteps, reference.hidden, reference.eps, next_reference_latents))
    return final
