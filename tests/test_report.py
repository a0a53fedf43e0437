"""The evaluation report on crafted metrics: readable histograms, the KID caveat, the random-weights banner."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import matplotlib.pyplot
import numpy as np
import pytest
from PIL import Image

from rival_jax.metrics.report import render_report, score_figure


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


def _metrics(folder: Path, exemplars: int, per_exemplar: int, scores: list[float] | None = None) -> dict:
    """Metrics as evaluate writes them for `exemplars` exemplars of `per_exemplar` variations, images on disk."""
    count = exemplars * per_exemplar
    scores = scores or list(np.linspace(0.5, 0.9, count))
    rows, groups = [], []
    for index in range(exemplars):
        exemplar = folder / f"exemplar-{index}.png"
        Image.new("RGB", (16, 12), (40 * index, 90, 120)).save(exemplar)
        for variation in range(per_exemplar):
            file = f"variation-{index}-{variation}.png"
            Image.new("RGB", (16, 12), (120, 40 * index, 90)).save(folder / file)
            score = scores[len(rows)]
            rows.append(
                {"file": file, "exemplar": str(exemplar), "prompt": "a cat", "clip_image": score}
                | {"clip_text": score / 3, "palette": 2 * score}
            )
        groups.append({"exemplar": str(exemplar), "images": per_exemplar, "diversity": 0.1 * (index + 1)})
    return {
        "summary": {"clip_image": 0.7, "clip_text": 0.2, "palette": 1.4, "kid": 3.2, "kid_std": 0.4}
        | {"diversity": 0.15, "images": count, "exemplars": exemplars},
        "images": rows,
        "exemplars": groups,
        "source": {"folder": str(folder), "kind": "augment"},
        "models": {"clip": "tiny", "clip_path": "tiny", "kid_features": "clip"},
        "random_weights": {"generator": False, "clip": False},
        "seed": 0,
    }


def _tick_labels(axis) -> list:
    low, high = sorted(axis.get_xlim())
    return [
        label
        for tick, label in zip(axis.get_xticks(), axis.get_xticklabels(), strict=True)
        if low <= tick <= high and label.get_text()
    ]


@pytest.mark.parametrize(
    "width",
    [1e-7, 3e-5, 3e-4, 1e-2, 1.0],
    ids=["1e-7", "3e-5", "3e-4", "1e-2", "1"],
)
@pytest.mark.parametrize("centre", [0.0123, 0.87654, 1234.5678])
def test_histogram_tick_labels_are_distinct_and_do_not_overlap(tmp_path, centre, width):
    figure = score_figure(_metrics(tmp_path, 3, 4, list(centre + width * np.linspace(0, 1, 12))))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for axis in figure.axes:
        labels = _tick_labels(axis)
        texts = [label.get_text() for label in labels]
        assert len(labels) >= 2 and len(set(texts)) == len(texts), f"{axis.get_title()}: {texts}"
        boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda box: box.x0)
        for left, right in itertools.pairwise(boxes):
            assert left.x1 < right.x0, f"{axis.get_title()}: tick labels {texts} overlap"


def test_a_score_with_one_value_is_shown_as_text_not_as_a_histogram(tmp_path):
    figure = score_figure(_metrics(tmp_path, 1, 3))
    diversity = next(axis for axis in figure.axes if axis.get_title().startswith("diversity"))
    assert not diversity.patches, "no bars"
    assert not diversity.axison
    assert [text.get_text() for text in diversity.texts] == ["0.1\n(one exemplar)"]
    clip = next(axis for axis in figure.axes if axis.get_title() == "CLIP image-image")
    assert len(clip.patches) >= 5 and clip.axison


def _kid_row(report: str) -> str:
    return re.search(r"<tr><th>KID x 10\^3 \(.*?</tr>", report).group(0)


def test_kid_from_fewer_than_ten_exemplars_carries_a_caveat_in_its_row(tmp_path):
    few = render_report(_metrics(tmp_path, 3, 2), tmp_path)
    assert "caveat: KID from 3 images per set is too noisy" in _kid_row(few)
    many = render_report(_metrics(tmp_path, 10, 1), tmp_path)
    assert "caveat" not in _kid_row(many)
    not_computed = _metrics(tmp_path, 1, 2)
    not_computed["summary"] |= {"kid": None, "kid_std": None}
    assert "caveat" not in _kid_row(render_report(not_computed, tmp_path))


@pytest.mark.parametrize(
    ("generator", "clip", "banner"),
    [
        (True, False, "Random weights: the generator has random weights"),
        (False, True, "Random weights: the CLIP model has random weights"),
        (True, True, "Random weights: the generator and the CLIP model have random weights"),
        (None, False, None),
        (False, False, None),
    ],
)
def test_the_random_weights_banner_names_the_random_models(tmp_path, generator, clip, banner):
    metrics = _metrics(tmp_path, 2, 2)
    metrics["random_weights"] = {"generator": generator, "clip": clip}
    report = render_report(metrics, tmp_path)
    if banner is None:
        assert 'class="notice"' not in report and "meaningless" not in report
    else:
        assert banner in report and "these scores are meaningless" in report
