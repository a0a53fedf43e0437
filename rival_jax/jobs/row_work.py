"""One augment process's rows, whichever engine runs them (`jobs.augment`, `jobs.ray_engine`).

Each row is read and keyed (`data.sources.load_row`) and checked against the filters; its variations
finished before (by any process) are set aside, the rest generated (`jobs.row_groups.run_rows`),
scored and decided by the filters (`jobs.filtering`), described (`jobs.outcomes.metadata`) and added
to the process's sink. The engine keeps its own counts through two callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from PIL import Image

from rival_jax.data.sinks import Item
from rival_jax.data.sources import Row, load_row
from rival_jax.errors import RivalError
from rival_jax.jobs.filtering import ClipFilter
from rival_jax.jobs.outcomes import metadata
from rival_jax.jobs.row_groups import Exemplar, Report, run_rows

# loaded(row, key, converted to RGB, the variation indices finished before)
Loaded = Callable[[Row, str, bool, list[int]], None]
# made(exemplar, variation index, image (None: dropped by the filters), its metadata, kept)
Made = Callable[[Exemplar, int, "Image.Image | None", dict[str, Any], bool], None]


def augment_rows(
    pipe: Any,
    shares: Iterable[tuple[Row, list[int]]],
    done: set[tuple[str, int]],
    *,
    model: str,
    batch_size: int,
    sink: Any,
    clip_filter: ClipFilter | None,
    report: Report,
    loaded: Loaded,
    made: Made,
) -> None:
    """Generate the unfinished (row, variation index) items of `shares` into `sink`.

    Args:
        pipe: the loaded `RivalPipeline`.
        shares: (row, variation indices) of this process, read lazily in order.
        done: (key, variation index) of the items finished before (`sink.finished()`).
        model: the model's name in every row's key.
        batch_size: variations per compiled batch.
        sink: this process's sink (`data.sinks.open_sink`), or None: `made` keeps the images.
        clip_filter: `--keep-best`/`--min-clip-image`, or None (with `--keep-best` whole rows are made
            again for the ranking; their finished items are not added twice).
        report: report(row id, "skipped" | "failed", message) for a row that cannot be made.
        loaded, made: the engine's callbacks for each readable row and each new variation.

    >>> augment_rows(pipe, [(row, [0, 1])], sink.finished(), model="tiny", batch_size=4, sink=sink,
    ...     clip_filter=None, report=report, loaded=lambda *_: None, made=lambda *_: None)
    """
    whole_rows = clip_filter is not None and clip_filter.keep_best is not None

    def work() -> Iterable[tuple[Exemplar, list[int]]]:
        for row, indices in shares:
            try:
                image, key, converted = load_row(row, model=model)
                if clip_filter is not None:
                    clip_filter.check_row(row.settings["num_variations"])
            except RivalError as error:
                report(row.id, "skipped", str(error))
                continue
            finished = [i for i in indices if (key, i) in done]
            loaded(row, key, converted, finished)
            todo = [i for i in indices if i not in finished]
            if todo:
                yield Exemplar(row, image, key), indices if whole_rows else todo

    def save(exemplar: Exemplar, images: list[tuple[int, Image.Image]]) -> None:
        """A row's variations (all of them when filtering: CLIP scores a row at once), kept or dropped."""
        row = exemplar.row
        decisions = clip_filter.decide(exemplar.image, dict(images)) if clip_filter else [None] * len(images)
        for (index, image), decision in zip(images, decisions, strict=True):
            if (exemplar.key, index) in done:
                continue  # finished before: made again only for --keep-best's ranking
            kept = decision is None or decision.kept
            described = metadata(row, pipe.random_weights, decision)
            if sink is not None:
                item = Item(exemplar.key, index, row.name, described, exemplar.image.size)
                sink.add(item, image if kept else None)
            made(exemplar, index, image if kept else None, described, kept)

    run_rows(pipe, work(), batch_size, save, report, whole_rows=clip_filter is not None)
