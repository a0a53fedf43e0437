"""What reference mode "keep" stores for the full SD 1.5, SD 2.1 and SDXL architectures, from shapes alone.

Nothing is computed or allocated: the UNet's self-attention inputs are traced with `jax.eval_shape`
on abstract params. Compare the figures with one device's memory (reference mode "auto" keeps the
features when they take at most a quarter of it).

    python scripts/reference_memory.py                  # native sizes, 50 steps
    python scripts/reference_memory.py --steps 30 --side 768
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from diffusers import FlaxUNet2DConditionModel

from rival_jax.core.reference import feature_bytes
from rival_jax.core.unet import Conditioning
from rival_jax.models.architectures import FULL
from rival_jax.models.checkpoints import params_layout

NATIVE_SIDE = {"sd1": 512, "sd2": 768, "sdxl": 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="inference steps (default: 50)")
    parser.add_argument("--side", type=int, help="square image side in pixels (default: each family's own)")
    args = parser.parse_args()
    print("family | image | steps | dtype | GiB, one context | GiB, two contexts (exemplar prompt)")
    for family, native in NATIVE_SIDE.items():
        side = args.side or native
        arch = FULL[family]
        for dtype in (jnp.float32, jnp.bfloat16):
            unet = FlaxUNet2DConditionModel(**arch.unet, dtype=dtype)
            params = jax.tree_util.tree_map(lambda s, d=dtype: jax.ShapeDtypeStruct(s.shape, d), params_layout(unet))
            added = None
            if arch.unet.get("addition_embed_type") == "text_time":
                pooled = arch.text_encoders[-1]["projection_dim"]
                added = {"text_embeds": jnp.zeros((2, pooled), dtype), "time_ids": jnp.zeros((2, 6), dtype)}
            cond = Conditioning(text=jnp.zeros((2, 77, arch.unet["cross_attention_dim"]), dtype), added=added)
            sizes = [
                feature_bytes(unet, params, (4, side // 8, side // 8), cond.take(slice(0, c)), args.steps) / 2**30
                for c in (1, 2)
            ]
            name = jnp.dtype(dtype).name
            print(f"{family} | {side}x{side} | {args.steps} | {name} | {sizes[0]:.2f} | {sizes[1]:.2f}")


if __name__ == "__main__":
    main()
