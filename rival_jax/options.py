"""How a pipeline runs, defined once: `RivalPipeline.from_pretrained`, the CLI and config files all read `RunOptions`.

These are properties of the run, not of the method (those are `RivalConfig`): compute dtype, image
geometry, attention kernel, where the exemplar's features live, and which weight files to read.
Every options dataclass (these and the jobs') declares its fields with `option`, is checked by
`check_types` and becomes command-line flags through `add_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from typing import Any

import jax
import jax.numpy as jnp

from rival_jax.errors import RivalError

DTYPE_NAMES = ("auto", "float32", "bfloat16")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")
REFERENCE_MODES = ("auto", "keep", "recompute")
RESOLUTION_PATTERN = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: tuple[str, ...] | None = None,
    type: type | None = None,
    *,
    flags: tuple[str, ...] = (),
    negative: tuple[str, str] | None = None,
    nargs: str | None = None,
    kind: str = "",
    positional: bool = False,
) -> Any:
    """A field of an options dataclass with what its command-line argument needs (see `add_arguments`).

    Args:
        default: the value when nothing sets it; none makes the field a required positional argument.
        help: the argument's help line.
        choices: the accepted values.
        type: the argument's type where the default does not tell it (int, float, bool for a None default).
        flags: the flags (default: `--field-name`).
        negative: (flag, help) of a second flag that sets the field False, e.g. ("--no-progress", "no bars").
        nargs: argparse's nargs, e.g. "+" for a list of values.
        kind: what the value must be, for messages ("a folder path").
        positional: a positional argument even though it has a default (then it may be left out).

    >>> seed: int = option(0, "random seed (default: 0)", kind="an integer")
    """
    metadata = {"help": help, "choices": choices, "type": type, "flags": flags, "negative": negative}
    return dataclasses.field(
        default=default, metadata=metadata | {"nargs": nargs, "kind": kind, "positional": positional}
    )


def _accepted(hint: Any) -> tuple[Any, ...]:
    """The runtime types a type hint admits: `str | None` -> (str, NoneType), `tuple[int, ...]` -> (tuple,)."""
    union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    return tuple(typing.get_origin(arg) or arg for arg in (typing.get_args(hint) if union else (hint,)))


def check_types(options: Any) -> None:
    """Every field holds a value of its annotated type (say from a config file); paths become text, lists tuples."""
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        value, accepted = getattr(options, field.name), _accepted(hints[field.name])
        if isinstance(value, os.PathLike) or (tuple in accepted and isinstance(value, list)):
            value = os.fspath(value) if isinstance(value, os.PathLike) else tuple(value)
            object.__setattr__(options, field.name, value)
        items = value if isinstance(value, tuple) else ()
        wrong_bool = any(isinstance(v, bool) for v in (value, *items)) and bool not in accepted
        wrong_item = not all(isinstance(v, int) for v in items)
        if wrong_bool or wrong_item or not isinstance(value, accepted) or (str in accepted and value == ""):
            kind = field.metadata["kind"]
            raise RivalError(f"{field.name}={value!r} is not {kind}: fix it in the config file or on the command line")
        choices = field.metadata["choices"]
        if choices and value is not None and value not in choices:
            raise RivalError(f"{field.name} {value!r} is unknown: use {', '.join(choices)}")


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
        reference_batch_size: UNet batch of the exemplar's reference pass (memory against speed); None:
            8 on a GPU or TPU, 1 on a CPU (`resolve_reference_batch`).
        variant: weight file variant to read, e.g. "fp16" (`*.fp16.safetensors`); found by itself
            when a folder holds only one variant.
        base_model: for a single-file checkpoint (one original-layout `.safetensors`), a diffusers
            folder or hub id of the same family that supplies configs, scheduler and tokenizers.
        controlnet: ControlNet folders or hub ids (one, or a list for several) whose residuals steer
            the generated images (SD 1.x/2.x).
        exemplar_batch: how many exemplars a job inverts, passes and generates together (`RivalPipeline.generate_many`);
            None = one per local device. Rows are batched only with rows of the same image size,
            steps, prompt contexts and settings.

    >>> RunOptions(resolution="768x512", reference_mode="recompute").size
    (768, 512)
    """

    dtype: str = option("auto", "compute dtype (auto: float32 on CPU, bfloat16 on GPU/TPU)", DTYPE_NAMES)
    resolution: int | str | None = option(
        None, "W (pixel budget W x W, aspect kept) or WxH (exact); default: the model's own"
    )
    square_crop: bool = option(False, "centre-crop the exemplar to a square first")
    attention: str = option(
        "xla",
        "injected attention kernel: xla (blockwise, anywhere), cudnn (flash, NVIDIA GPUs, bf16), pallas (flash, TPU), "
        "auto (pallas on TPU, cudnn on NVIDIA GPUs in bf16, else xla)",
        ATTENTION_IMPLEMENTATIONS,
    )
    reference_mode: str = option(
        "auto", "exemplar features: keep (fastest), recompute (least memory) or auto", REFERENCE_MODES
    )
    reference_batch_size: int | None = option(
        None,
        "UNet batch of the exemplar's reference pass (default: 8 on GPU/TPU, 1 on CPU; lower saves memory)",
        type=int,
    )
    variant: str | None = option(None, "weight file variant, e.g. fp16")
    base_model: str | None = option(
        None, "for a single-file .safetensors model: a diffusers folder of its family (configs, tokenizers)"
    )
    controlnet: tuple[str, ...] = option((), "ControlNet folder or hub id (repeat for several)")
    exemplar_batch: int | None = option(
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
        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
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


def add_arguments(parser: argparse.ArgumentParser, options_class: type) -> None:
    """One command-line argument per field of an options dataclass, from its definition; absent = unset.

    A field without a default is a positional argument (one marked `positional` may be left out); a
    boolean is a switch; a tuple default without `nargs` is a repeated flag; `choices`, `type` and
    `nargs` come from the field's `option`. Absent arguments stay out of the parsed namespace, so
    defaults, config files and the command line can be layered.

    >>> add_arguments(parser, RunOptions)  # --dtype, --resolution, --square-crop, ...
    """
    for field in dataclasses.fields(options_class):
        meta = field.metadata
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if field.default is dataclasses.MISSING:
            parser.add_argument(field.name, nargs=meta["nargs"], **kwargs)
            continue
        kwargs["default"] = argparse.SUPPRESS
        if meta["positional"]:
            parser.add_argument(field.name, nargs="?", **kwargs)
            continue
        value_type = meta["type"] or type(field.default)
        if value_type is bool:
            kwargs["action"] = "store_true"
        elif isinstance(field.default, tuple) and not meta["nargs"]:
            kwargs["action"] = "append"
        else:
            kwargs |= {"choices": meta["choices"], "nargs": meta["nargs"]}
            kwargs |= {"type": value_type} if value_type in (int, float) else {}
        parser.add_argument(*(meta["flags"] or ["--" + field.name.replace("_", "-")]), dest=field.name, **kwargs)
        if meta["negative"]:
            flag, text = meta["negative"]
            parser.add_argument(flag, dest=field.name, action="store_false", default=argparse.SUPPRESS, help=text)


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """ "auto" is float32 on CPU and bfloat16 on accelerators; names or JAX dtypes pass through."""
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RivalError(f"dtype {dtype!r} is not supported: use auto, {' or '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def resolve_attention(attention: str, dtype: jnp.dtype) -> str:
    """The injected layers' kernel for `attention` on this backend: "auto" picks pallas on TPU, cudnn on an
    NVIDIA GPU in bfloat16, xla elsewhere; other names are checked (`check_attention`) and kept.

    >>> resolve_attention("auto", jnp.float32)  # on a CPU
    'xla'
    """
    if attention == "auto":
        return auto_attention(jax.default_backend(), dtype)
    check_attention(attention, dtype)
    return attention


def resolve_reference_batch(size: int | None, platform: str | None = None) -> int:
    """The reference pass's UNet batch on `platform` (default: this backend): `size`, else 8 on a GPU or TPU
    and 1 on a CPU, where larger batches of full-size attention are slower per evaluation
    (docs/performance.md#reference-pass-batches).

    >>> resolve_reference_batch(None, "tpu")
    8
    """
    if size is not None:
        return size
    return 1 if (platform or jax.default_backend()) == "cpu" else 8


def auto_attention(platform: str, dtype: jnp.dtype) -> str:
    """What "auto" picks on `platform` ("tpu", "gpu", "cpu"): pallas on TPU, cudnn on an NVIDIA GPU in a
    16-bit dtype, xla elsewhere.

    >>> auto_attention("gpu", jnp.bfloat16)
    'cudnn'
    """
    if platform == "tpu":
        return "pallas"
    return "cudnn" if platform == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def check_attention(attention: str, dtype: jnp.dtype) -> None:
    """Raise a one-line RivalError unless the injected-attention backend can run with this dtype here."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise RivalError(f"attention {attention!r} is unknown: use {' or '.join(ATTENTION_IMPLEMENTATIONS)}")
    if attention == "pallas" and jax.default_backend() != "tpu":
        raise RivalError("attention 'pallas' needs a TPU: use attention xla (or auto) on this machine")
    if attention == "cudnn" and jnp.dtype(dtype).itemsize != 2:
        raise RivalError("attention 'cudnn' (flash attention) needs bfloat16: use dtype bfloat16 or attention xla")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise RivalError("attention 'cudnn' needs an NVIDIA GPU: use attention xla on this machine")
