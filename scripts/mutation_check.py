"""Mutation check: apply named bugs to a copy of the package, run the tests meant to catch each, print a table.

Each mutation replaces one exact snippet of one file of `rival_jax`. The package and the tests are copied
to a temporary folder, the snippet is replaced there, and `pytest -x` runs the mutation's tests with the
copy first on the path. A mutation is "killed" when those tests fail. The check exits 1 when any mutation
survives, errors or times out, or when a snippet is no longer in the code (so the list cannot rot silently).
Not part of the test suite: it runs the tiny models many times (tens of minutes on a 2-core CPU).

Usage:
    python3 scripts/mutation_check.py                  # every mutation
    python3 scripts/mutation_check.py --only adain_at_t_early --only mask_threshold_strict
    python3 scripts/mutation_check.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLER = "rival_jax/core/sampler.py"
PARITY = "tests/test_parity.py::test_generated_latent_matches_authors"
BOUNDARIES = "tests/test_stage_boundaries.py"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]


def _switch_ignored(switch: str, original: str, replacement: str) -> Mutation:
    test = f"{BOUNDARIES}::test_each_ablation_switch_changes_the_variations[{switch}]"
    return Mutation(f"{switch}_ignored", SAMPLER, original, replacement, (test,))


MUTATIONS = (
    Mutation(
        "uncond_cond_swapped",
        SAMPLER,
        "eps_uncond, eps_cond = jnp.split(eps, 2)",
        "eps_cond, eps_uncond = jnp.split(eps, 2)",
        (f"{PARITY}[variation_null]",),
    ),
    Mutation(
        "adain_variance_biased",
        SAMPLER,
        "mean_x, std_x = stats(x)",
        "mean_x, std_x = x.mean(axis=(-2, -1), keepdims=True), jnp.sqrt(x.var(axis=(-2, -1), keepdims=True) + 1e-5)",
        ("tests/test_math.py::test_adain_gives_target_channel_statistics",),
    ),
    Mutation(
        "no_copy_outside_mask",
        SAMPLER,
        "x_next = jnp.where(inputs.region[None, None], x_next, x_reference_next[None])",
        "x_next = jnp.where(inputs.region[None, None], x_next, x_next)",
        ("tests/test_pipeline.py::test_inpainting_keeps_the_exemplar_outside_the_mask",),
    ),
    Mutation(
        "copy_outside_mask_at_last_step_only",
        SAMPLER,
        "x_next = jnp.where(inputs.region[None, None], x_next, x_reference_next[None])",
        "x_next = jnp.where(inputs.region[None, None] | (index < steps - 1), x_next, x_reference_next[None])",
        (f"{BOUNDARIES}::test_inpainting_copies_the_exemplar_chain_outside_the_mask_at_every_step",),
    ),
    Mutation(
        "channels_shuffled_independently",
        SAMPLER,
        "shuffled = flat.at[:, targets].set(flat[:, sources])",
        "shuffled = jax.vmap(lambda row, k: row.at[targets].set(row[jnp.argsort(jnp.where(inside, "
        "jax.random.uniform(k, inside.shape), 2.0), stable=True)]))(flat, jax.random.split(key, channels))",
        ("tests/test_math.py::test_shuffle_is_one_spatial_permutation_for_all_channels",),
    ),
    Mutation(
        "seed_folded_with_batch_position",
        SAMPLER,
        "jax.random.fold_in(seed_key, i))(indices)",
        "jax.random.fold_in(seed_key, i))(jnp.arange(indices.shape[0]))",
        ("tests/test_math.py::test_start_latents_depend_on_seed_and_index_only",),
    ),
    Mutation(
        "replacement_at_t_align",
        SAMPLER,
        'fuse = (t <= settings["t_align"])',
        'fuse = (t < settings["t_align"])',
        ("tests/test_math.py::test_attention_stage_follows_the_timestep", BOUNDARIES),
    ),
    Mutation(
        "adain_at_t_early",
        SAMPLER,
        'settings["noise_alignment"] & (t > settings["t_early"])',
        'settings["noise_alignment"] & (t >= settings["t_early"])',
        (f"{BOUNDARIES}::test_noise_alignment_stops_at_the_step_on_t_early",),
    ),
    Mutation(
        "adain_on_conditional_noise",
        SAMPLER,
        "lambda g: adain(g, eps_reference.astype(jnp.float32))",
        "lambda g: adain(eps_cond, eps_reference.astype(jnp.float32))",
        (f"{PARITY}[variation_null]",),
    ),
    Mutation(
        "editing_start_ignored",
        SAMPLER,
        'inject = settings["attention_injection"] & (t <= settings["editing_start"])',
        'inject = settings["attention_injection"] & (t <= 1000)',
        ("tests/test_math.py::test_attention_stage_follows_the_timestep", f"{PARITY}[editing]"),
    ),
    _switch_ignored(
        "attention_injection",
        'inject = settings["attention_injection"] & (',
        "inject = jnp.bool_(True) & (",
    ),
    _switch_ignored(
        "early_replacement",
        '(t <= settings["t_align"]) | ~settings["early_replacement"]',
        '(t <= settings["t_align"])',
    ),
    _switch_ignored(
        "latent_alignment",
        "if not latent_alignment:",
        "if False:",
    ),
    _switch_ignored(
        "noise_alignment",
        'settings["noise_alignment"] & (t > settings["t_early"])',
        '(t > settings["t_early"])',
    ),
    Mutation(
        "mask_threshold_strict",
        "rival_jax/images.py",
        "region = pooled >= 0.5",
        "region = pooled > 0.5",
        (f"{BOUNDARIES}::test_mask_cell_half_covered_is_regenerated",),
    ),
    Mutation(
        "exemplar_contexts_swapped",
        SAMPLER,
        "group_context = jnp.array([0, contexts.size - 1])",
        "group_context = jnp.array([contexts.size - 1, 0])",
        (f"{PARITY}[variation_prompt]",),
    ),
)


def apply(mutation: Mutation, root: Path) -> bool:
    """Replace the snippet in the copy at `root`; False when it does not occur exactly once."""
    target = root / mutation.path
    text = target.read_text()
    if text.count(mutation.original) != 1:
        return False
    target.write_text(text.replace(mutation.original, mutation.replacement))
    return True


def run(mutation: Mutation, timeout: float) -> tuple[str, float]:
    """(outcome, seconds) of one mutation: killed, survived, snippet not found, error or timeout."""
    with tempfile.TemporaryDirectory(prefix="rival-mutation-") as folder:
        root = Path(folder)
        shutil.copytree(ROOT / "rival_jax", root / "rival_jax", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", root)
        if not apply(mutation, root):
            return "snippet not found", 0.0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
        start = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start
        seconds = time.perf_counter() - start
        # pytest: 0 all passed, 1 some test failed; anything else (collection error, no tests) is an error.
        outcome = {0: "survived", 1: "killed"}.get(result.returncode, f"error (pytest exit {result.returncode})")
        if outcome.startswith("error"):
            print(result.stdout[-2000:], result.stderr[-2000:], sep="\n", file=sys.stderr)
        return outcome, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per mutation's tests (default 1200)")
    args = parser.parse_args(argv)
    names = [mutation.name for mutation in MUTATIONS]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}: use --list to see the names")
    chosen = [mutation for mutation in MUTATIONS if not args.only or mutation.name in args.only]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}  ({mutation.path})\n    tests: {' '.join(mutation.tests)}")
        return 0
    width = max(len(mutation.name) for mutation in chosen)
    print(f"{'mutation':<{width}}  {'outcome':<20}  seconds", flush=True)
    failed = 0
    for mutation in chosen:
        outcome, seconds = run(mutation, args.timeout)
        failed += outcome != "killed"
        print(f"{mutation.name:<{width}}  {outcome:<20}  {seconds:7.0f}", flush=True)
    print(f"{len(chosen) - failed} of {len(chosen)} killed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
