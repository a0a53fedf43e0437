"""The compiled programs as a whole: no recompiles for new numbers, the cuDNN path's math on CPU,
progress bars, and the exemplar's side left as it was by generation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from collections.abc import Iterator
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rival_jax import RivalConfig, RivalPipeline
from rival_jax.core.attention import FUSION, QUERY_BLOCK, REPLACEMENT, inject_from_batch, inject_reference

from .test_math import SelfAttention

PROMPT = "a photo of a cat"


@contextlib.contextmanager
def compilations() -> Iterator[list[str]]:
    """The names of the functions JAX traces or compiles while the context is open."""
    names: list[str] = []

    def listen(event: str, _duration: float, **kwargs: object) -> None:
        if event.startswith("/jax/core/compile/"):
            names.append(f"{event.rsplit('/', 1)[-1]}: {kwargs.get('fun_name')}")

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_numeric_settings_never_recompile(tiny_pipe, tiny_chain):
    """Numbers and the switches that act inside the scan are traced: a second call compiles nothing."""

    def generate(config: RivalConfig, seed: int) -> np.ndarray:
        return tiny_pipe.generate(tiny_chain, num_variations=2, seed=seed, config=config, output_type="latent").latents

    first = generate(RivalConfig(), seed=0)
    changed = RivalConfig(
        guidance_scale=3.5, t_align=350, t_early=800, editing_start=950, early_replacement=False, noise_alignment=False
    )
    with compilations() as compiled:
        second = generate(changed, seed=1)
    assert compiled == []
    assert not np.allclose(first, second)
    with compilations() as compiled:
        jax.jit(lambda x: x + 1)(jnp.zeros(3)).block_until_ready()
    assert compiled, "the compilation listener hears nothing: this test cannot see a recompile"


@pytest.fixture
def flash_as_xla(monkeypatch) -> list:
    """Run `jax.nn.dot_product_attention`'s XLA implementation wherever cuDNN's is asked for; record the requests."""
    original, requested = jax.nn.dot_product_attention, []

    def xla_in_place_of_cudnn(*args, implementation=None, **kwargs):
        requested.append(implementation)
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_in_place_of_cudnn)
    return requested


@pytest.mark.parametrize("layout", ["stored", "recomputed"])
@pytest.mark.parametrize("stage", [REPLACEMENT, FUSION])
def test_cudnn_path_equals_blockwise_kernel(flash_as_xla, layout, stage):
    """Two groups of two entries (each group with its own exemplar), over several query blocks."""
    module, tokens = SelfAttention(), QUERY_BLOCK + 44
    x = jax.random.normal(jax.random.PRNGKey(0), (4, tokens, 16))
    exemplars = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (2, tokens, 16))
    variables = module.init(jax.random.PRNGKey(2), x)

    def run(implementation):
        if layout == "stored":
            with inject_reference({("attn1",): exemplars}, stage, implementation):
                return module.apply(variables, x)
        with inject_from_batch(2, jnp.array([0, 1]), stage, implementation):
            return module.apply(variables, jnp.concatenate([exemplars, x]))

    blockwise = run(None)
    assert flash_as_xla == []
    chex.assert_trees_all_close(run("cudnn"), blockwise, atol=2e-5)
    assert flash_as_xla == ["cudnn"]


@pytest.mark.parametrize("stage", [REPLACEMENT, FUSION])
def test_recomputed_exemplar_entries_ignore_the_generated_ones(stage):
    """In the authors' layout the exemplar's entries share the batch with the generated ones; each
    self-attention layer gives them what it gives the exemplar alone, whatever the generated entries hold."""
    module, tokens = SelfAttention(), QUERY_BLOCK + 44
    exemplars = jax.random.normal(jax.random.PRNGKey(0), (2, tokens, 16))
    variables = module.init(jax.random.PRNGKey(1), exemplars)
    alone = module.apply(variables, exemplars)
    for seed in (2, 3):
        generated = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), (4, tokens, 16))
        with inject_from_batch(2, jnp.array([0, 1]), stage):
            out = module.apply(variables, jnp.concatenate([exemplars, generated]))
        chex.assert_trees_all_close(out[:2], alone, atol=1e-6)
        assert not np.allclose(out[2:], module.apply(variables, generated), atol=1e-3)


EDITS_CONFIG = RivalConfig(t_align=500, t_early=700)


@pytest.fixture(scope="module")
def prompted_runs(tiny_pipe, tiny_chain) -> dict:
    """One chain (features not yet computed) generated with a new prompt, a negative prompt, a mask and
    given start latents: once keeping the exemplar's features, once recomputing them (progress on)."""
    start = np.random.default_rng(1).standard_normal((2, *tiny_chain.latents.shape[1:])).astype(np.float32)
    mask = np.zeros((96, 128), bool)
    mask[:, 40:] = True
    edits = {"prompt": "a painting of a dog", "negative_prompt": "blue sky", "mask": mask, "latents": start}
    chain = dataclasses.replace(tiny_chain, reference=None)
    latents_before = np.array(chain.latents)
    kept = tiny_pipe.generate(chain, config=EDITS_CONFIG, output_type="latent", **edits)
    features = [np.array(leaf) for leaf in jax.tree_util.tree_leaves(chain.reference)]
    recompute = RivalPipeline(tiny_pipe.models, tiny_pipe.options.replace(reference_mode="recompute"))
    with _without_persistent_cache(), contextlib.redirect_stderr(io.StringIO()) as stderr:
        recomputed = recompute.generate(chain, config=EDITS_CONFIG, output_type="latent", show_progress=True, **edits)
    return {
        "chain": chain,
        "latents_before": latents_before,
        "features_after_keep": features,
        "kept": kept,
        "recomputed": recomputed,
        "stderr": stderr.getvalue(),
    }


def test_generation_leaves_the_exemplar_side_unchanged(tiny_pipe, prompted_runs):
    """The exemplar's chain and features stay as they were; features filled in by a prompted call are
    the plain reference pass's; recomputing the exemplar beside the variations gives what its stored
    features give (so its entries follow the chain and its own prompts, not the variations')."""
    chain, kept, recomputed = prompted_runs["chain"], prompted_runs["kept"], prompted_runs["recomputed"]
    assert (kept.reference_mode, recomputed.reference_mode) == ("keep", "recompute")
    np.testing.assert_array_equal(np.array(chain.latents), prompted_runs["latents_before"])
    leaves = [np.array(leaf) for leaf in jax.tree_util.tree_leaves(chain.reference)]
    fresh = jax.tree_util.tree_leaves(tiny_pipe.reference_pass(chain))
    for after_both, after_keep, want in zip(leaves, prompted_runs["features_after_keep"], fresh, strict=True):
        np.testing.assert_array_equal(after_both, after_keep)
        np.testing.assert_array_equal(after_keep, want)
    scale = np.abs(kept.latents).max()
    np.testing.assert_allclose(recomputed.latents, kept.latents, rtol=0, atol=1e-4 * scale)


@contextlib.contextmanager
def _without_persistent_cache() -> Iterator[None]:
    """Programs tick every step only without the persistent cache (host callbacks are never cached)."""
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


def _bars(text: str) -> dict[str, str]:
    """The last state tqdm drew for each bar label."""
    bars = {}
    for line in re.split(r"[\r\n]+", text):
        match = re.match(r"^\s*([a-z ]+): (.*)$", line)
        if match:
            bars[match[1]] = match[2]
    return bars


def _assert_full(bars: dict[str, str], totals: dict[str, int]) -> None:
    assert set(bars) == set(totals), bars
    for label, total in totals.items():
        assert re.match(rf"100%\|.*\| {total}/{total} ", bars[label]), (label, bars[label])


def test_progress_bars_count_every_step(tiny_pipe, tiny_chain, prompted_runs, exemplar, capsys):
    _assert_full(_bars(prompted_runs["stderr"]), {"generation": tiny_chain.num_inference_steps * tiny_pipe.mesh.size})
    steps = tiny_chain.num_inference_steps  # the program without progress is tiny_chain's, compiled already
    with _without_persistent_cache():
        tiny_pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=steps, show_progress=True)
    _assert_full(_bars(capsys.readouterr().err), {"inversion": steps})
    tiny_pipe.invert(exemplar, prompt=PROMPT, num_inference_steps=steps)
    assert capsys.readouterr().err == ""


def _doubling(ticks: bool):
    return lambda x: x * 2


def test_a_program_compiled_from_shapes_is_the_one_a_run_then_uses():
    """`plan` compiles through `Executables.compile` from shapes; a run with arrays of those shapes reuses it."""
    from rival_jax.pipeline.compiled import Executables

    runs = Executables()
    compiled = runs.compile("doubling", _doubling, False, (jax.ShapeDtypeStruct((2, 5), jnp.float32),))
    seconds = runs.timings["doubling"]["compile_s"]

    result = runs.run("doubling", _doubling, 1, False, (jnp.ones((2, 5)),))

    np.testing.assert_array_equal(result, np.full((2, 5), 2.0))
    assert seconds > 0 and runs.timings["doubling"]["compile_s"] == seconds
    assert compiled.memory_analysis().argument_size_in_bytes == 40


def test_a_second_load_of_an_architecture_compiles_nothing_and_gives_the_same_images(
    tiny_flax, tiny_sd2, exemplar, fresh_programs
):
    """Pipelines share compiled programs when their modules are configured alike (the weights are arguments)."""

    def run(model: Path) -> tuple[RivalPipeline, np.ndarray]:
        pipe = RivalPipeline.from_pretrained(model, cache_dir=None)
        chain = pipe.invert(exemplar, num_inference_steps=2)
        return pipe, pipe.generate(chain, num_variations=2, seed=3, output_type="latent").latents

    first, first_latents = run(tiny_flax)
    second, second_latents = run(tiny_flax)
    assert second.statics.modules == first.statics.modules and second.statics.modules is not first.statics.modules
    assert all(t["compile_s"] == 0 for t in second.executables.timings.values()), dict(second.executables.timings)
    np.testing.assert_array_equal(second_latents, first_latents)

    other = RivalPipeline.from_pretrained(tiny_sd2, cache_dir=None)  # v-prediction, its own UNet
    assert other.statics.modules != first.statics.modules  # so its programs are its own
