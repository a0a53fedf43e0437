"""The evaluation report: one self-contained HTML file (images and plots embedded as base64 PNG).

It shows the summary table, plots of the score distributions (matplotlib, Agg backend), the optional
per-step traces of `generate`, one grid per exemplar (exemplar first) and the per-image scores.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from rival_jax import files, images

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMBNAIL = 160
# Below this many images per set, KID's subsets are tiny and its value too noisy to compare folders by.
KID_RELIABLE_SET = 10
SUMMARY_LABELS = {
    "clip_image": "CLIP image-image (variation vs exemplar, cosine; higher is closer)",
    "clip_text": "CLIP text-image (variation vs prompt, cosine; higher is closer)",
    "palette": "palette distance (10 colours, matched, summed L1; lower is closer)",
    "kid": "KID x 10^3 (exemplars vs variations; lower is closer)",
    "kid_std": "KID x 10^3, standard deviation over subsets",
    "diversity": "diversity (mean pairwise CLIP image distance among an exemplar's variations)",
    "images": "images",
    "exemplars": "exemplars",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 8px 0 24px; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.notice { background: #fff3cd; border: 2px solid #d39e00; padding: 12px 16px; font-weight: bold; margin: 12px 0; }
.meta { color: #555; }
td.caveat { color: #8a5a00; font-weight: bold; }
img.plot { max-width: 100%; }
figure { display: inline-block; margin: 0 16px 16px 0; }
figcaption { font-size: 0.9em; color: #555; word-break: break-all; max-width: 800px; }
"""


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: Image.Image, alt: str, css: str = "") -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{_png(image)}">'


def _thumbnail(path: Path, side: int = THUMBNAIL) -> Image.Image:
    image = images.open_image(path, "image").convert("RGB")
    image.thumbnail((side, side))
    return image


def _number(value: Any) -> str:
    if value is None:
        return '<td class="number">n/a</td>'
    return f'<td class="number">{value:.4g}</td>' if isinstance(value, float) else f'<td class="number">{value}</td>'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_figure(metrics: dict[str, Any]) -> Figure:
    """Histograms of the per-image scores and of the per-exemplar diversity (at most 5 labelled x ticks).

    A score with fewer than two values is shown as text: a histogram of one value has no meaningful axis.

    Args:
        metrics: what `evaluate_folder` writes to metrics.json.

    >>> score_figure(json.loads(Path("out/metrics.json").read_text())).savefig("scores.png")
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows, groups = metrics["images"], metrics["exemplars"]
    series = {
        "CLIP image-image": ([r["clip_image"] for r in rows], "image"),
        "CLIP text-image": ([r["clip_text"] for r in rows if r["clip_text"] is not None], "image"),
        "palette distance": ([r["palette"] for r in rows], "image"),
        "diversity (per exemplar)": ([g["diversity"] for g in groups if g["diversity"] is not None], "exemplar"),
    }
    figure, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
    for axis, (title, (values, unit)) in zip(axes, series.items(), strict=True):
        axis.set_title(title)
        if len(values) < 2:
            text = f"{values[0]:.4g}\n(one {unit})" if values else "not computed"
            axis.text(0.5, 0.5, text, ha="center", va="center", fontsize="x-large", transform=axis.transAxes)
            axis.set_axis_off()
            continue
        axis.hist(values, bins=min(20, max(5, len(values))), color="#4c72b0")
        axis.set_ylabel("count")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.xaxis.set_major_locator(MaxNLocator(nbins=4))
    figure.tight_layout()
    return figure


def _rendered(figure: Figure) -> Image.Image:
    """The figure as an image; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _trace_figure(traces: dict[str, Any]) -> Figure:
    """Per step: the share of attention generated queries give the exemplar's tokens (per layer and mean),
    and the distance between the generated and the exemplar chain's latent statistics."""
    import numpy as np

    plt = _pyplot()
    steps = np.asarray(traces["timesteps"])
    shares = np.asarray(traces["exemplar_attention_share"], dtype=float).reshape(len(steps), -1)
    layers = traces.get("layers") or [str(i) for i in range(shares.shape[1])]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.5))
    for index in range(shares.shape[1]):
        left.plot(steps, shares[:, index], color="#999999", linewidth=0.7, label="layers" if index == 0 else None)
    left.plot(steps, shares.mean(axis=1), color="#c44e52", linewidth=2, label=f"mean of {len(layers)} layers")
    left.set(title="exemplar attention share", xlabel="timestep t", ylabel="share of attention mass")
    left.invert_xaxis()
    left.legend()
    right.plot(steps, traces["latent_stat_distance"], color="#4c72b0", marker="o", markersize=3)
    right.set(title="latent statistics distance to the exemplar chain", xlabel="timestep t", ylabel="distance")
    right.invert_xaxis()
    figure.tight_layout()
    return figure


def _notice(metrics: dict[str, Any]) -> str:
    random = [name for name, flag in metrics["random_weights"].items() if flag]
    if not random:
        return ""
    which = " and ".join("the generator" if name == "generator" else "the CLIP model" for name in random)
    return (
        f'<div class="notice">Random weights: {which} {"has" if len(random) == 1 else "have"} random weights '
        "(built-in tiny models) - these scores are meaningless. Use real checkpoints for real numbers.</div>"
    )


def _kid_caveat(summary: dict[str, Any]) -> str:
    per_set = min(summary["exemplars"], summary["images"])
    if summary["kid"] is None or per_set >= KID_RELIABLE_SET:
        return ""
    return (
        f'<td class="caveat">caveat: KID from {per_set} images per set is too noisy to compare; '
        f"use at least {KID_RELIABLE_SET} exemplars</td>"
    )


def _summary_table(summary: dict[str, Any]) -> str:
    caveats = {"kid": _kid_caveat(summary)}
    rows = "".join(
        f"<tr><th>{html.escape(SUMMARY_LABELS.get(k, k))}</th>{_number(v)}{caveats.get(k, '')}</tr>"
        for k, v in summary.items()
    )
    return f'<table id="summary">{rows}</table>'


def _grids(metrics: dict[str, Any], folder: Path) -> str:
    parts = []
    for group in metrics["exemplars"]:
        files = [row["file"] for row in metrics["images"] if row["exemplar"] == group["exemplar"]]
        tiles = [_thumbnail(Path(group["exemplar"]))] + [_thumbnail(folder / f) for f in files]
        side = max(max(t.size) for t in tiles)
        tiles = [images.fit(t, (side, side)) for t in tiles]
        caption = f"{group['exemplar']} (first) and its {len(files)} variations"
        parts.append(f"<figure>{_img(images.grid(tiles, 6), caption)}<figcaption>{html.escape(caption)}</figcaption>")
        parts.append("</figure>")
    return "".join(parts)


def _image_table(metrics: dict[str, Any], folder: Path) -> str:
    header = "<tr><th>image</th><th>file</th><th>prompt</th><th>CLIP image</th><th>CLIP text</th><th>palette</th></tr>"
    rows = []
    for row in metrics["images"]:
        scores = "".join(_number(row[k]) for k in ("clip_image", "clip_text", "palette"))
        picture = _img(_thumbnail(folder / row["file"], 96), row["file"])
        cells = f"<td>{picture}</td><td>{html.escape(row['file'])}</td><td>{html.escape(row['prompt'])}</td>"
        rows.append(f"<tr>{cells}{scores}</tr>")
    return f'<table id="images">{header}{"".join(rows)}</table>'


def render_report(metrics: dict[str, Any], folder: Path, traces: dict[str, Any] | None = None) -> str:
    """The report's HTML for `metrics` (as `evaluate_folder` writes them) of the output folder `folder`."""
    models = metrics["models"]
    kid_note = (
        "KID needs at least two exemplars (it compares the set of exemplars with the set of variations)."
        if metrics["summary"]["kid"] is None
        else f"KID on {models['kid_features']} features."
    )
    sections = [
        f"<h1>rival-jax evaluation: {html.escape(str(folder))}</h1>",
        f'<p class="meta">{html.escape(metrics["source"]["kind"])} output; CLIP: {html.escape(models["clip"])}; '
        f"{html.escape(kid_note)}</p>",
        _notice(metrics),
        "<h2>Summary</h2>",
        _summary_table(metrics["summary"]),
        "<h2>Score distributions</h2>",
        _img(_rendered(score_figure(metrics)), "score distributions", "plot"),
    ]
    if traces is not None:
        sections += ["<h2>Inside the method (traces)</h2>", _img(_rendered(_trace_figure(traces)), "traces", "plot")]
    sections += ["<h2>Grids</h2>", _grids(metrics, folder), "<h2>Per-image scores</h2>", _image_table(metrics, folder)]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>rival-jax evaluation</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_report(
    path: str | Path, metrics: dict[str, Any], folder: str | Path, traces: dict[str, Any] | None = None
) -> Path:
    """Write the report atomically to `path`.

    Args:
        path: the HTML file to write.
        metrics: what `evaluate_folder` writes to metrics.json.
        folder: the evaluated output folder (image files are relative to it).
        traces: generate's optional traces.json contents.

    >>> write_report("out/report.html", json.loads(Path("out/metrics.json").read_text()), "out")
    """
    text = render_report(metrics, Path(folder), traces)
    return files.write_atomic(path, lambda stream: stream.write(text), binary=False)
