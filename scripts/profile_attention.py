"""Time one UNet self-attention layer: diffusers' own against RIVAL's injected replacement and fusion.

The generation's extra cost over plain SD sits in these layers (the rest of the UNet is unchanged),
so this isolates it. The batch is laid out as in generation, [uncond x N, cond x N], against one
exemplar input per guidance group. Defaults: SD 1.5's first-block layer at 512x512 (64x64 = 4096
tokens, 8 heads of 40) for 4 variations.

    python scripts/profile_attention.py
    python scripts/profile_attention.py --tokens 1024 --batch 8      # SD 1.5 at 256x256
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from benchmark import Program  # scripts/benchmark.py, beside this file
from diffusers.models.attention_flax import FlaxAttention

from rival_jax import RivalError
from rival_jax.core.attention import FUSION, REPLACEMENT, inject_reference, own_reference
from rival_jax.options import check_attention, resolve_dtype


class SelfAttention(nn.Module):
    """A transformer block's self-attention, named as diffusers names it."""

    heads: int
    head_dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = self.heads * self.head_dim
        return FlaxAttention(width, self.heads, self.head_dim, dtype=self.dtype, name="attn1")(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="UNet batch, 2 x variations (uncond + cond)")
    parser.add_argument("--tokens", type=int, default=4096, help="spatial tokens of the layer")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla", help="injected attention backend")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (fastest kept)")
    args = parser.parse_args()
    for option in ("batch", "tokens", "heads", "head_dim", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.batch % 2:
        parser.error("--batch must be even: it holds [uncond x N, cond x N]")

    dtype = resolve_dtype(args.dtype)
    check_attention(args.attention, dtype)
    module = SelfAttention(args.heads, args.head_dim, dtype)
    width = args.heads * args.head_dim
    hidden = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.tokens, width), dtype)
    reference = jax.random.normal(jax.random.PRNGKey(1), (2, args.tokens, width), dtype)
    params = module.init(jax.random.PRNGKey(2), hidden[:1])

    variants = {
        "diffusers self-attention": contextlib.nullcontext,
        f"self-attention, {args.attention} kernel": lambda: own_reference(args.attention),
        "replacement": lambda: inject_reference({("attn1",): reference}, REPLACEMENT, args.attention),
        "fusion": lambda: inject_reference({("attn1",): reference}, FUSION, args.attention),
    }
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); dtype {dtype.__name__}; batch {args.batch}, ", end="")
    print(f"{args.tokens} tokens, {args.heads} heads of {args.head_dim}; fastest of {args.repeats} runs")
    baseline = None
    for name, context in variants.items():

        def layer(p: dict, x: jnp.ndarray, context=context) -> jnp.ndarray:
            with context():
                return module.apply(p, x)

        program = Program(layer, params, hidden)
        for _ in range(args.repeats):
            program.run()
        seconds = program.seconds
        baseline = baseline or seconds
        print(f"{name:>32} | {1000 * seconds:9.1f} ms | {seconds / baseline:.2f}x")


if __name__ == "__main__":
    try:
        main()
    except RivalError as error:
        sys.exit(f"profile_attention: error: {error}")
