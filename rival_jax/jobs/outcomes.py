"""What an augment job says about its work, whichever engine ran it (`jobs.augment`, `jobs.ray_job`): each
variation's metadata (`metadata`, what its record and `metadata.jsonl` carry) and the job's `Summary`."""

from __future__ import annotations

import dataclasses
from typing import Any

from rival_jax.data.sources import Row
from rival_jax.jobs.filtering import Decision


@dataclasses.dataclass
class Summary:
    generated: int = 0
    already_done: int = 0
    skipped_rows: int = 0
    failed_rows: int = 0
    dropped: int = 0
    converted: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Generation rate (dropped images included: the model made them), compile time excluded."""
        running = self.seconds - self.compile_seconds
        return self.generated / running if running > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every row was done, 1 when any row was skipped or failed."""
        return 1 if self.skipped_rows or self.failed_rows else 0

    def line(self) -> str:
        dropped = f", {self.dropped} of them dropped by the CLIP filters" if self.dropped else ""
        return (
            f"done: {self.generated} generated ({self.images_per_second:.2f} img/s, compile "
            f"{self.compile_seconds:.1f} s excluded){dropped}, {self.already_done} already done; "
            f"rows skipped: {self.skipped_rows}, rows failed: {self.failed_rows}"
        )


def metadata(row: Row, random_weights: bool, decision: Decision | None = None) -> dict[str, Any]:
    """What a variation's record and metadata say: the row's columns, then its label, identity, seed,
    prompt and settings, and the filters' CLIP score and verdict when they ran."""
    settings = {k: v for k, v in row.settings.items() if k != "config"}
    described = {
        **row.entry.columns,
        "label": row.label,
        "source_id": row.id,
        "source": row.entry.origin,
        "seed": settings["seed"],
        "prompt": settings["prompt"],
        "settings": settings,
        "random_weights": random_weights,
    }
    if decision is not None:
        described |= {"clip_image": decision.score, "dropped": not decision.kept}
    return described
