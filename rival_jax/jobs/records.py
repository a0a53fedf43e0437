"""An augmentation output's records as `evaluate` reads them: each kept image with its exemplar and prompt.

The records are written by the job's sink (`data.sinks`, `data.records`); only a local files-format
output has images `evaluate` can open one by one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rival_jax.data.records import load_records
from rival_jax.errors import RivalError


@dataclasses.dataclass(frozen=True)
class Record:
    """One kept image: its job key and variation, its file (relative to the output), its exemplar, its prompt,
    and whether the generator had random weights (None where the record does not say)."""

    key: str
    variation_index: int
    file: str
    image: Path
    prompt: str
    random_weights: bool | None


def read_records(output: Path) -> list[Record]:
    """Every kept image any process of the job recorded in the local files-format `output`, in process order.

    Records of items a filter dropped are left out; an output of shards is a `RivalError`.

    >>> [r.file for r in read_records(Path("augmented"))]  # ["images/cat/a_v0000.png", ...]
    """
    records = load_records(output)
    shards = [r["file"] for r in records if r["file"] is not None and not r["file"].startswith("images/")]
    if shards:
        raise RivalError(
            f"{output} holds shards ({shards[0]}): evaluate reads files outputs; run augment with --output-format files"
        )
    found = []
    for record in records:
        if record["file"] is None:
            continue
        metadata = record["metadata"]
        exemplar, prompt = Path(str(metadata.get("source", ""))), str(metadata.get("prompt", ""))
        weights = metadata.get("random_weights") if isinstance(metadata.get("random_weights"), bool) else None
        found.append(Record(record["key"], record["variation_index"], record["file"], exemplar, prompt, weights))
    return found
