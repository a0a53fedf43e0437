"""RIVAL settings as data: one frozen dataclass, validated on construction.

The numeric settings travel into the compiled programs as traced scalars (see `as_arrays`), so
changing `t_align` or the guidance scale between calls reuses the compiled generation program.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from rival_jax.errors import RivalError

LatentInit = Literal["shuffle", "adaptive_gaussian", "exemplar"]
LATENT_INITS: tuple[str, ...] = ("shuffle", "adaptive_gaussian", "exemplar")


@dataclasses.dataclass(frozen=True)
class RivalConfig:
    """How the generation chain is aligned to the exemplar's inversion chain.

    Timesteps are on the scheduler's 0..999 scale. Paper meaning (docs/method.md):

    - `guidance_scale`: classifier-free guidance m on the generated images only.
    - `t_align`: cross-image attention uses the exemplar's keys/values alone while t > t_align
      (replacement), exemplar and generated keys/values concatenated once t <= t_align (fusion).
    - `t_early`: AdaIN of the guided noise onto the exemplar's noise while t > t_early.
    - `editing_start`: no attention injection while t > editing_start (structure-preserving
      editing uses about 900; the default 1000 never suppresses it).
    - `latent_init`: start latent of each variation: "shuffle" (spatial permutation of x_T),
      "adaptive_gaussian" (Gaussian with x_T's per-channel mean and std), "exemplar" (x_T itself,
      for editing).

    Ablation switches of paper Table 3, all on by default:

    - `attention_injection` (AI): cross-image self-attention at all.
    - `early_replacement` (AF): the replacement stage; off means fusion at every step.
    - `latent_alignment` (LI): the aligned start latent; off means a standard Gaussian start.
    - `noise_alignment` (NA): AdaIN of the noise prediction in early steps.
    """

    guidance_scale: float = 7.0
    t_align: int = 600
    t_early: int = 600
    editing_start: int = 1000
    latent_init: LatentInit = "shuffle"
    attention_injection: bool = True
    early_replacement: bool = True
    latent_alignment: bool = True
    noise_alignment: bool = True

    def __post_init__(self) -> None:
        for name in ("t_align", "t_early", "editing_start"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise RivalError(f"{name}={value!r} is not an integer")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise RivalError(f"guidance_scale={self.guidance_scale!r} is not a number")
        for name in ("t_align", "t_early"):
            value = getattr(self, name)
            if not 0 <= value <= 999:
                raise RivalError(f"{name}={value!r} is out of range: use an integer timestep in 0..999")
        if not 0 <= self.editing_start <= 1000:
            raise RivalError(
                f"editing_start={self.editing_start!r} is out of range: use an integer in 0..1000 "
                "(1000 = inject at every step)"
            )
        if self.latent_init not in LATENT_INITS:
            raise RivalError(f"latent_init={self.latent_init!r} is unknown: use one of {', '.join(LATENT_INITS)}")
        if not 0.0 <= float(self.guidance_scale) <= 100.0:
            raise RivalError(f"guidance_scale={self.guidance_scale!r} is out of range: use a value in 0..100")

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> RivalConfig:
        """Build from a mapping such as a JSON/YAML config file; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RivalError(f"unknown setting(s) {', '.join(unknown)}: known settings are {', '.join(sorted(known))}")
        return cls(**values)

    def as_arrays(self) -> dict[str, jnp.ndarray]:
        """The settings the sampler reads at run time, as traced-friendly scalars."""
        return {
            "guidance_scale": jnp.float32(self.guidance_scale),
            "t_align": jnp.int32(self.t_align),
            "t_early": jnp.int32(self.t_early),
            "editing_start": jnp.int32(self.editing_start),
            "attention_injection": jnp.bool_(self.attention_injection),
            "early_replacement": jnp.bool_(self.early_replacement),
            "noise_alignment": jnp.bool_(self.noise_alignment),
        }
