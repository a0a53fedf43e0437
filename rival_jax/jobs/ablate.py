"""`rival-jax ablate`: the paper's ablation (Table 3) and a t_align / t_early sweep over a set of exemplars.

Every setting is an `augment` job into its own subfolder of the output (so a rerun skips every image
already made, and a setting whose images were all there keeps its `metrics.json`), scored by
`jobs.evaluate.evaluate_folder`. The scores go to one table (`ablation.csv`, `ablation.json`, and a
Markdown table on stdout) and to `ablation-thresholds.png`, every score against the thresholds.

Settings (folder names): `full` (RIVAL as configured), `no_attention_injection`,
`no_early_replacement`, `no_latent_alignment`, `no_noise_alignment` (Table 3's rows: one switch of
`RivalConfig` off each), then `t_align_<v>` and `t_early_<v>` for each swept value (the other
threshold as configured); a swept value equal to the configured one is the `full` row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rival_jax import files
from rival_jax.data.sources import list_rows
from rival_jax.errors import RivalError
from rival_jax.jobs.augment import run_augment
from rival_jax.jobs.common import Interrupted, check_control, load_pipeline, log, prepare_runtime, show_progress
from rival_jax.jobs.evaluate import SUMMARY_KEYS, evaluate_folder
from rival_jax.jobs.options import DEFAULT_BATCH_SIZE, AblateOptions
from rival_jax.jobs.settings import merge_settings
from rival_jax.options import RunOptions
from rival_jax.progress import CompileTimer

SWITCHES = ("attention_injection", "early_replacement", "latent_alignment", "noise_alignment")
THRESHOLDS = ("t_align", "t_early")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the ablation: its folder name, what it varies, and the settings it overrides."""

    name: str
    group: str
    overrides: dict[str, Any]


def ablation_settings(base: dict[str, Any], values: dict[str, tuple[int, ...]]) -> list[Setting]:
    """Table 3's rows, then one setting per swept threshold value (values equal to `base`'s are `full`).

    Args:
        base: the row settings every setting starts from.
        values: swept values per threshold name ("t_align", "t_early").

    >>> [s.name for s in ablation_settings({"t_align": 600}, {"t_align": (400, 600)})][-1]
    't_align_400'
    """
    resolved = merge_settings(base)
    settings = [Setting("full", "table3", {})]
    settings += [Setting(f"no_{switch}", "table3", {switch: False}) for switch in SWITCHES]
    for name in THRESHOLDS:
        for value in dict.fromkeys(values.get(name, ())):
            if value != resolved[name]:
                settings.append(Setting(f"{name}_{value}", name, {name: value}))
    for setting in settings:
        merge_settings(base, setting.overrides)  # every setting is checked before any compute
    return settings


def _scores(folder: Path, generated: int, evaluate: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The folder's scores: kept from its metrics.json when nothing new was generated, else evaluated."""
    kept = folder / "metrics.json"
    if not generated and kept.is_file():
        summary = json.loads(kept.read_text()).get("summary")
        if isinstance(summary, dict):
            return summary
    return evaluate(folder)


def run_ablation(
    pipe: Any,
    source: str | Path,
    base: dict[str, Any],
    settings: list[Setting],
    output: str | Path,
    evaluate: Callable[[Path], dict[str, Any]],
    model: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generate and score every setting; returns the table rows (also written, see `write_table`).

    Args:
        pipe: the loaded `RivalPipeline`.
        source: a manifest or folder of exemplars (as for `rival-jax augment`).
        base: the row settings every setting starts from.
        settings: from `ablation_settings`.
        output: the ablation folder; setting s goes to `output/s.name`.
        evaluate: scores an augment output folder (`evaluate_folder` with the chosen models).
        model: the model's name, part of every row's job key.
        batch_size: variations per compiled batch.
        progress: progress bars on stderr.

    >>> rows = run_ablation(pipe, "photos/", {"steps": 50}, ablation_settings(base, {}), "ablation", evaluate, "sd15")
    """
    output = Path(output)
    table = []
    for setting in settings:
        listing = list_rows(source, {**base, **setting.overrides}, model=model)
        rows, problems = listing.rows, listing.problems
        if not rows:
            raise RivalError(f"{source} has no usable exemplar ({'; '.join(problems) or 'it is empty'})")
        folder = output / setting.name
        try:
            summary = run_augment(pipe, rows, folder, batch_size, problems=problems, show_progress=progress)
        except Interrupted as interrupt:
            raise Interrupted(f"{len(table)} of {len(settings)} settings finished; {interrupt.finished}") from None
        log(f"{setting.name}: {summary.line()}")
        scores = _scores(folder, summary.generated, evaluate)
        config = merge_settings(base, setting.overrides)["config"]
        described = {"setting": setting.name, "group": setting.group}
        described |= {name: getattr(config, name) for name in (*THRESHOLDS, *SWITCHES)}
        described["images"] = summary.generated + summary.already_done
        table.append(described | {metric: scores.get(metric) for metric in SUMMARY_KEYS})
    return table


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The table as GitHub Markdown (scores to 4 significant digits, missing ones as -)."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def write_table(table: list[dict[str, Any]], output: Path) -> None:
    """ablation.json and ablation.csv, each written atomically."""
    files.save_json({"settings": table}, output / "ablation.json")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    files.write_atomic(output / "ablation.csv", lambda handle: handle.write(text.getvalue()), binary=False)


def plot_thresholds(table: list[dict[str, Any]], output: Path) -> Path:
    """ablation-thresholds.png: each score that was computed against t_align and t_early (KID with its std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(row for row in table if row["setting"] == "full")
    shown = [m for m in SUMMARY_KEYS if m != "kid_std" and any(row[m] is not None for row in table)] or ["clip_image"]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 3.0), squeeze=False)
    for axis, metric in zip(axes[0], shown, strict=True):
        for threshold in THRESHOLDS:
            rows = [full, *(r for r in table if r["group"] == threshold)]
            points = sorted((r[threshold], r[metric], r["kid_std"] or 0.0) for r in rows if r[metric] is not None)
            if points:
                x, y, spread = zip(*points, strict=True)
                axis.errorbar(x, y, yerr=spread if metric == "kid" else None, marker="o", capsize=3, label=threshold)
        axis.set_title(metric)
        axis.set_xlabel("threshold (timestep)")
        axis.ticklabel_format(useOffset=False, axis="y")
        if axis.lines:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "no scores", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    path = files.write_atomic(output / "ablation-thresholds.png", lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
    return path


def run_job(job: AblateOptions, options: RunOptions, row: dict[str, Any]) -> int:
    """`rival-jax ablate`: Table 3's rows and the threshold sweep over a folder or manifest, scored.

    Args:
        job: the job options (source, swept values, the scoring CLIP and Inception weights, ...).
        options: the pipeline's run options.
        row: settings every setting starts from.

    >>> run_job(AblateOptions(source="photos/", output="ablation"), RunOptions(), {"steps": 50})
    0
    """
    check_control(options, merge_settings(row))
    settings = ablation_settings(row, {name: getattr(job, f"{name}_values") for name in THRESHOLDS})
    inception = Path(job.inception) if job.inception else None
    if inception is not None and not inception.is_file():
        raise RivalError(f"--inception {inception} does not exist: give the FID Inception weights file")
    listing = list_rows(job.source, row, model=str(job.model))
    rows, problems = listing.rows, listing.problems
    if not rows:
        raise RivalError(f"{job.source} has no usable exemplar ({'; '.join(problems) or 'it is empty'})")
    prepare_runtime(job)
    output, clip, cache_dir = Path(job.output), job.scoring_clip, Path(job.cache_dir) if job.cache_dir else None
    with CompileTimer() as compiling:
        pipe = load_pipeline(job, options)
        table = run_ablation(
            pipe,
            job.source,
            row,
            settings,
            output,
            lambda folder: evaluate_folder(folder, clip, inception, cache_dir=cache_dir),
            str(job.model),
            job.batch_size,
            show_progress(job),
        )
    write_table(table, output)
    plot_thresholds(table, output)
    if pipe.random_weights or clip == "tiny":
        log("scores of random-weight models are meaningless: they only show that the pipeline runs")
    log(f"compile {compiling.seconds:.1f} s")
    sys.stdout.write(markdown_table(table) + "\n")
    print(output / "ablation.csv")
    return 0
