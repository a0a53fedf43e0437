"""A run's programs and their inputs from shapes alone: a checkpoint's modules and abstract params (no
weights), and each program's inputs built as the pipeline builds them, laid out by `parallel`.

Every builder mirrors the pipeline's own (`RivalPipeline.invert_many`, `_reference_many`,
`generate_many`, `decode`; `scripts/benchmark.py`'s plain baseline) on the same `parallel` helpers,
so a plan compiles the programs a run compiles, for the same meshes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from rival_jax import images
from rival_jax.config import RivalConfig
from rival_jax.core import parallel
from rival_jax.core.ddim import DDIMSchedule
from rival_jax.core.reference import device_batches
from rival_jax.core.sampler import GenerationInputs
from rival_jax.core.unet import Conditioning
from rival_jax.errors import RivalError
from rival_jax.models.architectures import FULL, TINY
from rival_jax.models.checkpoints import build_diffusers_module, read_json
from rival_jax.models.families import FAMILIES, detect_family
from rival_jax.pipeline import TINY_MODELS, baseline, programs

TOKENS = 77  # CLIP's sequence length: every prompt's text embedding
REFERENCE_LABEL = "reference pass"


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """A checkpoint as shapes: `modules` (programs.Modules), `params` {"unet", "vae"} of ShapeDtypeStructs.

    label: what it is ("SD 1.5", "tiny SD 1.x", a folder); latent: (4, h, w) of a square exemplar at
    the run's resolution, `size` (W, H) its pixels.
    """

    label: str
    family: str
    modules: programs.Modules
    params: dict[str, Any]
    latent: tuple[int, int, int]
    size: tuple[int, int]

    def cond(self, *leading: int) -> Conditioning:
        """A prompt's conditioning, `leading` entries, as `PromptEncoder` makes it (SDXL: pooled and time ids)."""
        unet, dtype = self.modules.unet, self.modules.dtype
        text = jax.ShapeDtypeStruct((*leading, TOKENS, unet.config.cross_attention_dim), dtype)
        if unet.config.addition_embed_type != "text_time":
            return Conditioning(text)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {
            "text_embeds": jax.ShapeDtypeStruct((*leading, pooled), dtype),
            "time_ids": jax.ShapeDtypeStruct((*leading, 6), dtype),
        }
        return Conditioning(text, added)

    def latents(self, *leading: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((*leading, *self.latent), jnp.float32)


def model_shapes(model: str | None, family: str | None, dtype: Any, size: Any, square_crop: bool) -> ModelShapes:
    """The modules and abstract params of `family`'s full architecture, or of `model`'s configs (no weights read).

    Args:
        model: a local diffusers folder, or a built-in tiny model name ("tiny", "tiny-sdxl"); None with `family`.
        family: "sd1", "sd2" or "sdxl": the full architecture.
        dtype: the compute dtype (params are cast to it, as a run casts them).
        size: `RunOptions.size` (None: the model's own pixel budget); square_crop: `RunOptions.square_crop`.

    >>> shapes = model_shapes(None, "sdxl", jnp.bfloat16, 1024, True)
    """
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    if family is not None:
        if family not in FAMILIES:
            raise RivalError(f"family {family!r} is unknown: use {', '.join(FAMILIES)}")
        arch = FULL[family]
        configs, label = (arch.unet, arch.vae, arch.scheduler), arch.label
    elif model in TINY_MODELS and not Path(model).exists():
        family = TINY_MODELS[model]
        arch = TINY[family]
        configs, label = (arch.unet, arch.vae, arch.scheduler), arch.label
    else:
        folder = Path(str(model)).expanduser()
        if not (folder / "model_index.json").is_file():
            raise RivalError(
                f"plan reads a model's configs from a local diffusers folder, and {model} is none: "
                "pass the folder that holds model_index.json, a tiny model, or --family sd1|sd2|sdxl"
            )
        family = detect_family(folder, read_json(folder / "model_index.json"))
        names = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")
        configs, label = tuple(read_json(folder / name) for name in names), str(folder)
    unet, unet_params, _ = build_diffusers_module(FlaxUNet2DConditionModel, configs[0], dtype)
    vae, vae_params, _ = build_diffusers_module(FlaxAutoencoderKL, configs[1], dtype)
    schedule = DDIMSchedule.from_scheduler_config(configs[2])
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    side = int(unet.config.sample_size) * vae_factor
    width, height = images.target_size((side, side), size, side, multiple, square_crop)
    params = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(p.shape, dtype), {"unet": unet_params, "vae": vae_params}
    )
    modules = programs.Modules(unet, vae, schedule, dtype)
    return ModelShapes(label, family, modules, params, (4, height // vae_factor, width // vae_factor), (width, height))


@dataclasses.dataclass(frozen=True)
class Call:
    """One program as a run calls it: `label`, `program`, `args` laid out on the devices; `trips`: how many
    times XLA's cost analysis undercounts it (a loop body is counted once)."""

    label: str
    program: programs.Program
    args: tuple
    trips: int


def inversion(shapes: ModelShapes, statics: programs.Statics, exemplars: int, steps: int) -> Call:
    """`invert_many` of `exemplars`: the batch padded to an even split over the fewest devices."""
    used, per_device = parallel.spread(exemplars, statics.mesh.size)
    batch = programs.InversionInputs(shapes.latents(used * per_device), shapes.cond(used * per_device), _times(steps))
    mesh = parallel.sub_mesh(statics.mesh, used)
    args = (parallel.abstract(shapes.params["unet"], mesh), parallel.abstract(batch, mesh))
    return Call("inversion", programs.Program(programs.inversion, dataclasses.replace(statics, mesh=mesh)), args, steps)


def reference(shapes: ModelShapes, statics: programs.Statics, exemplars: int, steps: int, contexts: int) -> Call:
    """`_reference_many` of `exemplars` chains: E*T*C evaluations over every device, in UNet batches."""
    mesh = statics.mesh
    batch = programs.ReferenceInputs(
        shapes.latents(exemplars, steps + 1), shapes.cond(exemplars * contexts), _times(steps)
    )
    trips = device_batches(steps * contexts * exemplars, mesh.size, statics.reference_batch_size)[0]
    args = (parallel.abstract(shapes.params["unet"], mesh), parallel.abstract(batch, mesh))
    return Call(REFERENCE_LABEL, programs.Program(programs.reference, statics), args, trips)


def generation(shapes: ModelShapes, statics: programs.Statics, work: tuple[int, int, int, int], features: Any) -> Call:
    """`generate_many` of `work` = (exemplars, variations, steps, contexts) on their `exemplar_mesh`;
    `features`: the reference pass's output for the padded exemplars ("keep"), or None ("recompute")."""
    exemplars, variations, steps, contexts = work
    mesh = parallel.exemplar_mesh(statics.mesh, exemplars, variations)
    rows, columns = mesh.devices.shape
    padded = parallel.padded_length(exemplars, rows)
    batch = GenerationInputs(
        start=shapes.latents(padded, parallel.padded_length(variations, columns)),
        chain=shapes.latents(padded, steps + 1),
        conditioning=shapes.cond(padded, 2),
        contexts=shapes.cond(padded, contexts),
        reference=features,
        region=jax.ShapeDtypeStruct((padded, *shapes.latent[1:]), jnp.bool_),
        settings=jax.eval_shape(RivalConfig().as_arrays),
        timesteps=_times(steps),
    )
    program = programs.Program(
        programs.generation, dataclasses.replace(statics, mesh=mesh), GenerationInputs.PER_VARIATION
    )
    args = (parallel.abstract(shapes.params["unet"], mesh), parallel.abstract(batch, mesh))
    return Call(f"generation ({'keep' if features is not None else 'recompute'})", program, args, steps)


def decode(shapes: ModelShapes, statics: programs.Statics, images_count: int) -> Call:
    """`decode` of every generated image at once, on the first device (a run decodes with no mesh)."""
    device = SingleDeviceSharding(statics.mesh.devices.flat[0])
    args = tuple(
        jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
        for tree in (shapes.params["vae"], shapes.latents(images_count))
    )
    return Call("VAE decode", programs.Program(programs.decode, dataclasses.replace(statics, mesh=None)), args, 1)


def plain(shapes: ModelShapes, statics: programs.Statics, images_count: int, steps: int) -> Call:
    """Plain SD's generation of `images_count` images over every device (CFG + DDIM, diffusers' attention)."""
    mesh = statics.mesh
    start = shapes.latents(parallel.padded_length(images_count, mesh.size))
    batch = programs.PlainInputs(start, shapes.cond(2), _times(steps), np.float32(7.0))
    args = (parallel.abstract(shapes.params["unet"], mesh), parallel.abstract(batch, mesh))
    statics = dataclasses.replace(statics, attention=None)
    return Call("plain SD", programs.Program(baseline.plain, statics), args, steps)


def _times(steps: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((steps,), jnp.int32)
