"""The options of every command, defined once: the CLI's flags, config files and the jobs read these dataclasses.

Each command has one frozen dataclass of job options, validated on construction (one-line
`RivalError`s). `CommonOptions` are accepted by every command; `JobOptions` by the commands that
load a model (`generate`, `augment`, `ablate`), which also take run options (`RunOptions`) and
per-exemplar settings (`jobs.settings`) and read them, layered, from a config file.

>>> AugmentOptions(source="photos/", batch_size=4, output="out")
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from rival_jax.data.encoding import IMAGE_FORMATS
from rival_jax.data.sinks import FORMATS, OutputSpec
from rival_jax.errors import RivalError
from rival_jax.models.families import FAMILIES
from rival_jax.options import check_types, option

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_BATCH_SIZE = 8
DEFAULT_SWEEP = (400, 600, 800)
KID_FEATURES = ("inception", "clip")
MANIFEST_HELP = "image folder (ImageFolder), .csv/.jsonl manifest, .parquet, WebDataset .tar, datasets folder; or URL"
SHARD_PATTERN = re.compile(r"^(\d+)/(\d+)$")
ENGINES = ("local", "ray")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """Options every command accepts."""

    cache_dir: str | None = option(None, "cache folder for converted weights and the tiny models", kind="a folder path")
    progress: bool | None = option(
        None,
        "progress bars (default when stderr is a terminal)",
        type=bool,
        negative=("--no-progress", "no progress bars"),
        kind="a boolean",
    )

    def __post_init__(self) -> None:
        check_types(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobOptions(CommonOptions):
    """Options of the commands that load a model and write an output folder."""

    model: str = option(
        "tiny", "diffusers folder (SD 1.x/2.x/SDXL), hub id, or tiny, tiny-sd2, tiny-sdxl", kind="a path or hub id"
    )
    output: str = option(
        "rival-output", "output folder (default: rival-output)", flags=("-o", "--output"), kind="a folder path"
    )
    overwrite: bool = option(
        False,
        "replace the earlier result in the output folder (only the files it recorded are removed)",
        kind="a boolean",
    )
    compile_cache: bool | str = option(
        True,
        "folder of the persistent XLA compilation cache",
        type=str,
        negative=("--no-compile-cache", "do not keep compiled programs on disk"),
        kind="a folder path or a boolean",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateOptions(JobOptions):
    """`rival-jax generate`: one exemplar (the bundled photograph when none is given)."""

    HELP: ClassVar[str] = "invert one exemplar and generate aligned images"
    exemplar: str | None = option(None, "exemplar image (default: bundled)", positional=True, kind="a file path")
    traces: bool = option(
        False,
        "also write traces.json: per step, the exemplar's attention share and the latents' statistic distance",
        kind="a boolean",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchedOptions(JobOptions):
    """Options of the commands that generate many exemplars in compiled batches."""

    source: str = option(help=MANIFEST_HELP, kind="a manifest or folder path")
    batch_size: int = option(
        DEFAULT_BATCH_SIZE, f"variations per compiled batch (default: {DEFAULT_BATCH_SIZE})", kind="an integer"
    )
    clip: str | None = option(
        None, "CLIP that scores variations (default: tiny with --model tiny*, else ViT-L/14)", kind="a path or hub id"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise RivalError(f"--batch-size {self.batch_size} is out of range: use an integer >= 1")

    @property
    def scoring_clip(self) -> str:
        """The CLIP that scores: as given, else the tiny one for the tiny models, else `DEFAULT_CLIP`."""
        return str(self.clip or ("tiny" if str(self.model).startswith("tiny") else DEFAULT_CLIP))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentOptions(BatchedOptions):
    """`rival-jax augment`: a resumable job over a dataset (folder, manifest, Parquet, WebDataset), on one host or
    several, written as image files, WebDataset shards or Parquet, optionally filtered by CLIP similarity.

    >>> AugmentOptions(source="train/", output="out", output_format="webdataset", keep_best=2, shard="0/4")
    """

    HELP: ClassVar[str] = "resumable variation job over a dataset: folders, manifests, Parquet, WebDataset"
    split: str | None = option(None, "split of a datasets folder or hub dataset (default: train)", kind="a split name")
    prompt_column: str | None = option(None, "column of each row's prompt (e.g. caption)", kind="a column name")
    output_format: str = option("files", "files, webdataset or parquet (default: files)", FORMATS, kind="text")
    image_format: str = option("png", "png, jpeg or webp (default: png)", IMAGE_FORMATS, kind="an image format")
    quality: int = option(95, "jpeg/webp quality, 1-100 (default: 95)", kind="an integer")
    output_size: str = option(
        "model", "written size: model (as generated), source (the exemplar's) or WxH", kind="model, source or WxH"
    )
    shard_size: int = option(1000, "samples per WebDataset shard or Parquet file (default: 1000)", kind="an integer")
    min_clip_image: float | None = option(
        None, "drop variations less CLIP-similar to the exemplar", type=float, kind="a number"
    )
    keep_best: int | None = option(
        None, "keep the K of -n variations most CLIP-similar to the exemplar", type=int, kind="an integer"
    )
    shard: str | None = option(None, "do share I of N of the job (I/N, 0-based) on independent machines", kind="I/N")
    coordinator: str | None = option(None, "jax.distributed coordinator host:port (multi-host runs)", kind="host:port")
    num_processes: int | None = option(None, "number of processes (multi-host runs)", type=int, kind="an integer")
    process_id: int | None = option(None, "this process's index (multi-host runs)", type=int, kind="an integer")
    distributed: bool = option(False, "jax.distributed with auto-detected cluster", kind="a boolean")
    engine: str = option("local", "local (this process) or ray (Ray Data actors)", ENGINES, kind="local or ray")
    address: str | None = option(None, "Ray cluster: host:port, ray://host:port or auto", kind="a Ray address")
    workers: int | None = option(None, "Ray actors (default: one per GPU, TPU host, node)", type=int, kind="an integer")

    def __post_init__(self) -> None:
        if isinstance(self.min_clip_image, int) and not isinstance(self.min_clip_image, bool):
            object.__setattr__(self, "min_clip_image", float(self.min_clip_image))
        super().__post_init__()
        given = [name for name in ("num_processes", "process_id") if getattr(self, name) is not None]
        if given and not self.multi_host:
            flags = " and ".join(f"--{name.replace('_', '-')}" for name in given)
            raise RivalError(
                f"{flags} {'need' if len(given) > 1 else 'needs'} --coordinator HOST:PORT (or --distributed): "
                "without one every process would do the whole job"
            )
        if self.shard is not None and self.multi_host:
            raise RivalError(
                "--shard splits a job without jax.distributed: drop --coordinator/--distributed, or drop --shard"
            )
        self.shard_position  # noqa: B018 - validates --shard
        if self.engine == "local" and (self.address is not None or self.workers is not None):
            raise RivalError("--address and --workers are for the Ray engine: add --engine ray, or drop them")
        if self.engine == "ray" and (self.shard is not None or self.multi_host):
            raise RivalError("--engine ray hands out the work itself: drop --shard/--coordinator/--distributed")
        if self.workers is not None and self.workers < 1:
            raise RivalError(f"--workers {self.workers} is out of range: use an integer >= 1")
        self.output_spec  # noqa: B018 - validates the output options
        if self.keep_best is not None and self.keep_best < 1:
            raise RivalError(f"--keep-best {self.keep_best} is out of range: use an integer >= 1 (at most -n)")
        if self.min_clip_image is not None and not -1.0 <= self.min_clip_image <= 1.0:
            raise RivalError(f"--min-clip-image {self.min_clip_image} is out of range: a cosine similarity in -1..1")

    @property
    def multi_host(self) -> bool:
        """Whether the job joins a jax.distributed cluster."""
        return bool(self.coordinator or self.distributed)

    @property
    def shard_position(self) -> tuple[int, int] | None:
        """--shard I/N as (I, N), validated; None without --shard."""
        if self.shard is None:
            return None
        match = SHARD_PATTERN.match(self.shard.strip())
        if not match or not int(match[1]) < int(match[2]):
            raise RivalError(f"--shard {self.shard!r} is not a share: use I/N with 0 <= I < N (e.g. 0/4)")
        return int(match[1]), int(match[2])

    @property
    def output_spec(self) -> OutputSpec:
        """How the sink writes (`data.sinks.OutputSpec`), validated."""
        return OutputSpec(self.output_format, self.image_format, self.quality, self.output_size, self.shard_size)

    @property
    def filters(self) -> bool:
        """Whether variations are scored by CLIP (--keep-best or --min-clip-image)."""
        return self.keep_best is not None or self.min_clip_image is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblateOptions(BatchedOptions):
    """`rival-jax ablate`: Table 3's rows and a t_align / t_early sweep, scored."""

    HELP: ClassVar[str] = "the paper's ablation and a t_align/t_early sweep, scored"
    t_align_values: tuple[int, ...] = option(
        DEFAULT_SWEEP, "swept t_align values (default: 400 600 800)", type=int, nargs="+", kind="a list of integers"
    )
    t_early_values: tuple[int, ...] = option(
        DEFAULT_SWEEP, "swept t_early values (default: 400 600 800)", type=int, nargs="+", kind="a list of integers"
    )
    inception: str | None = option(
        None, "FID Inception weights file for KID (default: CLIP features)", kind="a file path"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateOptions(CommonOptions):
    """`rival-jax evaluate`: score an output folder of generate or augment."""

    HELP: ClassVar[str] = "score a generate/augment output folder: metrics and a report"
    folder: str = option(help="the -o folder of generate or augment", kind="a folder path")
    clip: str = option(DEFAULT_CLIP, f"CLIP folder, hub id or tiny (default: {DEFAULT_CLIP})", kind="a path or hub id")
    inception: str | None = option(
        None, "FID Inception weights (pt_inception-2015-12-05-6726825d.pth) for KID", kind="a file path"
    )
    kid_features: str | None = option(
        None, "KID features (default: inception with --inception)", KID_FEATURES, kind="inception or clip"
    )
    seed: int = option(0, "seeds palettes and KID subsets (default: 0)", kind="an integer")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kid_features == "inception" and self.inception is None:
            raise RivalError("--kid-features inception needs the weights: add --inception pt_inception-...pth")

    @property
    def features(self) -> str:
        """The features KID compares: as given, else inception with a weights file, else clip."""
        return self.kid_features or ("inception" if self.inception else "clip")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MakeTinyOptions(CommonOptions):
    """`rival-jax make-tiny`: the built-in tiny random checkpoint, written to a folder."""

    HELP: ClassVar[str] = "write the built-in tiny random checkpoint to a folder"
    folder: str = option(help="where to write the checkpoint", kind="a folder path")
    format: str = option("flax", "weight files (default: flax)", ("flax", "safetensors"), kind="flax or safetensors")
    family: str = option("sd1", "model family (default: sd1)", FAMILIES, kind="a model family")
    seed: int = option(0, "seed of the random weights (default: 0)", kind="an integer")
    controlnet: bool = option(False, "also a random ControlNet in FOLDER/controlnet", kind="a boolean")


COMMANDS: dict[str, type[CommonOptions]] = {
    "generate": GenerateOptions,
    "augment": AugmentOptions,
    "evaluate": EvaluateOptions,
    "ablate": AblateOptions,
    "make-tiny": MakeTinyOptions,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanOptions(CommonOptions):
    """`rival-jax plan`: every program of a run compiled for a target it need not have; per-chip memory and cost.

    It takes the run options and settings as `generate` does (`RUN_OPTIONS`), from shapes alone.

    >>> PlanOptions(target="v5e:2x2", family="sdxl")
    """

    HELP: ClassVar[str] = "compile a run's programs for a TPU slice (or cpu:D) from shapes: memory and cost per chip"
    RUN_OPTIONS: ClassVar[bool] = True
    target: str | None = option(
        None,
        "machine to compile for: v5e:2x2, v6e:2x4, v4:2x2x1, v5litepod-8, v6e-8, v4-8, cpu:8, ...",
        kind="a target",
    )
    model: str | None = option(
        None, "diffusers folder (only its configs are read), or tiny, tiny-sd2, tiny-sdxl", kind="a path or model name"
    )
    family: str | None = option(None, "a family's full architecture, no weights needed", FAMILIES, kind="a family")
    chip_memory: float | None = option(
        None, "GiB one chip may hold (default: its HBM; cpu:D: this host's memory)", type=float, kind="a number"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is None:
            raise RivalError("plan needs --target: a TPU topology (v5e:2x2), a Cloud TPU type (v5litepod-8) or cpu:D")
        if (self.model is None) == (self.family is None):
            raise RivalError("plan needs one of --model M (a diffusers folder or tiny*) or --family sd1|sd2|sdxl")
        if self.chip_memory is not None and self.chip_memory <= 0:
            raise RivalError(f"--chip-memory {self.chip_memory} is out of range: use GiB above 0")


COMMANDS["plan"] = PlanOptions
