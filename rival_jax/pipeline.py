"""`RivalPipeline`: one object, diffusers-style, that holds the models and runs RIVAL.

It owns the compiled programs (one each for encoding, inversion, the reference pass, start latents,
aligned generation and decoding) and turns user input into arrays; the math lives in pure functions
(`inversion`, `sampler`, `attention`) that take the params pytree explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rival_jax import images, parallel, progress
from rival_jax.config import REFERENCE_BATCH_SIZE, RivalConfig
from rival_jax.errors import RivalError
from rival_jax.inversion import invert
from rival_jax.loading import LoadedModels, load_models
from rival_jax.sampler import ReferenceFeatures, aligned_generate, reference_batches, reference_pass, start_latents

OutputType = Literal["pil", "np", "latent"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass
class InversionChain:
    """An exemplar's DDIM inversion chain and what made it.

    latents: (T+1, 4, h, w), x_0 (the encoded exemplar) first, x_T last.
    reference: the exemplar's per-step features; `RivalPipeline.generate` fills it on first use and
        every later call with this chain reuses it.
    """

    latents: jax.Array
    timesteps: np.ndarray
    prompt: str
    image: np.ndarray
    reference: ReferenceFeatures | None = None

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])


@dataclasses.dataclass(frozen=True)
class RivalOutput:
    """Generated variations: `images` per `output_type`, plus the latents and the indices that seed them."""

    images: Any
    latents: np.ndarray
    start_latents: np.ndarray
    indices: np.ndarray
    seed: int


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """ "auto" is float32 on CPU and bfloat16 on accelerators; names or JAX dtypes pass through."""
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RivalError(f"dtype {dtype!r} is not supported: use auto, {' or '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def check_attention(attention: str, dtype: jnp.dtype) -> None:
    """Raise a one-line RivalError unless the injected-attention backend can run with this dtype here."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise RivalError(f"attention {attention!r} is unknown: use {' or '.join(ATTENTION_IMPLEMENTATIONS)}")
    if attention == "cudnn" and jnp.dtype(dtype).itemsize != 2:
        raise RivalError("attention 'cudnn' (flash attention) needs bfloat16: use dtype bfloat16 or attention xla")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise RivalError("attention 'cudnn' needs an NVIDIA GPU: use attention xla on this machine")


class RivalPipeline:
    """RIVAL on a Flax Stable Diffusion 1.x checkpoint.

    >>> pipe = RivalPipeline.from_pretrained("tiny")
    >>> chain = pipe.invert("exemplar.png", prompt="a photo of a cat", num_inference_steps=50)
    >>> out = pipe.generate(chain, num_variations=4, seed=0)
    """

    def __init__(
        self,
        models: LoadedModels,
        dtype: jnp.dtype = jnp.float32,
        resolution: int | None = None,
        attention: str = "xla",
        reference_batch_size: int = REFERENCE_BATCH_SIZE,
    ) -> None:
        check_attention(attention, dtype)
        if not isinstance(reference_batch_size, int) or reference_batch_size < 1:
            raise RivalError(f"reference_batch_size={reference_batch_size!r} is out of range: use an integer >= 1")
        self.attention = attention
        self.reference_batch_size = reference_batch_size
        self.models = models
        self.dtype = dtype
        self.params = models.params
        unet, vae = models.unet, models.vae
        self.vae_scale = float(vae.config.scaling_factor)
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        multiple = vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.resolution = resolution or int(unet.config.sample_size) * vae_factor
        if not isinstance(self.resolution, int) or self.resolution < multiple or self.resolution % multiple:
            raise RivalError(f"resolution {resolution!r} is not supported: use a multiple of {multiple}")
        self.latent_size = self.resolution // vae_factor
        self.mesh = parallel.local_mesh()
        self._start_latents = jax.jit(start_latents, static_argnames="config")
        self._encode = jax.jit(self._encode_fn)
        self._decode = jax.jit(self._decode_fn)
        self._text = jax.jit(lambda ids, params: models.text_encoder(ids, params=params)[0])
        self._executables: dict[tuple, Any] = {}

    def program(self, name: str, report_progress: bool = False) -> Any:
        """The jit-able program `name` of the UNet, with or without per-step progress callbacks."""
        unet = self.models.unet
        if name == "invert":
            return functools.partial(invert, unet, report_progress=report_progress)
        if name == "reference_pass":
            return functools.partial(
                reference_pass, unet, batch_size=self.reference_batch_size, report_progress=report_progress
            )
        generate = functools.partial(
            aligned_generate, unet, report_progress=report_progress, attention_implementation=self.attention
        )
        return parallel.over_variations(generate, self.mesh, num_args=9, batch_arg=4)

    def _run(self, name: str, steps: int, show_progress: bool, *args: Any) -> Any:
        """Compile program `name` for these argument shapes once (kept), then run it, with a step bar if asked.

        Compiling ahead of the run keeps compile time out of the step timings the bar shows.
        """
        leaves, structure = jax.tree_util.tree_flatten(args)
        shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
        signature = (name, show_progress, structure, shapes)
        if signature not in self._executables:
            donate = (4,) if name == "generate" else ()  # the padded start latents, made for this call
            program = jax.jit(self.program(name, show_progress), donate_argnums=donate)
            self._executables[signature] = program.lower(*args).compile()
        with progress.progress_bar(name.replace("_", " "), steps, show_progress):
            return jax.block_until_ready(self._executables[signature](*args))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        dtype: Any = "auto",
        cache_dir: Path | str | bool | None = True,
        resolution: int | None = None,
        attention: str = "xla",
        reference_batch_size: int = REFERENCE_BATCH_SIZE,
    ) -> RivalPipeline:
        """Load a diffusers-format SD 1.x folder, a hub id, or "tiny" (the built-in random tiny model).

        `cache_dir`: where converted safetensors params are cached (True = default folder, None = off).
        `resolution`: image size in pixels (default: the UNet's sample size times the VAE factor).
        `dtype`: "auto" (float32 on CPU, bfloat16 on GPU/TPU), "float32", "bfloat16" or a JAX dtype.
        `attention`: backend of the injected self-attention, "xla" or "cudnn" (NVIDIA flash attention).
        `reference_batch_size`: UNet batch of the exemplar's reference pass (memory against speed).
        """
        from rival_jax.random_models import tiny_checkpoint

        dtype = resolve_dtype(dtype)
        if str(name_or_path) == "tiny" and not Path("tiny").exists():
            tiny_cache = None if isinstance(cache_dir, bool) or cache_dir is None else Path(cache_dir)
            name_or_path = tiny_checkpoint(cache_dir=tiny_cache)
        models = load_models(name_or_path, dtype=dtype, cache_dir=cache_dir)
        return cls(models, dtype, resolution, attention, reference_batch_size)

    @property
    def random_weights(self) -> bool:
        """True for the built-in tiny model: random weights, its images are noise."""
        return self.models.random_weights

    def _encode_fn(self, params: Any, pixels: jnp.ndarray) -> jnp.ndarray:
        vae = self.models.vae
        posterior = vae.apply({"params": params}, pixels, method=vae.encode).latent_dist
        return posterior.mean.transpose(0, 3, 1, 2).astype(jnp.float32) * self.vae_scale

    def _decode_fn(self, params: Any, latents: jnp.ndarray) -> jnp.ndarray:
        vae = self.models.vae
        decoded = vae.apply({"params": params}, (latents / self.vae_scale).astype(self.dtype), method=vae.decode)
        return jnp.clip(decoded.sample.astype(jnp.float32).transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)

    def encode_prompt(self, prompts: list[str]) -> jax.Array:
        """CLIP last hidden states (B, 77, D) for prompts, padded to the tokenizer's length."""
        tokenizer = self.models.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
        ).input_ids
        return self._text(ids, self.params["text_encoder"])

    def encode_image(self, image: Any) -> tuple[np.ndarray, jax.Array]:
        """Preprocess an exemplar (path, PIL image or uint8 array) and VAE-encode it: (pixels, x_0)."""
        pixels = images.exemplar_array(image, self.resolution)
        scaled = jnp.asarray(pixels.transpose(2, 0, 1)[None], dtype=self.dtype) / 127.5 - 1.0
        return pixels, self._encode(self.params["vae"], scaled)[0]

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Latents (N, 4, h, w) to images (N, H, W, 3) in [0, 1]."""
        return np.asarray(self._decode(self.params["vae"], jnp.asarray(latents)))

    def invert(
        self, image: Any, prompt: str = "", num_inference_steps: int = 50, show_progress: bool = False
    ) -> InversionChain:
        """DDIM-invert the exemplar with `prompt` (empty = null-prompt inversion)."""
        timesteps = self.models.schedule.timesteps(num_inference_steps)
        pixels, x0 = self.encode_image(image)
        text = self.encode_prompt([prompt])
        chain = self._run(
            "invert",
            num_inference_steps,
            show_progress,
            self.params["unet"],
            self.models.schedule,
            x0,
            text,
            jnp.asarray(timesteps),
        )
        return InversionChain(latents=chain, timesteps=timesteps, prompt=prompt, image=pixels)

    def reference_pass(self, chain: InversionChain, show_progress: bool = False) -> ReferenceFeatures:
        """The exemplar's features for every step, for the empty and the inversion prompt (once if equal)."""
        prompts = [""] if chain.prompt == "" else ["", chain.prompt]
        contexts = self.encode_prompt(prompts)
        return self._run(
            "reference_pass",
            reference_batches(chain.num_inference_steps * len(prompts), self.reference_batch_size)[0],
            show_progress,
            self.params["unet"],
            chain.latents,
            contexts,
            jnp.asarray(chain.timesteps),
        )

    def start_latents(
        self,
        chain: InversionChain,
        indices: np.ndarray,
        seed: int,
        config: RivalConfig,
        region: np.ndarray,
    ) -> jax.Array:
        """Start latents of variations `indices`; variation i depends only on (seed, i)."""
        key = jax.random.PRNGKey(seed)
        return self._start_latents(key, jnp.asarray(indices), chain.latents[-1], jnp.asarray(region), config)

    def generate(
        self,
        chain: InversionChain,
        prompt: str | None = None,
        negative_prompt: str = "",
        num_variations: int = 1,
        seed: int = 0,
        config: RivalConfig | None = None,
        latents: Any = None,
        mask: Any = None,
        output_type: OutputType = "pil",
        show_progress: bool = False,
        variation_indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> RivalOutput:
        """Generate `num_variations` images aligned to the exemplar's chain, spread over the local devices.

        prompt: the generated images' prompt (default: the inversion prompt, i.e. image variation).
        latents: optional start latents (N, 4, h, w) that replace the initialisation.
        mask: inpainting region (white/True = regenerate), at the exemplar's processed size or latent size.
        variation_indices: which variations of `seed` to make (default 0..num_variations-1); variation i
            is the same image whatever else is generated with it and however many devices there are.
        batch_size: pad the batch to at least this many (then to a multiple of the device count), so
            calls with different counts reuse one compiled program; the padding is dropped.
        """
        config = config or RivalConfig()
        if output_type not in ("pil", "np", "latent"):
            raise RivalError(f"output_type {output_type!r} is unknown: use 'pil', 'np' or 'latent'")
        if variation_indices is None:
            if not isinstance(num_variations, int) or num_variations < 1:
                raise RivalError(f"num_variations={num_variations!r} is out of range: use an integer >= 1")
            variation_indices = range(num_variations)
        indices = np.asarray(variation_indices, dtype=np.int32).reshape(-1)
        if indices.size == 0 or indices.min() < 0:
            raise RivalError("variation_indices must be a non-empty list of integers >= 0")
        size = self.latent_size
        region = np.ones((size, size), bool) if mask is None else images.mask_region(mask, self.resolution, size)
        if latents is None:
            start = np.asarray(self.start_latents(chain, indices, seed, config, region))
        else:
            start = np.asarray(latents, dtype=np.float32)
            if start.shape != (indices.size, 4, size, size):
                raise RivalError(
                    f"latents have shape {start.shape}: expected {(indices.size, 4, size, size)} (N, 4, h, w)"
                )
        length = parallel.padded_length(max(indices.size, batch_size or 0), self.mesh)
        batch = jax.device_put(parallel.pad_to(start, length), parallel.batch_sharding(self.mesh))
        if chain.reference is None:
            chain.reference = self.reference_pass(chain, show_progress)
        texts = self.encode_prompt([negative_prompt, chain.prompt if prompt is None else prompt])
        final = self._run(
            "generate",
            chain.num_inference_steps * self.mesh.size,
            show_progress,
            self.params["unet"],
            self.models.schedule,
            chain.reference,
            chain.latents,
            batch,
            texts,
            jnp.asarray(region),
            config.as_arrays(),
            jnp.asarray(chain.timesteps),
        )[: indices.size]
        if output_type == "latent":
            result: Any = np.asarray(final)
        else:
            decoded = self.decode(final)
            result = decoded if output_type == "np" else images.to_pil(decoded)
        return RivalOutput(images=result, latents=np.asarray(final), start_latents=start, indices=indices, seed=seed)


def exemplar_image(chain: InversionChain) -> Image.Image:
    """The preprocessed exemplar the chain was inverted from."""
    return Image.fromarray(chain.image)
