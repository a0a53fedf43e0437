"""`rival-jax plan`: a run's programs compiled from shapes for a target, measured per device; its exit codes.

Host-device targets (cpu:D) need no libtpu; the TPU slices' tests skip without it (run them with a
Python that has the `tpu` extra).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from rival_jax.cli import main
from rival_jax.jobs.plan import host_work
from rival_jax.tpu.plan import Measurement, Outcome, Planner, Work
from rival_jax.tpu.shapes import model_shapes
from rival_jax.tpu.targets import GIB, resolve_target

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='pip install -e ".[tpu]"')
TINY_RUN = ["--steps", "2", "--resolution", "64", "--prompt", "a cat"]


@pytest.fixture(scope="module")
def cpu_planner() -> Planner:
    """Tiny SD 1 at 64x64 on one host device, 2 steps, with room for everything."""
    shapes = model_shapes("tiny", None, jnp.float32, 64, False)
    return Planner(shapes, resolve_target("cpu:1"), "xla", 8, 64 * GIB)


def test_every_program_of_a_run_is_measured_per_device_with_positive_memory_and_cost(cpu_planner: Planner) -> None:
    outcome = cpu_planner.outcome(Work(1, 2, 2, 2, "keep"), "keep")
    labels = [m.label for m in outcome.measurements]
    assert labels == ["inversion", "reference pass", "generation (keep)", "VAE decode", "plain SD"]
    for m in outcome.measurements:
        assert m.arguments > 0 and m.total > 0 and m.flops > 0 and m.bytes_accessed > 0 and m.compile_s > 0, m
    assert outcome.fits and outcome.seconds_per_variation is None  # host devices have no roofline figures
    assert outcome.reference_batch == 4  # 2 steps x 2 contexts: one UNet batch of 4, under the option's 8


def test_memory_and_flops_grow_with_the_variations(cpu_planner: Planner) -> None:
    two, four = (cpu_planner.outcome(Work(1, n, 2, 2, "recompute"), "recompute") for n in (2, 4))
    assert two.reference_batch is None  # recompute has no reference pass
    by_label = {m.label: m for m in four.measurements}
    for small in two.measurements:
        large = by_label[small.label]
        if small.label == "inversion":  # one exemplar either way
            assert large == dataclasses.replace(small, compile_s=large.compile_s)
        else:
            assert large.total > small.total and large.flops > small.flops, small.label


def test_the_other_reference_mode_is_planned_when_the_asked_one_does_not_fit(cpu_planner: Planner) -> None:
    work = Work(1, 2, 2, 2, "keep")
    outcomes = {mode: cpu_planner.outcome(work, mode) for mode in ("keep", "recompute")}
    peak = {mode: max(m.total for m in outcome.measurements) for mode, outcome in outcomes.items()}
    larger, smaller = sorted(peak, key=peak.get, reverse=True)
    assert peak[larger] > peak[smaller]
    tight = Planner(cpu_planner.shapes, cpu_planner.target, "xla", 8, peak[smaller])
    tight.executables = cpu_planner.executables  # the same programs: compiled once

    plan = tight.plan(dataclasses.replace(work, mode=larger))

    assert not plan.asked.fits and plan.asked.mode == larger
    assert (plan.fitting.mode, plan.fitting.variations) == (smaller, 2)


def test_plan_on_host_devices_prints_every_program_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--target", "cpu:1", "--model", "tiny", "-n", "2", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    for line in ("target cpu:1: 1 host devices", "generation (keep)", "VAE decode", "plain SD", "(reference batch 1)"):
        assert line in out
    assert out.strip().splitlines()[-1] == "fits: reference mode keep, N = 2, every program within memory"


def test_plan_exits_1_naming_the_program_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["plan", "--target", "cpu:1", "--model", "tiny", "-n", "1", "--chip-memory", "0.0001", *TINY_RUN]
    assert main(arguments) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit: ") and "GiB of 0.00 GiB per device" in last
    assert last.endswith("nothing fits, not even N = 1 in reference mode recompute")


def test_a_reference_pass_that_does_not_fit_is_planned_in_smaller_batches(capsys: pytest.CaptureFixture[str]) -> None:
    # 256x256: the reference pass's 4 evaluations in one batch need more than 0.07 GiB, in batches of 2 less
    arguments = ["plan", "--target", "cpu:1", "--model", "tiny", "-n", "1", "--reference-mode", "keep"]
    arguments += ["--reference-batch-size", "4"]  # a CPU's default is 1
    assert main([*arguments, "--steps", "2", "--resolution", "256", "--prompt", "a cat", "--chip-memory", "0.07"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("does not fit: reference pass needs ")
    assert out[-1].endswith("would fit: --reference-mode keep --reference-batch-size 2 with N = 1")
    assert any(line.startswith("reference mode keep (reference batch 2), N = 1") for line in out)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--target", "v7:2x2", "--family", "sd1"], "unknown: use one of JAX topologies v5e:AxB"),
        (["--family", "sd1"], "plan needs --target"),
        (["--target", "cpu:1", "--family", "sd1", "--model", "tiny"], "one of --model M"),
        (["--target", "cpu:1", "--model", "/nowhere"], "plan reads a model's configs from a local diffusers folder"),
        (["--target", "cpu:1", "--model", "tiny", "--attention", "pallas"], "needs a TPU target"),
        (["--target", "cpu:1", "--model", "tiny", "--attention", "cudnn"], "needs an NVIDIA GPU target"),
        (["--target", "v5e:4x4", "--model", "tiny", "-n", "2"], "leave hosts idle on 4 hosts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["plan", *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_tpu_targets_without_libtpu_say_how_to_install_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert main(["plan", "--target", "v5e:2x2", "--family", "sdxl"]) == 2
    assert 'pip install -e ".[tpu]"' in capsys.readouterr().err


@pytest.mark.parametrize(
    ("exemplars", "variations", "hosts", "share"),
    [(1, 16, 4, (1, 4)), (8, 4, 4, (2, 4)), (3, 4, 2, (2, 4)), (1, 8, 1, (1, 8))],
)
def test_each_host_plans_its_share_of_the_job_as_augment_splits_it(
    exemplars: int, variations: int, hosts: int, share: tuple[int, int]
) -> None:
    assert host_work(exemplars, variations, hosts) == share


@needs_libtpu
def test_a_multi_host_slice_is_planned_on_the_first_hosts_chips(capsys: pytest.CaptureFixture[str]) -> None:
    """v5e:4x4: 16 chips on 4 hosts; 8 variations leave 2 to each host, split over its 4 chips (tiny SDXL's
    generation for that slice: tests/test_tpu_targets.py)."""
    assert main(["plan", "--target", "v5e:4x4", "--model", "tiny", "-n", "8", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert "16 x TPU v5 lite, 4 hosts, programs on the first's 4 devices" in out
    assert "per host 1 exemplar(s) x 2 variations" in out
    assert "variations per chip-hour" in out and "RIVAL / plain SD = " in out


def test_a_model_folder_is_planned_from_its_configs_as_the_built_in_model_it_holds(tiny_flax) -> None:
    folder, built_in = (model_shapes(m, None, jnp.bfloat16, None, False) for m in (str(tiny_flax), "tiny"))
    assert (folder.family, folder.latent, folder.size) == (built_in.family, built_in.latent, built_in.size)
    assert jax.tree_util.tree_structure(folder.params) == jax.tree_util.tree_structure(built_in.params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(folder.params)} == {jnp.dtype(jnp.bfloat16)}


@needs_libtpu
def test_a_program_the_tpu_compiler_cannot_fit_is_reported_out_of_memory_with_its_need() -> None:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from rival_jax.tpu import report
    from rival_jax.tpu.plan import Outcome, Plan
    from rival_jax.tpu.shapes import Call

    side = 70_000  # a sorted side x side float32 matrix: 18 GiB of temporaries on a 16 GiB v5e chip
    target = resolve_target("v5e:1x1")
    row = jax.ShapeDtypeStruct(
        (side,), jnp.float32, sharding=NamedSharding(Mesh(target.local_devices, "x"), PartitionSpec())
    )

    def program(ticks: bool):
        return lambda x: jnp.sort(jnp.broadcast_to(x, (side, side)), axis=0)[0]

    planner = Planner(model_shapes("tiny", None, jnp.bfloat16, 64, False), target, "xla", 8, 16 * GIB)
    measured, outputs = planner.measure(Call("sort", program, (row,), 1))

    assert measured.out_of_memory and outputs is None and measured.temporaries >= side * side * 4
    outcome = Outcome("keep", 1, (measured,), measured, measured, 16 * GIB, 1, 8)
    assert not outcome.fits and outcome.seconds_per_variation is None
    assert "out of memory" in report.table(outcome)[1]
    assert report.summary(outcome, 1).endswith(
        "no estimate, the compiler ran out of device memory for sort, sort, sort"
    )
    verdict = report.verdict(Plan(outcome, None), 1)
    assert verdict.startswith("does not fit: sort does not compile within 16.00 GiB per device (temporaries ")


def _measured(label: str, gib: float, roofline_s: float | None = 1.0, out_of_memory: bool = False) -> Measurement:
    """A program of `gib` GiB per device: all temporaries when the compiler refused it, all arguments else."""
    size = int(gib * GIB)
    held = (0, size) if out_of_memory else (size, 0)
    return Measurement(label, *held, 0, 0, 1.0, 1.0, roofline_s, 5.0, out_of_memory)


def test_the_readme_plan_table_rows_give_each_programs_memory_and_mark_what_the_compiler_refused() -> None:
    path = Path(__file__).resolve().parents[1] / "scripts" / "plan_table.py"
    spec = importlib.util.spec_from_file_location("plan_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rival = (_measured("inversion", 1), _measured("reference pass", 2), _measured("generation (keep)", 3))
    fitting = Outcome("keep", 4, rival, _measured("VAE decode", 1), _measured("plain SD", 2, 2.0), 4 * GIB, 4, 8)
    # 4 programs of 1 roofline second for 4 images on a host of 2 chips: 1 s per variation, 1,800 per chip-hour
    expected = "| SD | v5e:2x2 | keep | 4 | 1.00 | 2.00 | 3.00 | 1.00 | 75% | 1 | 1,800 | 1.33 | 25 |"
    assert table.row("SD", "v5e:2x2", fitting, 2.0) == expected
    refused = dataclasses.replace(fitting, rival=(rival[0], _measured("reference pass", 17.5, None, True)))
    cells = table.row("SD", "v5e:2x2", refused, 2.0).split(" | ")
    assert cells[5:12] == ["out of memory (17.50 temp.)", "-", "1.00", "over 100%", "-", "-", "-"]
    pallas = table.row("SD", "v5e:2x2", fitting, 2.0, "pallas").split(" | ")  # memory only: its FLOPs are unseen
    assert pallas[2:4] == ["keep (pallas)", "4"] and pallas[8:13] == ["75%", "-", "-", "-", "25 |"]
    smaller = dataclasses.replace(fitting, reference_batch=2)
    assert table.row("SD", "v5e:2x2", smaller, 2.0, "pallas").split(" | ")[2] == "keep (reference batch 2, pallas)"
