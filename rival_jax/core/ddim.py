"""DDIM schedule and the one deterministic step that both inversion and generation take.

The noise schedule comes from diffusers' `FlaxDDIMScheduler` built from the checkpoint's scheduler
config with the settings of docs/method.md ("DDIM") forced (eta = 0, `set_alpha_to_one=False`,
`steps_offset=1`, no sample clipping), whatever scheduler the checkpoint ships (SDXL's is Euler).
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
from diffusers import FlaxDDIMScheduler
from flax import struct

from rival_jax.errors import RivalError

DDIM_OVERRIDES = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
PREDICTION_TYPES = ("epsilon", "v_prediction")


@struct.dataclass
class DDIMSchedule:
    """abar(t) for every training timestep, abar used for 'before t = 0', and what the UNet predicts."""

    alphas_cumprod: jnp.ndarray
    final_alpha_cumprod: jnp.ndarray
    num_train_timesteps: int = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @classmethod
    def from_scheduler_config(cls, config: dict) -> DDIMSchedule:
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise RivalError(
                f"scheduler prediction_type={prediction!r} is not supported: use a checkpoint that predicts "
                f"{' or '.join(PREDICTION_TYPES)} (SD 1.x, SD 2.x, SDXL)"
            )
        accepted = inspect.signature(FlaxDDIMScheduler.__init__).parameters
        settings = {k: v for k, v in config.items() if k in accepted} | DDIM_OVERRIDES
        scheduler = FlaxDDIMScheduler.from_config(settings)
        state = scheduler.create_state()
        return cls(
            alphas_cumprod=state.common.alphas_cumprod,
            final_alpha_cumprod=state.final_alpha_cumprod,
            num_train_timesteps=scheduler.config.num_train_timesteps,
            prediction_type=prediction,
        )

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Generation order, e.g. 981, 961, ..., 1 for 50 steps ('leading' spacing, offset 1)."""
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise RivalError(
                f"num_inference_steps={num_inference_steps!r} is out of range: use 1..{self.num_train_timesteps}"
            )
        stride = self.num_train_timesteps // num_inference_steps
        return (np.arange(num_inference_steps) * stride)[::-1].astype(np.int32) + DDIM_OVERRIDES["steps_offset"]

    def stride(self, num_inference_steps: int) -> int:
        return self.num_train_timesteps // num_inference_steps

    def alpha(self, t: jnp.ndarray) -> jnp.ndarray:
        """abar(t), with abar(0) standing in for any t < 0 (`set_alpha_to_one=False`)."""
        return jnp.where(t >= 0, self.alphas_cumprod[jnp.maximum(t, 0)], self.final_alpha_cumprod)

    def epsilon(self, output: jnp.ndarray, x: jnp.ndarray, alpha: jnp.ndarray) -> jnp.ndarray:
        """The UNet's output on latents x at noise level abar=alpha, as a noise prediction.

        v-prediction: eps = sqrt(abar) v + sqrt(1 - abar) x, with the abar of the latent being stepped.
        """
        if self.prediction_type == "epsilon":
            return output
        return jnp.sqrt(alpha) * output + jnp.sqrt(1.0 - alpha) * x


def ddim_step(x: jnp.ndarray, eps: jnp.ndarray, alpha_from: jnp.ndarray, alpha_to: jnp.ndarray) -> jnp.ndarray:
    """Move x from noise level abar=alpha_from to alpha_to along eps (eta = 0).

    Denoising uses alpha_to > alpha_from, inversion the reverse; the formula is the same.
    """
    x0 = (x - jnp.sqrt(1.0 - alpha_from) * eps) / jnp.sqrt(alpha_from)
    return jnp.sqrt(alpha_to) * x0 + jnp.sqrt(1.0 - alpha_to) * eps
