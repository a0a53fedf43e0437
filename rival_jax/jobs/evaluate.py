"""`rival-jax evaluate`: scores a `generate` or `augment` output folder; metrics.json, metrics.csv, report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def evaluate_folder(
    folder: Path,
    clip: str = DEFAULT_CLIP,
    inception: Path | None = None,
    kid_features: str | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
    report: bool = True,
) -> dict[str, Any]:
    """Score every image of an output folder and write metrics.json, metrics.csv (and report.html).

    Args:
        folder: a `generate` (rival.json) or `augment` (records-*.jsonl) output folder.
        clip: CLIP model folder, hub id, or "tiny" (random weights, for tests).
        inception: FID Inception weights (.pth, .safetensors or .npz) for KID; None uses CLIP image features.
        kid_features: "inception" or "clip" (default: inception when a file is given, else clip).
        cache_dir: cache of converted weights (default: the package's cache folder).
        seed: seeds k-means palettes and KID's subsets.
        report: also write report.html.

    Returns:
        The summary written under "summary" in metrics.json: clip_image, clip_text, palette, kid,
        kid_std (x10^3), diversity, each a float or None where it cannot be computed.

    >>> evaluate_folder(Path("rival-output"), clip="openai/clip-vit-large-patch14")["clip_image"]
    """
    raise NotImplementedError("being written on branch metrics")
