"""`RivalPipeline`: one object, diffusers-style, that holds a checkpoint and runs RIVAL on it.

It turns user input (images, prompts, masks, seeds) into arrays and structs (`inputs`), and runs the
compiled programs of the pure core (`programs`) on the local devices. One route: several exemplars
are the general case (`invert_many`, `generate_many`); `invert` and `generate` are a batch of one.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax import images
from rival_jax.config import RivalConfig
from rival_jax.core import parallel
from rival_jax.core.reference import ReferenceFeatures, device_batches, feature_bytes
from rival_jax.core.unet import Conditioning
from rival_jax.errors import RivalError
from rival_jax.models.loading import LoadedModels, load_models
from rival_jax.options import RunOptions, resolve_attention, resolve_dtype, resolve_reference_batch
from rival_jax.pipeline import inputs, programs
from rival_jax.pipeline.compiled import Executables
from rival_jax.pipeline.generation import Generation
from rival_jax.pipeline.programs import Program, Statics
from rival_jax.pipeline.prompts import PromptEncoder
from rival_jax.pipeline.results import InversionChain


class RandomWeightsWarning(UserWarning):
    """A built-in tiny model was loaded: its weights are random and its images are noise."""


def random_weights_notice(name: str, family: str) -> str:
    """The words the CLI and the Python API use for a model with random weights."""
    return f"built-in {name} model ({family}) with RANDOM weights - its images are noise"


# Built-in random checkpoints by name, and their family.
TINY_MODELS = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


class RivalPipeline(Generation):
    """RIVAL on a Flax Stable Diffusion checkpoint: SD 1.x, SD 2.x (epsilon or v-prediction) or SDXL.

    Args:
        models: a loaded checkpoint (`loading.load_models`), its params in `options.dtype`.
        options: run options (dtype, resolution, attention kernel, reference mode, ...).
        controlnets: loaded ControlNets (`models.controlnet.load_controlnet`) for structure control.

    >>> pipe = RivalPipeline.from_pretrained("tiny-sdxl")
    >>> chain = pipe.invert("exemplar.png", prompt="a photo of a cat", num_inference_steps=50)
    >>> out = pipe.generate(chain, num_variations=4, seed=0)
    >>> out.images[0].save("variation.png")
    """

    def __init__(
        self, models: LoadedModels, options: RunOptions | None = None, controlnets: Sequence[Any] = ()
    ) -> None:
        self.options = options or RunOptions()
        self.controlnets = tuple(controlnets)
        self.dtype = resolve_dtype(self.options.dtype)
        attention = resolve_attention(self.options.attention, self.dtype)
        self.models, self.params = models, models.params
        unet, vae = models.unet, models.vae
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.default_side = int(unet.config.sample_size) * self.vae_factor
        if isinstance(self.options.size, tuple):
            self.image_size(self.options.size)  # an exact size must suit the UNet: checked before any work
        self.mesh = parallel.local_mesh()
        self.prompts = PromptEncoder(models)
        modules = programs.Modules(unet, vae, models.schedule, self.dtype, tuple(c.module for c in self.controlnets))
        options = self.options
        # Every program's statics start from these (`dataclasses.replace` for a mesh or traces).
        self.statics = Statics(modules, self.mesh, attention, resolve_reference_batch(options.reference_batch_size))
        self.executables = Executables(shared=True)
        self._feature_bytes: dict[tuple, int] = {}

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        options: RunOptions | None = None,
        cache_dir: Path | str | bool | None = True,
        **option_values: Any,
    ) -> RivalPipeline:
        """Load a diffusers-format folder, a hub id, or a built-in random model ("tiny", "tiny-sd2", "tiny-sdxl").

        Args:
            name_or_path: the checkpoint.
            options: run options; `option_values` (any `RunOptions` field, e.g. dtype="bfloat16",
                resolution="768x512", reference_mode="recompute", controlnet="/models/controlnet-canny")
                override them. With ControlNets, `generate` takes `control_image=...`.
            cache_dir: where converted safetensors params are cached (True = default folder, None = off).

        >>> pipe = RivalPipeline.from_pretrained("/models/stable-diffusion-2-1", resolution=640)
        >>> pipe = RivalPipeline.from_pretrained("/models/sd15", controlnet="lllyasviel/sd-controlnet-canny")
        """
        from rival_jax.models.controlnet import check_controlnet, load_controlnet, resolve_controlnet_folder
        from rival_jax.models.random_models import tiny_checkpoint

        options = (options or RunOptions()).replace(**option_values)
        name = str(name_or_path)
        if name in TINY_MODELS and not Path(name).exists():
            tiny_cache = None if isinstance(cache_dir, bool) or cache_dir is None else Path(cache_dir)
            name_or_path = tiny_checkpoint(cache_dir=tiny_cache, family=TINY_MODELS[name])
        dtype = resolve_dtype(options.dtype)
        folders = [resolve_controlnet_folder(name) for name in options.controlnet]  # refusals before any weights
        models = load_models(name_or_path, dtype, cache_dir, variant=options.variant, base_model=options.base_model)
        controlnets = [load_controlnet(folder, dtype, cache_dir) for folder in folders]
        for loaded in controlnets:
            check_controlnet(loaded, models)
        if models.random_weights:
            notice = random_weights_notice(name, models.family)
            warnings.warn(f"{notice} (load a real checkpoint)", RandomWeightsWarning, stacklevel=2)
        return cls(models, options, controlnets)

    @property
    def random_weights(self) -> bool:
        """True for the built-in tiny models: random weights, their images are noise."""
        return self.models.random_weights

    def image_size(self, source_size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) an exemplar of `source_size` (W, H) is processed at, per the run options."""
        options = self.options
        return images.target_size(source_size, options.size, self.default_side, self.size_multiple, options.square_crop)

    def encode_prompt(self, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """Conditioning (one entry per prompt) for images of `size` (W, H); see `prompts`."""
        return self.prompts(self.params, prompts, size)

    def _run(
        self,
        label: str,
        function: Any,
        args: tuple,
        steps: int = 1,
        show: bool = False,
        donate: tuple[str, ...] = (),
        **statics: Any,
    ) -> Any:
        """Run program `function` with the pipeline's statics (`statics` replaced) through `executables`."""
        program = Program(function, dataclasses.replace(self.statics, **statics), donate)
        return self.executables.run(label, program, steps, show, args)

    def encode_image(self, image: Any) -> tuple[np.ndarray, jax.Array, tuple[int, int]]:
        """Preprocess an exemplar (path, PIL image or uint8 array) and VAE-encode it: (pixels, x_0, source size)."""
        picture = images.rgb_image(image)
        pixels = np.asarray(images.fit(picture, self.image_size(picture.size)))
        scaled = jnp.asarray(pixels.transpose(2, 0, 1)[None], dtype=self.dtype) / 127.5 - 1.0
        return pixels, self._run("encode", programs.encode, (self.params["vae"], scaled), mesh=None)[0], picture.size

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Latents (N, 4, h, w) to images (N, H, W, 3) in [0, 1]."""
        return np.asarray(self._run("decode", programs.decode, (self.params["vae"], jnp.asarray(latents)), mesh=None))

    def invert(
        self, image: Any, prompt: str = "", num_inference_steps: int = 50, show_progress: bool = False
    ) -> InversionChain:
        """DDIM-invert the exemplar with `prompt` (empty = null-prompt inversion): `invert_many` of one.

        >>> chain = pipe.invert("photo.jpg", prompt="a photo of a lynx", num_inference_steps=50)
        """
        return self.invert_many([image], [prompt], num_inference_steps, show_progress)[0]

    def invert_many(
        self, exemplars: Sequence[Any], prompts: Sequence[str], num_inference_steps: int, show_progress: bool = False
    ) -> list[InversionChain]:
        """DDIM-invert several exemplars as one UNet batch split over the local devices (one chain each).

        Args:
            exemplars: paths, PIL images or uint8 arrays that come out the same size (`image_size`).
            prompts: each exemplar's inversion prompt.
            num_inference_steps: T.
            show_progress: a step bar on stderr.

        >>> chains = pipe.invert_many(["a.jpg", "b.jpg"], ["a cat", "a dog"], 50)
        """
        timesteps = self.models.schedule.timesteps(num_inference_steps)
        encoded = [self.encode_image(exemplar) for exemplar in exemplars]
        if len({pixels.shape for pixels, _, _ in encoded}) > 1:
            sizes = sorted({f"{p.shape[1]}x{p.shape[0]}" for p, _, _ in encoded})
            raise RivalError(
                f"exemplars inverted together must come out one size, not {', '.join(sizes)}: group by size"
            )
        size = (encoded[0][0].shape[1], encoded[0][0].shape[0])
        used, per_device = parallel.spread(len(encoded), self.mesh.size)
        order = parallel.pad_to(np.arange(len(encoded)), used * per_device)
        batch = programs.InversionInputs(
            x0=jnp.stack([encoded[k][1] for k in order]),
            cond=Conditioning.concat([self.encode_prompt([prompts[k]], size) for k in order]),
            timesteps=jnp.asarray(timesteps),
        )
        mesh = parallel.sub_mesh(self.mesh, used)
        args = (self.params["unet"], parallel.place(batch, mesh))
        chains = np.asarray(
            self._run("inversion", programs.inversion, args, num_inference_steps * used, show_progress, mesh=mesh)
        )
        return [
            InversionChain(jnp.asarray(chains[k]), timesteps, prompt, pixels, source)
            for k, ((pixels, _, source), prompt) in enumerate(zip(encoded, prompts, strict=True))
        ]

    def contexts(self, chain: InversionChain) -> Conditioning:
        """The exemplar's guidance contexts (`inputs.context_prompts`)."""
        return self.encode_prompt(inputs.context_prompts(chain.prompt), chain.size)

    def reference_pass(self, chain: InversionChain, show_progress: bool = False) -> ReferenceFeatures:
        """The exemplar's features for every step and context (what reference mode "keep" stores).

        >>> features = pipe.reference_pass(chain)
        """
        features = inputs.entry(self._reference_many([chain], show_progress), 0)
        return jax.device_put(features, parallel.replicated(self.mesh))  # every device reads every step

    def _reference_many(self, chains: Sequence[InversionChain], show: bool = False) -> ReferenceFeatures:
        """The reference passes of same-size chains stacked (E, ...), their E*T*C evaluations split over the devices."""
        contexts = Conditioning.concat([self.contexts(chain) for chain in chains])
        items = chains[0].num_inference_steps * contexts.size
        steps = device_batches(items, self.mesh.size, self.statics.reference_batch_size)[0] * self.mesh.size
        batch = programs.ReferenceInputs(
            jnp.stack([c.latents for c in chains]), contexts, jnp.asarray(chains[0].timesteps)
        )
        args = (self.params["unet"], parallel.place(batch, self.mesh))
        return self._run("reference pass", programs.reference, args, steps, show, mesh=self.mesh)

    def reference_feature_bytes(self, chain: InversionChain) -> int:
        """Bytes the exemplar's stored features take (reference mode "keep"), from shapes alone."""
        key = (chain.latents.shape, inputs.context_count(chain.prompt))
        if key not in self._feature_bytes:
            unet, params = self.models.unet, self.params["unet"]
            contexts, steps = self.contexts(chain), chain.num_inference_steps
            self._feature_bytes[key] = feature_bytes(unet, params, chain.latents.shape[1:], contexts, steps)
        return self._feature_bytes[key]

    def reference_mode(self, chain: InversionChain) -> str:
        """ "keep" or "recompute" for this chain: the option, or for "auto" the features' size against memory."""
        return self._reference_mode([chain], chain.reference is not None, 1)

    def _reference_mode(self, chains: Sequence[InversionChain], kept: bool, per_device: int) -> str:
        def size() -> int:
            return self.reference_feature_bytes(chains[0]) * per_device

        return inputs.reference_mode(self.options.reference_mode, kept, size, parallel.device_memory_bytes())

    def start_latents(
        self, chain: InversionChain, indices: np.ndarray, seed: int, config: RivalConfig, region: np.ndarray
    ) -> jax.Array:
        """Start latents of variations `indices`; variation i depends only on (seed, i)."""
        start = programs.StartInputs(
            jax.random.PRNGKey(seed), jnp.asarray(indices), chain.latents[-1], jnp.asarray(region)
        )
        init = {"latent_init": config.latent_init, "latent_alignment": config.latent_alignment}
        return self._run("start latents", programs.start, (start,), mesh=None, **init)
