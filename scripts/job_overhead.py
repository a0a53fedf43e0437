"""The augment job's own cost per image, outside the model, next to the model's, for each output format.

An ImageFolder of random exemplars (two classes) is listed (`list_rows`), each exemplar read and
hashed (`load_row`), its variations generated once on the tiny model (the model's time per image,
compile excluded), then written through each sink: encoding, atomic writes or shard commits, records
and metadata (`open_sink`, `Sink.add`, `Sink.close`), and the finished set a rerun reads. Figures in
milliseconds per image; the CLIP filter's scoring (tiny CLIP) is shown too.

    python scripts/job_overhead.py                           # 8 exemplars x 4 variations, 3 steps, 128 px
    python scripts/job_overhead.py --output-size 512x512    # SD 1.5's output size (resizing included)
    python scripts/job_overhead.py --rows 16 --image-format jpeg
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rival_jax.data.encoding import IMAGE_FORMATS
from rival_jax.data.sinks import FORMATS, Item, OutputSpec, open_sink
from rival_jax.data.sources import list_rows, load_row
from rival_jax.jobs.augment import metadata
from rival_jax.jobs.settings import generation_arguments


def _exemplars(folder: Path, rows: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for n in range(rows):
        label = ("cat", "dog")[n % 2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / label / f"{n:04d}.png")


def _ms(seconds: float, images: int) -> str:
    return f"{1000 * seconds / images:8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="exemplars (default: 8)")
    parser.add_argument("-n", "--variations", type=int, default=4, help="variations per exemplar (default: 4)")
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps (default: 3)")
    parser.add_argument("--side", type=int, default=128, help="exemplar side in pixels (default: 128)")
    parser.add_argument("--image-format", default="png", choices=IMAGE_FORMATS, help="written encoding")
    parser.add_argument("--output-size", default="model", help="written size: model, source or WxH (e.g. 512x512)")
    args = parser.parse_args()

    from rival_jax import RivalPipeline
    from rival_jax.jobs.filtering import ClipFilter
    from rival_jax.metrics.clip import load_clip

    work = Path(tempfile.mkdtemp(prefix="job-overhead-"))
    _exemplars(work / "train", args.rows, args.side)
    defaults = {"steps": args.steps, "num_variations": args.variations, "prompt": "a photo"}
    images = args.rows * args.variations

    started = time.perf_counter()
    listing = list_rows(str(work / "train"), defaults, model="tiny")
    listed = time.perf_counter() - started
    started = time.perf_counter()
    loaded = [(row, *load_row(row, model="tiny")[:2]) for row in listing.rows]
    read = time.perf_counter() - started

    pipe = RivalPipeline.from_pretrained("tiny")
    indices = list(range(args.variations))
    generated, model_seconds = [], 0.0
    for number, (row, exemplar, key) in enumerate([loaded[0], *loaded]):  # the first pass compiles
        started = time.perf_counter()
        chain = pipe.invert(exemplar, row.settings["inversion_prompt"], row.settings["steps"])
        out = pipe.generate(chain, **generation_arguments(row.settings), variation_indices=indices)
        if number:
            model_seconds += time.perf_counter() - started
            generated.append((row, exemplar, key, out.images))

    clip_filter = ClipFilter(load_clip("tiny"), keep_best=max(1, args.variations // 2))
    clip_filter.decide(loaded[0][1], dict(enumerate(generated[0][3])))  # compiles
    started = time.perf_counter()
    for _, exemplar, _, variations in generated:
        clip_filter.decide(exemplar, dict(enumerate(variations)))
    scoring = time.perf_counter() - started

    print(f"{args.rows} exemplars x {args.variations} variations, {args.side} px, {args.steps} steps, tiny model")
    print(f"model (inversion + generation, compile excluded): {_ms(model_seconds, images)} ms/image")
    print(f"listing the source:                               {_ms(listed, images)} ms/image")
    print(f"reading + hashing exemplars:                      {_ms(read, images)} ms/image")
    print(f"CLIP filter scoring (tiny CLIP):                  {_ms(scoring, images)} ms/image")
    print(f"writing {args.image_format} at {args.output_size} size: encoding, writes, records, metadata")
    for output_format in FORMATS:
        output = work / f"out-{output_format}"
        spec = OutputSpec(output_format, args.image_format, size=args.output_size, shard_size=max(1, images // 2))
        started = time.perf_counter()
        sink = open_sink(str(output), spec, process=0, overwrite=False, log=lambda line: None)
        for row, exemplar, key, variations in generated:
            for index, image in enumerate(variations):
                sink.add(Item(key, index, row.name, metadata(row, True), exemplar.size), image)
        sink.close()
        written = time.perf_counter() - started
        started = time.perf_counter()
        finished = open_sink(str(output), spec, process=0, overwrite=False, log=lambda line: None).finished()
        resumed = time.perf_counter() - started
        assert len(finished) == images, (output_format, len(finished))
        total = listed + read + written
        share = 100 * total / model_seconds
        print(
            f"  {output_format:10} write {_ms(written, images)} ms/image, finished() on rerun {_ms(resumed, images)}"
            f" ms/image; job total {_ms(total, images)} ms/image ({share:.1f}% of the tiny model's time)"
        )


if __name__ == "__main__":
    main()
