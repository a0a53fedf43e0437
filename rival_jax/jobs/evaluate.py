"""`rival-jax evaluate`: scores a `generate` or `augment` output folder; metrics.json, metrics.csv, report.html.

Per image: CLIP image-image (variation vs its exemplar) and text-image (variation vs its prompt)
cosine, and the palette distance to its exemplar. Per exemplar: diversity (mean pairwise CLIP image
distance among its variations). Over the folder: KID x 10^3 between the exemplars and the variations
(FID Inception features when a weights file is given, else CLIP image features).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from rival_jax import files, images
from rival_jax.data.records import RECORDS_GLOB
from rival_jax.data.storage import is_url
from rival_jax.errors import RivalError
from rival_jax.jobs.common import log
from rival_jax.jobs.locks import SIDECAR
from rival_jax.jobs.options import DEFAULT_CLIP, EvaluateOptions
from rival_jax.jobs.records import read_records
from rival_jax.metrics.clip import check_clip_name, cosine, load_clip, mean_pairwise_distance
from rival_jax.metrics.kid import kid
from rival_jax.metrics.palette import palette, palette_distance

CSV_COLUMNS = ("file", "exemplar", "prompt", "clip_image", "clip_text", "palette")
SUMMARY_KEYS = ("clip_image", "clip_text", "palette", "kid", "kid_std", "diversity")


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """One generated image: its file (relative to the folder), its exemplar and its prompt."""

    file: str
    exemplar: Path
    prompt: str


@dataclasses.dataclass(frozen=True)
class FolderImages:
    """The images an output folder holds: the job kind, one entry per image, whether the generator had random
    weights (None: its records do not say), and its traces."""

    kind: str
    entries: list[GeneratedImage]
    random_weights: bool | None
    traces: dict | None


def _generate_entries(folder: Path) -> FolderImages:
    try:
        sidecar = json.loads((folder / SIDECAR).read_text())
        entries = [GeneratedImage(i["file"], folder / "exemplar.png", sidecar["prompt"]) for i in sidecar["images"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise RivalError(f"{folder / SIDECAR} is not a generate sidecar ({error}): rerun generate") from None
    return FolderImages("generate", entries, bool(sidecar.get("random_weights")), None)


def _augment_entries(folder: Path) -> FolderImages:
    records = read_records(folder)
    entries = {record.file: GeneratedImage(record.file, record.image, record.prompt) for record in records}
    said = {record.random_weights for record in records} - {None}
    return FolderImages("augment", list(entries.values()), True in said if said else None, None)


def _read_traces(folder: Path) -> dict | None:
    """traces.json (per-step attention shares and latent statistics) if present and well-formed."""
    path = folder / "traces.json"
    if not path.is_file():
        return None
    try:
        traces = json.loads(path.read_text())
        steps = len(traces["timesteps"])
        if len(traces["exemplar_attention_share"]) != steps or len(traces["latent_stat_distance"]) != steps:
            raise ValueError("lengths differ")
        return traces
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        log(f"{path} skipped: not a traces file ({error})")
        return None


def read_folder(folder: str | Path) -> FolderImages:
    """The images of a `generate` (its sidecar) or `augment` (its records) folder, every file checked to exist."""
    if is_url(folder):
        raise RivalError(f"{folder} is a URL: evaluate reads local folders; copy the output to a local folder first")
    folder = Path(folder)
    if not folder.is_dir():
        raise RivalError(f"output folder {folder} does not exist: pass the -o folder of generate or augment")
    if (folder / SIDECAR).is_file():
        outputs = _generate_entries(folder)
    elif any(folder.glob(RECORDS_GLOB)):
        outputs = _augment_entries(folder)
    else:
        raise RivalError(f"{folder} holds no {SIDECAR} or {RECORDS_GLOB}: pass the -o folder of generate or augment")
    if not outputs.entries:
        raise RivalError(f"{folder} records no images: generate some first")
    for entry in outputs.entries:
        for path in (folder / entry.file, entry.exemplar):
            if not path.is_file():
                raise RivalError(f"{path} (recorded in {folder}) is missing: run evaluate where the job ran")
    return dataclasses.replace(outputs, traces=_read_traces(folder))


@functools.lru_cache(maxsize=2)
def _clip(name: str, cache_dir: Path | None):
    return load_clip(name, cache_dir if cache_dir else True)


@functools.lru_cache(maxsize=2)
def _inception(path: Path):
    from rival_jax.metrics.inception import load_inception

    return load_inception(path)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _score(folder: Path, outputs: FolderImages, clip: Any, kid_params: dict | None, seed: int) -> dict[str, Any]:
    """Per-image rows, per-exemplar rows and the summary."""
    pictures = [images.as_rgb(images.open_image(folder / e.file, "image")) for e in outputs.entries]
    groups: dict[Path, list[int]] = {}
    for index, entry in enumerate(outputs.entries):
        groups.setdefault(entry.exemplar, []).append(index)
    exemplars = {
        path: images.fit(images.as_rgb(images.open_image(path), f"exemplar {path}"), pictures[members[0]].size)
        for path, members in groups.items()
    }
    generated = clip.image_features(pictures)
    reference = dict(zip(exemplars, clip.image_features(list(exemplars.values())), strict=True))
    prompts = sorted({e.prompt for e in outputs.entries if e.prompt})
    texts = dict(zip(prompts, clip.text_features(prompts), strict=True)) if prompts else {}
    palettes = {path: palette(np.asarray(picture), seed=seed) for path, picture in exemplars.items()}
    rows = []
    for entry, picture, features in zip(outputs.entries, pictures, generated, strict=True):
        text = texts.get(entry.prompt)
        rows.append(
            {
                "file": entry.file,
                "exemplar": str(entry.exemplar),
                "prompt": entry.prompt,
                "clip_image": float(cosine(features, reference[entry.exemplar])),
                "clip_text": None if text is None else float(cosine(features, text)),
                "palette": palette_distance(palette(np.asarray(picture), seed=seed), palettes[entry.exemplar]),
            }
        )
    per_exemplar = [
        {
            "exemplar": str(path),
            "images": len(members),
            "diversity": mean_pairwise_distance(generated[members]),
            "clip_image": _mean([rows[i]["clip_image"] for i in members]),
            "palette": _mean([rows[i]["palette"] for i in members]),
        }
        for path, members in groups.items()
    ]
    if kid_params is None:
        real, fake = np.stack(list(reference.values())), generated
    else:
        from rival_jax.metrics.inception import inception_features

        real, fake = inception_features(kid_params, list(exemplars.values())), inception_features(kid_params, pictures)
    distance = kid(real, fake, seed=seed)
    summary = {name: _mean([row[name] for row in rows]) for name in ("clip_image", "clip_text", "palette")}
    summary |= {
        "kid": None if distance is None else 1e3 * distance[0],
        "kid_std": None if distance is None else 1e3 * distance[1],
        "diversity": _mean([group["diversity"] for group in per_exemplar]),
        "images": len(rows),
        "exemplars": len(groups),
    }
    return {"summary": summary, "images": rows, "exemplars": per_exemplar}


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    def write(stream: Any) -> None:
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS} for row in rows)

    files.write_atomic(path, write, binary=False)


def evaluate_folder(
    folder: str | Path,
    clip: str = DEFAULT_CLIP,
    inception: Path | None = None,
    kid_features: str | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
    report: bool = True,
) -> dict[str, Any]:
    """Score every image of an output folder and write metrics.json, metrics.csv (and report.html).

    Models stay loaded between calls in one process (an ablation evaluates many folders).

    Args:
        folder: a `generate` (its sidecar) or `augment` (its records) output folder.
        clip: CLIP model folder, hub id, or "tiny" (random weights, for tests).
        inception: FID Inception weights (.pth, .safetensors or .npz) for KID; None uses CLIP image features.
        kid_features: "inception" or "clip" (default: inception when a file is given, else clip).
        cache_dir: cache of converted weights (default: the package's cache folder).
        seed: seeds k-means palettes and KID's subsets.
        report: also write report.html.

    Returns:
        The summary written under "summary" in metrics.json: clip_image, clip_text, palette, kid,
        kid_std (x10^3), diversity, each a float or None where it cannot be computed, plus the
        counts images and exemplars.

    >>> evaluate_folder(Path("rival-output"), clip="openai/clip-vit-large-patch14")["clip_image"]
    """
    checked = EvaluateOptions(folder=folder, clip=clip, inception=inception, kid_features=kid_features, seed=seed)
    kid_features = checked.features
    if inception is not None:
        from rival_jax.metrics.inception import check_inception_file

        inception = check_inception_file(inception)
    check_clip_name(str(clip))
    outputs = read_folder(folder)
    folder = Path(folder)
    started = time.perf_counter()
    scorer = _clip(str(clip), Path(cache_dir) if cache_dir else None)
    if scorer.random_weights:
        log(f"CLIP: built-in {clip} model with RANDOM weights - scores are meaningless (use --clip {DEFAULT_CLIP})")
    kid_params = _inception(inception) if kid_features == "inception" else None
    metrics = _score(folder, outputs, scorer, kid_params, seed)
    metrics |= {
        "source": {"folder": str(folder), "kind": outputs.kind},
        "models": {"clip": str(clip), "clip_path": str(scorer.path), "kid_features": kid_features},
        "random_weights": {"generator": outputs.random_weights, "clip": scorer.random_weights},
        "seed": seed,
    }
    if inception is not None:
        metrics["models"]["inception"] = str(inception)
    files.save_json(metrics, folder / "metrics.json")
    _write_csv(metrics["images"], folder / "metrics.csv")
    if report:
        from rival_jax.metrics.report import write_report

        write_report(folder / "report.html", metrics, folder, outputs.traces)
    log(f"evaluated {len(outputs.entries)} images in {time.perf_counter() - started:.1f} s")
    return metrics["summary"]


def run_job(job: EvaluateOptions) -> int:
    """`rival-jax evaluate`: score an output folder; prints the report's path.

    >>> run_job(EvaluateOptions(folder="rival-output", clip="tiny"))
    0
    """
    summary = evaluate_folder(
        job.folder,
        clip=job.clip,
        inception=Path(job.inception) if job.inception else None,
        kid_features=job.kid_features,
        cache_dir=Path(job.cache_dir) if job.cache_dir else None,
        seed=job.seed,
    )
    shown = ", ".join(f"{k} {summary[k]:.4g}" for k in SUMMARY_KEYS if summary[k] is not None)
    log(f"summary: {shown}")
    print(Path(job.folder) / "report.html")
    return 0
