"""How a pipeline runs, defined once: `RivalPipeline.from_pretrained`, the CLI and config files all read `RunOptions`.

These are properties of the run, not of the method (those are `RivalConfig`): compute dtype, image
geometry, attention kernel, where the exemplar's features live, and which weight files to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax.errors import RivalError

DTYPE_NAMES = ("auto", "float32", "bfloat16")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
REFERENCE_MODES = ("auto", "keep", "recompute")
RESOLUTION_PATTERN = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None, type: type | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "type": type})


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Run options of a pipeline, validated on construction.

    Args:
        dtype: "auto" (float32 on CPU, bfloat16 on GPU/TPU), "float32" or "bfloat16".
        resolution: None (the model's own pixel budget: 512x512 for SD 1.5, 768x768 for SD 2 768,
            1024x1024 for SDXL), W (a budget of W x W pixels), or "WxH" (exactly W x H). With a
            budget the exemplar keeps its aspect ratio; sides are rounded to what the UNet needs.
        square_crop: centre-crop the exemplar to a square first (the authors' preprocessing).
        attention: injected self-attention kernel, "xla" (blockwise, anywhere) or "cudnn" (flash
            attention, NVIDIA GPUs, bfloat16).
        reference_mode: "keep" the exemplar's per-step features (fastest), "recompute" them in every
            step beside the variations (memory flat in the step count), or "auto" (keep when they
            fit a quarter of one device's memory).
        reference_batch_size: UNet batch of the exemplar's reference pass (memory against speed).
        variant: weight file variant to read, e.g. "fp16" (`*.fp16.safetensors`); found by itself
            when a folder holds only one variant.
        base_model: for a single-file checkpoint (one original-layout `.safetensors`), a diffusers
            folder or hub id of the same family that supplies configs, scheduler and tokenizers.
        controlnet: ControlNet folders or hub ids (one, or a list for several) whose residuals steer
            the generated images (SD 1.x/2.x).
        exemplar_batch: how many exemplars a job inverts, passes and generates together (`multi`);
            None = one per local device. Rows are batched only with rows of the same image size,
            steps, prompt contexts and settings.

    >>> RunOptions(resolution="768x512", reference_mode="recompute").size
    (768, 512)
    """

    dtype: str = _option("auto", "compute dtype (auto: float32 on CPU, bfloat16 on GPU/TPU)", DTYPE_NAMES)
    resolution: int | str | None = _option(
        None, "W (pixel budget W x W, aspect kept) or WxH (exact); default: the model's own"
    )
    square_crop: bool = _option(False, "centre-crop the exemplar to a square first")
    attention: str = _option(
        "xla", "injected attention kernel (cudnn: flash attention, NVIDIA GPUs, bf16)", ATTENTION_IMPLEMENTATIONS
    )
    reference_mode: str = _option(
        "auto", "exemplar features: keep (fastest), recompute (least memory) or auto", REFERENCE_MODES
    )
    reference_batch_size: int = _option(8, "UNet batch of the exemplar's reference pass (lower saves memory)")
    variant: str | None = _option(None, "weight file variant, e.g. fp16")
    base_model: str | None = _option(
        None, "for a single-file .safetensors model: a diffusers folder of its family (configs, tokenizers)"
    )
    controlnet: tuple[str, ...] = _option((), "ControlNet folder or hub id (repeat for several)")
    exemplar_batch: int | None = _option(
        None, "exemplars a job generates together (default: one per local device)", type=int
    )

    def __post_init__(self) -> None:
        names = self.controlnet
        object.__setattr__(self, "controlnet", tuple(names) if isinstance(names, (list, tuple)) else (names,))
        if not all(isinstance(name, (str, os.PathLike)) for name in self.controlnet):
            raise RivalError(f"controlnet {names!r} is not a folder or hub id (or a list of them)")
        for field in dataclasses.fields(self):
            choices = field.metadata["choices"]
            if choices and getattr(self, field.name) not in choices:
                raise RivalError(f"{field.name} {getattr(self, field.name)!r} is unknown: use {', '.join(choices)}")
        if not isinstance(self.square_crop, bool):
            raise RivalError(f"square_crop={self.square_crop!r} is not a boolean: use true or false")
        batch = self.reference_batch_size
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise RivalError(f"reference_batch_size={batch!r} is out of range: use an integer >= 1")
        count = self.exemplar_batch
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise RivalError(f"exemplar_batch={count!r} is out of range: use an integer >= 1")
        if self.variant is not None and (not isinstance(self.variant, str) or not self.variant.isidentifier()):
            raise RivalError(f"variant {self.variant!r} is not a variant name: use e.g. fp16")
        self.size  # noqa: B018 - validates the resolution

    @property
    def size(self) -> int | tuple[int, int] | None:
        """None, a pixel-budget side W, or an exact (W, H)."""
        value = self.resolution
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RivalError(f"resolution {value!r} is not a size: use W (e.g. 768) or WxH (e.g. 768x512)")
        match = RESOLUTION_PATTERN.match(str(value))
        if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
            raise RivalError(f"resolution {value!r} is not a size: use W (e.g. 768) or WxH (e.g. 768x512), above 0")
        return int(match[1]) if match[2] is None else (int(match[1]), int(match[2]))

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with `changes`; unknown names are an error."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise RivalError(f"unknown run option(s) {', '.join(unknown)}: known are {', '.join(FIELDS)}")
        return dataclasses.replace(self, **changes)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunOptions))


def add_run_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line flag per `RunOptions` field, from its definition (help, choices, type); absent = unset."""
    for field in dataclasses.fields(RunOptions):
        flag = "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": field.metadata["help"]}
        if isinstance(field.default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(field.default, tuple):
            kwargs["action"] = "append"
        elif field.metadata["choices"]:
            kwargs["choices"] = field.metadata["choices"]
        elif isinstance(field.default, int) or field.metadata["type"] is int:
            kwargs["type"] = int
        parser.add_argument(flag, **kwargs)


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
