"""The exemplar's side of aligned generation: its per-step features, computed once or recomputed.

At generation step j the exemplar sits at its stored chain latent x_{T-j}. What its UNet pass gives
(the hidden states entering every self-attention layer, and its noise prediction for AdaIN) depends
only on the exemplar and its prompt, so it can be computed once for every variation (`keep`, the
fastest) or recomputed inside every generation step beside the variations (`recompute`, the
authors' layout, memory flat in the number of steps). `choose_reference_mode` picks one from the
features' size against the device's memory. See docs/method.md, "Reference modes".
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from rival_jax import progress
from rival_jax.core import parallel
from rival_jax.core.ddim import DDIMSchedule
from rival_jax.core.parallel import DATA
from rival_jax.core.unet import Conditioning, unet_output_recording

# `auto` keeps the features when they take at most this share of one device's memory.
KEEP_MEMORY_FRACTION = 0.25


@struct.dataclass
class ReferenceFeatures:
    """The exemplar's per-step work, shared by every variation.

    hidden: {attn1 path: (T, C, L, D)} hidden states entering each self-attention layer, for the
        C guidance contexts [empty prompt, inversion prompt] (C = 1 when the inversion prompt is empty).
    eps: (T, 4, h, w) the exemplar's conditional noise prediction (inversion prompt), as epsilon.
    contexts: C.
    """

    hidden: dict[tuple[str, ...], jnp.ndarray]
    eps: jnp.ndarray
    contexts: int = struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


def reference_batches(items: int, batch_size: int) -> tuple[int, int]:
    """(UNet batches, entries per batch) that `reference_pass_many` runs for `items` = steps x contexts evaluations.

    The fewest batches of at most `batch_size`, as even as possible, so padding stays under one per batch.
    """
    batches = -(-items // batch_size)
    return batches, -(-items // batches)


def device_batches(items: int, devices: int, batch_size: int) -> tuple[int, int]:
    """`reference_batches` of one device's share when `items` evaluations are split evenly over `devices`."""
    return reference_batches(parallel.spread(items, devices)[1], batch_size)


@struct.dataclass
class ReferenceItems:
    """The reference pass's evaluations, one entry per (exemplar, step, context), split over the devices.

    latents: (I, 4, h, w) each entry's chain latent; timesteps: (I,) its timestep; cond: its context.
    """

    SPLIT: ClassVar[dict[str, tuple[str, ...]]] = {"latents": (DATA,), "timesteps": (DATA,), "cond": (DATA,)}

    latents: jnp.ndarray
    timesteps: jnp.ndarray
    cond: Conditioning


def reference_pass_many(
    unet: Any,
    params: Any,
    schedule: DDIMSchedule,
    chains: jnp.ndarray,
    contexts: Conditioning,
    timesteps: jnp.ndarray,
    *,
    batch_size: int = 8,
    report_progress: bool = False,
    mesh: Mesh | None = None,
) -> ReferenceFeatures:
    """Evaluate each exemplar at every generation step j on its stored latent x_{T-j}, for every context.

    chains (E, T+1, 4, h, w); contexts: E*C entries exemplar-major, each exemplar's [empty prompt,
    inversion prompt] (or just one when equal). No step depends on another, so the E*T*C evaluations
    run as UNet batches of up to `batch_size` (static), each entry at its own timestep; with a `mesh`
    (static, axis "data") they are split evenly over its devices first. Padding repeats the last
    evaluation and is dropped. `report_progress` (static) ticks every batch. Returns features with a
    leading exemplar axis: hidden {path: (E, T, C, L, D)}, eps (E, T, 4, h, w).

    >>> features = reference_pass_many(unet, params["unet"], schedule, chain[None], contexts, timesteps)
    """
    exemplars, steps = chains.shape[0], timesteps.shape[0]
    count = contexts.size // exemplars
    items = exemplars * steps * count
    devices = 1 if mesh is None else mesh.size
    batches, per_batch = device_batches(items, devices, batch_size)
    item = parallel.pad_to(np.arange(items), devices * batches * per_batch)
    exemplar_of, step_of, context_of = item // (steps * count), item // count % steps, item % count
    inputs = ReferenceItems(
        chains[exemplar_of, steps - step_of], timesteps[step_of], contexts.take(exemplar_of * count + context_of)
    )

    def run(_: None, batch: ReferenceItems) -> tuple[None, tuple[dict, jnp.ndarray]]:
        x, t = batch.latents, batch.timesteps
        output, hidden = unet_output_recording(unet, params, x, t, batch.cond)
        eps = schedule.epsilon(output.astype(jnp.float32), x, schedule.alpha(t)[:, None, None, None])
        if report_progress:
            progress.tick(t[0])
        return None, (hidden, eps)

    def evaluate(params: Any, inputs: ReferenceItems) -> tuple[dict, jnp.ndarray]:
        batched = jax.tree_util.tree_map(lambda x: x.reshape(batches, per_batch, *x.shape[1:]), inputs)
        _, outputs = jax.lax.scan(run, None, batched)
        return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)

    if mesh is not None:
        evaluate = parallel.sharded(evaluate, mesh, (DATA,))
    outputs = evaluate(params, inputs)

    def by_step(x: jnp.ndarray) -> jnp.ndarray:
        return x[:items].reshape(exemplars, steps, count, *x.shape[1:])

    hidden, eps = jax.tree_util.tree_map(by_step, outputs)
    return ReferenceFeatures(hidden=hidden, eps=eps[:, :, -1], contexts=count)


def reference_pass(
    unet: Any, params: Any, schedule: DDIMSchedule, chain: jnp.ndarray, contexts: Conditioning, timesteps: jnp.ndarray
) -> ReferenceFeatures:
    """`reference_pass_many` of one exemplar's chain (T+1, 4, h, w) on one device: hidden {path: (T, C, L, D)}.

    >>> features = reference_pass(unet, params["unet"], schedule, chain, contexts, jnp.asarray(timesteps))
    """
    many = reference_pass_many(unet, params, schedule, chain[None], contexts, timesteps)
    return jax.tree_util.tree_map(lambda x: x[0], many)


def feature_bytes(unet: Any, params: Any, latent_shape: tuple[int, ...], contexts: Conditioning, steps: int) -> int:
    """Bytes `reference_pass` would keep for `steps` steps, from the shapes of one traced UNet call."""
    one = contexts.take(slice(0, 1))
    latents = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
    _, hidden = jax.eval_shape(lambda p, x, c: unet_output_recording(unet, p, x, jnp.int32(1), c), params, latents, one)
    per_entry = sum(int(np.prod(h.shape)) * jnp.dtype(h.dtype).itemsize for h in jax.tree_util.tree_leaves(hidden))
    eps = int(np.prod(latent_shape)) * 4
    return steps * (contexts.size * per_entry + eps)


def choose_reference_mode(mode: str, features: int, device_memory: int | None) -> str:
    """`keep` or `recompute`: `mode` itself unless it is `auto`, which keeps features that fit the budget."""
    if mode != "auto":
        return mode
    if device_memory is None:
        return "keep"
    return "keep" if features <= KEEP_MEMORY_FRACTION * device_memory else "recompute"
