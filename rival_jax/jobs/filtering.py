"""An augment job's filters: each variation's CLIP image similarity to its exemplar, `--keep-best K` and
`--min-clip-image X`.

The score is the cosine of projected CLIP image features (`metrics.clip`, the score `evaluate` reports
as `clip_image`). A row's variations are decided together, once all of them are generated: the K most
similar are kept (ties: the lower variation index), then any below X is dropped. Every decision, kept
or dropped, is returned with its score, so the job records both and a rerun regenerates neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from rival_jax.errors import RivalError


@dataclasses.dataclass(frozen=True)
class Decision:
    """One variation's fate: its CLIP image score and whether it is kept."""

    index: int
    score: float
    kept: bool


@dataclasses.dataclass(frozen=True)
class ClipFilter:
    """`--keep-best` and `--min-clip-image` over a loaded `metrics.clip.Clip`.

    Args:
        clip: the scoring CLIP (`metrics.clip.load_clip`).
        keep_best: keep this many of a row's variations (the most similar), or None for all.
        min_clip_image: drop any variation scoring below this, or None.

    >>> ClipFilter(load_clip("tiny"), keep_best=2).decide(exemplar, {0: a, 1: b, 2: c})
    [Decision(index=0, score=0.91, kept=True), ...]
    """

    clip: Any
    keep_best: int | None = None
    min_clip_image: float | None = None

    def check_row(self, num_variations: int) -> None:
        """A row must generate at least the K it keeps."""
        if self.keep_best is not None and num_variations < self.keep_best:
            raise RivalError(
                f"num_variations {num_variations} is below --keep-best {self.keep_best}: generate at least K (-n)"
            )

    def scores(self, exemplar: Image.Image, variations: list[Image.Image]) -> list[float]:
        """CLIP image similarity of each variation to the exemplar."""
        from rival_jax.metrics.clip import cosine

        features = self.clip.image_features([exemplar, *variations])
        return [float(score) for score in cosine(features[1:], features[:1])]

    def decide(self, exemplar: Image.Image, variations: dict[int, Image.Image]) -> list[Decision]:
        """Every variation of a row (variation index -> image) scored, kept or dropped, in index order."""
        indices = sorted(variations)
        scores = dict(zip(indices, self.scores(exemplar, [variations[i] for i in indices]), strict=True))
        ranked = sorted(indices, key=lambda i: (-scores[i], i))
        best = set(ranked if self.keep_best is None else ranked[: self.keep_best])
        floor = -2.0 if self.min_clip_image is None else self.min_clip_image
        return [Decision(i, scores[i], i in best and scores[i] >= floor) for i in indices]
