"""PyTorch diffusers' SDXL ControlNet outputs on the tiny SDXL model, for `tests/test_controlnet_sdxl.py`.

Writes the tiny random SDXL checkpoint and SDXL ControlNet with rival-jax's own make-tiny code (PyTorch
layout), loads them in PyTorch diffusers (`ControlNetModel`, `StableDiffusionXLControlNetPipeline` with
`DDIMScheduler` configured as rival-jax's DDIM) and stores, compactly, in tests/data/parity/:

- `sdxl_controlnet_map.png`: the control map (white shapes' edges on black, 128x128);
- `sdxl_controlnet.npz`: the residuals' fixed inputs and the residuals (scale 0.7), the start latents and
  the final latents of two generations (scale 1; scale 0.5 active from 25% to 75% of the steps);
- `sdxl_controlnet.json`: the settings, the SHA-256 of the weight files (the tests rebuild them and check)
  and the library versions.

Needs the offline torch CPU wheel (never a dependency of rival-jax); runs in about a minute on a CPU:

    python scripts/make_sdxl_controlnet_reference.py
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rival_jax.core.ddim import DDIM_OVERRIDES
from rival_jax.models.random_controlnet import write_tiny_controlnet
from rival_jax.models.random_models import write_tiny_checkpoint

PARITY = Path(__file__).resolve().parents[1] / "tests" / "data" / "parity"
SIDE, STEPS, GUIDANCE, PROMPT = 128, 4, 5.0, "a photo of a cat"
RESIDUAL_SCALE = 0.7
# (conditioning scale, guidance start, guidance end) of each stored generation.
CASES = {"full": (1.0, 0.0, 1.0), "half": (0.5, 0.25, 0.75)}
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors")


def tiny_models(root: Path) -> Path:
    """The tiny SDXL checkpoint (seed 0) with its ControlNet (seed 1) in `controlnet/`, PyTorch layout."""
    base = write_tiny_checkpoint(root / "tiny-sdxl", seed=0, weight_format="safetensors", family="sdxl")
    write_tiny_controlnet(base / "controlnet", base, seed=1, weight_format="safetensors")
    return base


def weights_digest(base: Path) -> dict[str, str]:
    return {name: hashlib.sha256((base / name).read_bytes()).hexdigest() for name in WEIGHTS}


def control_map() -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 28, 90, 100), outline="white", width=2)
    draw.ellipse((60, 10, 118, 68), outline="white", width=2)
    draw.line((0, 120, 127, 90), fill="white", width=2)
    return image


def main() -> None:
    import diffusers
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionXLControlNetPipeline

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    arrays = {
        "sample": rng.standard_normal((2, 4, 8, 8), np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 8, 64), np.float32),
        "text_embeds": rng.standard_normal((2, 32), np.float32),
        "time_ids": np.tile(np.float32([[64, 64, 0, 0, 64, 64]]), (2, 1)),
        "control": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "start": rng.standard_normal((1, 4, SIDE // 8, SIDE // 8), np.float32),
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_models(Path(tmp))
        digest = weights_digest(base)
        controlnet, info = ControlNetModel.from_pretrained(base / "controlnet", output_loading_info=True)
        assert not any(info.values()), info  # every weight read, none left over
        image = torch.from_numpy(arrays["control"].transpose(2, 0, 1)[None] / 255.0).float()
        with torch.no_grad():
            down, mid = controlnet(
                torch.from_numpy(arrays["sample"]),
                torch.tensor(500),
                torch.from_numpy(arrays["encoder_hidden_states"]),
                torch.cat([image, image]),
                conditioning_scale=RESIDUAL_SCALE,
                added_cond_kwargs={k: torch.from_numpy(arrays[k]) for k in ("text_embeds", "time_ids")},
                return_dict=False,
            )
        for i, residual in enumerate(down):
            arrays[f"down_{i}"] = residual.numpy()
        arrays["mid"] = mid.numpy()
        config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
        scheduler = DDIMScheduler.from_config({**config, **DDIM_OVERRIDES})
        pipe = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=controlnet, scheduler=scheduler)
        for name, (scale, start, end) in CASES.items():
            arrays[f"final_{name}"] = pipe(
                PROMPT,
                image=control_map(),
                height=SIDE,
                width=SIDE,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                latents=torch.from_numpy(arrays["start"]),
                controlnet_conditioning_scale=scale,
                control_guidance_start=start,
                control_guidance_end=end,
                output_type="latent",
            ).images.numpy()
        timesteps = scheduler.timesteps.tolist()
    control_map().save(PARITY / "sdxl_controlnet_map.png")
    np.savez_compressed(PARITY / "sdxl_controlnet.npz", **arrays)
    meta = {
        "prompt": PROMPT,
        "negative_prompt": None,
        "side": SIDE,
        "steps": STEPS,
        "timesteps": timesteps,
        "guidance_scale": GUIDANCE,
        "residual_timestep": 500,
        "residual_scale": RESIDUAL_SCALE,
        "cases": CASES,
        "weights_sha256": digest,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    (PARITY / "sdxl_controlnet.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {PARITY / 'sdxl_controlnet.npz'} ({(PARITY / 'sdxl_controlnet.npz').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
