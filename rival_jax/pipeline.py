"""`RivalPipeline`: one object, diffusers-style, that holds a checkpoint and runs RIVAL on it.

It turns user input (images, prompts, masks, seeds) into arrays and structs, and runs the compiled
programs of the pure core (`inversion.invert`, `reference.reference_pass`, `sampler.aligned_generate`
spread over devices by `parallel`), each compiled once per shape and kept.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rival_jax import images
from rival_jax.config import RivalConfig
from rival_jax.controls import control_inputs
from rival_jax.core import parallel, traces
from rival_jax.core.reference import (
    ReferenceFeatures,
    choose_reference_mode,
    feature_bytes,
    reference_batches,
)
from rival_jax.core.sampler import GenerationInputs, start_latents
from rival_jax.core.unet import Conditioning
from rival_jax.errors import RivalError
from rival_jax.executables import Executables
from rival_jax.models.loading import LoadedModels, load_models
from rival_jax.options import RunOptions, check_attention, resolve_dtype
from rival_jax.outputs import InversionChain, RivalOutput
from rival_jax.programs import Programs
from rival_jax.prompts import PromptEncoder

OutputType = Literal["pil", "np", "latent"]


class RandomWeightsWarning(UserWarning):
    """A built-in tiny model was loaded: its weights are random and its images are noise."""


def random_weights_notice(name: str, family: str) -> str:
    """The words the CLI and the Python API use for a model with random weights."""
    return f"built-in {name} model ({family}) with RANDOM weights - its images are noise"


# Built-in random checkpoints by name, and their family.
TINY_MODELS = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


class RivalPipeline:
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
        check_attention(self.options.attention, self.dtype)
        self.models, self.params = models, models.params
        unet, vae = models.unet, models.vae
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.default_side = int(unet.config.sample_size) * self.vae_factor
        if isinstance(self.options.size, tuple):
            self.image_size(self.options.size)  # an exact size must suit the UNet: checked before any work
        self.mesh = parallel.local_mesh()
        self.prompts = PromptEncoder(models)
        self._start_latents = jax.jit(start_latents, static_argnames="config")
        self.programs = Programs(models, self.options, self.mesh, self.controlnets, self.dtype)
        self._encode = jax.jit(self.programs.encode)
        self._decode = jax.jit(self.programs.decode)
        self.executables = Executables()
        self._run = self.executables.run
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
        from rival_jax.models.controlnet import check_controlnet, load_controlnet
        from rival_jax.models.random_models import tiny_checkpoint

        options = (options or RunOptions()).replace(**option_values)
        name = str(name_or_path)
        if name in TINY_MODELS and not Path(name).exists():
            tiny_cache = None if isinstance(cache_dir, bool) or cache_dir is None else Path(cache_dir)
            name_or_path = tiny_checkpoint(cache_dir=tiny_cache, family=TINY_MODELS[name])
        dtype = resolve_dtype(options.dtype)
        models = load_models(name_or_path, dtype, cache_dir, variant=options.variant, base_model=options.base_model)
        controlnets = [load_controlnet(name, dtype, cache_dir) for name in options.controlnet]
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

    def encode_image(self, image: Any) -> tuple[np.ndarray, jax.Array, tuple[int, int]]:
        """Preprocess an exemplar (path, PIL image or uint8 array) and VAE-encode it: (pixels, x_0, source size)."""
        picture = images.rgb_image(image)
        pixels = np.asarray(images.fit(picture, self.image_size(picture.size)))
        scaled = jnp.asarray(pixels.transpose(2, 0, 1)[None], dtype=self.dtype) / 127.5 - 1.0
        return pixels, self._encode(self.params["vae"], scaled)[0], picture.size

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Latents (N, 4, h, w) to images (N, H, W, 3) in [0, 1]."""
        return np.asarray(self._decode(self.params["vae"], jnp.asarray(latents)))

    def invert(
        self, image: Any, prompt: str = "", num_inference_steps: int = 50, show_progress: bool = False
    ) -> InversionChain:
        """DDIM-invert the exemplar with `prompt` (empty = null-prompt inversion).

        >>> chain = pipe.invert("photo.jpg", prompt="a photo of a lynx", num_inference_steps=50)
        """
        timesteps = self.models.schedule.timesteps(num_inference_steps)
        pixels, x0, source_size = self.encode_image(image)
        cond = self.encode_prompt([prompt], (pixels.shape[1], pixels.shape[0]))
        args = (self.params["unet"], self.models.schedule, x0, cond, jnp.asarray(timesteps))
        latents = self._run("inversion", self.programs.inversion, len(timesteps), show_progress, args)
        return InversionChain(latents, timesteps, prompt, pixels, source_size)

    @staticmethod
    def _context_prompts(chain: InversionChain) -> list[str]:
        return [""] if chain.prompt == "" else ["", chain.prompt]

    def contexts(self, chain: InversionChain) -> Conditioning:
        """The exemplar's guidance contexts: [empty prompt, inversion prompt], or one when they are equal."""
        return self.encode_prompt(self._context_prompts(chain), chain.size)

    def reference_pass(
        self, chain: InversionChain, show_progress: bool = False, contexts: Conditioning | None = None
    ) -> ReferenceFeatures:
        """The exemplar's features for every step and context (what reference mode "keep" stores).

        `contexts`: `self.contexts(chain)` where the caller has it already.
        """
        contexts = self.contexts(chain) if contexts is None else contexts
        per_device = parallel.spread(chain.num_inference_steps * contexts.size, self.mesh.size)[1]
        steps = reference_batches(per_device, self.options.reference_batch_size)[0] * self.mesh.size
        args = (self.params["unet"], self.models.schedule, chain.latents, contexts, jnp.asarray(chain.timesteps))
        features = self._run("reference pass", self.programs.reference, steps, show_progress, args)
        return jax.device_put(features, parallel.replicated(self.mesh))  # every device reads every step

    def reference_feature_bytes(self, chain: InversionChain) -> int:
        """Bytes the exemplar's stored features take (reference mode "keep"), from shapes alone."""
        key = (chain.latents.shape, len(self._context_prompts(chain)))
        if key not in self._feature_bytes:
            self._feature_bytes[key] = feature_bytes(
                self.models.unet,
                self.params["unet"],
                chain.latents.shape[1:],
                self.contexts(chain),
                chain.num_inference_steps,
            )
        return self._feature_bytes[key]

    def reference_mode(self, chain: InversionChain) -> str:
        """ "keep" or "recompute" for this chain: the option, or for "auto" the features' size against memory."""
        if self.options.reference_mode == "auto" and chain.reference is not None:
            return "keep"
        if self.options.reference_mode != "auto":
            return self.options.reference_mode
        return choose_reference_mode("auto", self.reference_feature_bytes(chain), parallel.device_memory_bytes())

    def start_latents(
        self, chain: InversionChain, indices: np.ndarray, seed: int, config: RivalConfig, region: np.ndarray
    ) -> jax.Array:
        """Start latents of variations `indices`; variation i depends only on (seed, i)."""
        key = jax.random.PRNGKey(seed)
        # The program is compiled per (static) config: key it by the two settings it reads, not the numbers.
        init = RivalConfig(latent_init=config.latent_init, latent_alignment=config.latent_alignment)
        return self._start_latents(key, jnp.asarray(indices), chain.latents[-1], jnp.asarray(region), init)

    def generate(
        self,
        chain: InversionChain,
        prompt: str | None = None,
        negative_prompt: str = "",
        num_variations: int | None = None,
        seed: int = 0,
        config: RivalConfig | None = None,
        latents: Any = None,
        mask: Any = None,
        output_type: OutputType = "pil",
        show_progress: bool = False,
        variation_indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        return_traces: bool = False,
    ) -> RivalOutput:
        """Generate `num_variations` images aligned to the exemplar's chain, spread over the local devices.

        Args:
            chain: from `invert`.
            prompt: the generated images' prompt (default: the inversion prompt, i.e. image variation).
            negative_prompt: of the generated images (SDXL: empty = zeros, see `prompts`).
            num_variations: how many images (default: as many as `latents`, else 1; ignored when
                `variation_indices` is given).
            seed: variation i of a seed always starts from fold_in(PRNGKey(seed), i).
            config: the method's settings (`RivalConfig`).
            latents: optional start latents (N, 4, h, w) that replace the initialisation.
            mask: inpainting region (white/True = regenerate): a PIL image at the exemplar's original
                size, or an array at the processed size or the latent size.
            output_type: "pil", "np" or "latent".
            show_progress: step bars on stderr.
            variation_indices: which variations of `seed` to make (default 0..num_variations-1);
                variation i is the same image whatever else is generated with it, on any device count.
            batch_size: pad the batch to at least this many (then to a multiple of the device count),
                so calls with different counts reuse one compiled program; the padding is dropped.
            control_image: with ControlNets loaded, each one's map (a list with several): a path, PIL
                image or uint8 array at the exemplar's size (or its processed size), or "canny" /
                `images.CannyEdges(sigma, low, high)` for the processed exemplar's Canny edges.
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end: per
                ControlNet (one value for all, or a list), as in diffusers' ControlNet pipelines.
            return_traces: also return per-step traces in `RivalOutput.traces` (`traces.GenerationTraces`:
                the exemplar's share of attention per layer, the latents' statistic distance to the
                chain). A separate compiled program; the images are the same as without.

        >>> out = pipe.generate(chain, prompt="a watercolor of a lynx", num_variations=4, seed=1)
        """
        config = config or RivalConfig()
        if output_type not in ("pil", "np", "latent"):
            raise RivalError(f"output_type {output_type!r} is unknown: use 'pil', 'np' or 'latent'")
        if variation_indices is None:
            if num_variations is None:
                num_variations = 1 if latents is None else len(latents)
            if not isinstance(num_variations, int) or num_variations < 1:
                raise RivalError(f"num_variations={num_variations!r} is out of range: use an integer >= 1")
            variation_indices = range(num_variations)
        indices = np.asarray(variation_indices, dtype=np.int32).reshape(-1)
        if indices.size == 0 or indices.min() < 0:
            raise RivalError("variation_indices must be a non-empty list of integers >= 0")
        control = control_inputs(
            self.controlnets,
            chain,
            self.dtype,
            control_image,
            (controlnet_conditioning_scale, control_guidance_start, control_guidance_end),
        )
        grid = tuple(chain.latents.shape[-2:])
        region = np.ones(grid, bool) if mask is None else images.mask_region(mask, chain.source_size, chain.size, grid)
        if latents is None:
            start = np.asarray(self.start_latents(chain, indices, seed, config, region))
        else:
            start = np.asarray(latents, dtype=np.float32)
            if start.shape != (indices.size, *chain.latents.shape[1:]):
                expected = (indices.size, *chain.latents.shape[1:])
                raise RivalError(f"latents have shape {start.shape}: expected {expected} (N, 4, h, w)")
        contexts = self.contexts(chain)
        mode = self.reference_mode(chain)
        if mode == "keep" and chain.reference is None:
            chain.reference = self.reference_pass(chain, show_progress, contexts)
        length = parallel.padded_length(max(indices.size, batch_size or 0), self.mesh)
        inputs = GenerationInputs(
            start=jax.device_put(parallel.pad_to(start, length), parallel.batch_sharding(self.mesh)),
            chain=chain.latents,
            conditioning=self.encode_prompt([negative_prompt, chain.prompt if prompt is None else prompt], chain.size),
            contexts=contexts,
            reference=chain.reference if mode == "keep" else None,
            region=jnp.asarray(region),
            settings=config.as_arrays(),
            timesteps=jnp.asarray(chain.timesteps),
            control=control,
        )
        per_variation, shared = parallel.split_per_variation(inputs)
        args = (self.params["unet"], per_variation, shared)
        steps = chain.num_inference_steps * self.mesh.size
        label = "generation (traces)" if return_traces else "generation"

        def program(ticks: bool) -> Callable[..., Any]:
            return self.programs.generation(ticks, return_traces)

        final = self._run(label, program, steps, show_progress, args, donate=("per_variation",))
        traced = None
        if return_traces:
            final, steps_traced = final
            layers = traces.attention_layers(self.models.unet, self.params["unet"], chain.latents.shape[1:], contexts)
            traced = traces.GenerationTraces.from_steps(steps_traced, indices.size, chain.timesteps, layers)
        final = np.asarray(final[: indices.size])
        if output_type == "latent":
            result: Any = final
        else:
            decoded = self.decode(final)
            result = decoded if output_type == "np" else images.to_pil(decoded)
        return RivalOutput(result, final, start, indices, seed, mode, traced)
