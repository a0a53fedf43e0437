"""The authors' files put every stage on the step their code does (their attention layer counts t - 1).

Here every step count and threshold against their counter rule; `tests/test_parity.py` runs the
`boundary` case (their code with `t_align` 600 at 10 steps, fusing from t = 601) through their config.
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import pytest

from rival_jax.core.ddim import DDIMSchedule
from rival_jax.core.sampler import FUSION, PLAIN, REPLACEMENT, attention_stage
from rival_jax.jobs.authors import from_step_counter, inference_settings
from rival_jax.jobs.settings import ROW_FIELDS, merge_settings, read_settings_file

from .conftest import PARITY

STEP_COUNTS = (10, 20, 25, 50)
INFERENCE = sorted((PARITY.parent / "authors-configs" / "configs").glob("*.json"))


def authors_stages(steps: int, t_align: int, editing_early_steps: int) -> list[int]:
    """The stage of each step as rival/attention_forward.py decides it, with its per-layer counter."""
    init_step, step_size, stages = 1000, 1000 // steps, []
    for _ in range(steps):
        init_step -= step_size
        if init_step > editing_early_steps:
            stages.append(PLAIN)
        else:
            stages.append(REPLACEMENT if init_step > t_align else FUSION)
        if init_step <= 0:
            init_step = 1000
    return stages


@functools.cache
def schedule() -> DDIMSchedule:
    config = PARITY / "tiny-sd" / "scheduler" / "scheduler_config.json"
    return DDIMSchedule.from_scheduler_config(json.loads(config.read_text()))


def our_stages(steps: int, settings: dict) -> list[int]:
    """The stage of each step as rival-jax decides it from the job's settings, on the real timesteps."""
    config = merge_settings({**settings, "steps": steps})["config"]
    return attention_stage(jnp.asarray(schedule().timesteps(steps)), config.as_arrays()).tolist()


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_every_t_align_of_their_config_switches_to_fusion_on_their_step(steps):
    for theirs in range(-1, 1001):
        settings = inference_settings({"self_attn": {"t_align": theirs}}, "c.json")
        assert our_stages(steps, settings) == authors_stages(steps, theirs, 1000), theirs


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_every_editing_early_steps_of_their_scripts_starts_injection_on_their_step(steps):
    for theirs in range(-1, 1001):
        settings = {"t_align": from_step_counter(600, 999), "editing_start": from_step_counter(theirs, 1000)}
        assert our_stages(steps, settings) == authors_stages(steps, 600, theirs), theirs


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_their_vendored_configs_and_the_edit_task_keep_their_stages(steps):
    for path in INFERENCE:
        values = json.loads(path.read_text())
        settings = read_settings_file(path, ROW_FIELDS)
        assert settings["authors_t_align"] == values["self_attn"]["t_align"]
        assert settings["t_early"] == values["inference"]["t_early"]  # their AdaIN gate compares the timestep itself
        assert our_stages(steps, settings) == authors_stages(steps, values["self_attn"]["t_align"], 1000)
        # Their editing script passes --editing_early_steps 900; `--task edit` stands for it.
        edit = {**settings, "task": "edit"}
        assert our_stages(steps, edit) == authors_stages(steps, values["self_attn"]["t_align"], 900)


def test_authors_t_align_is_recorded_only_while_t_align_is_its_mapping():
    settings = inference_settings({"self_attn": {"t_align": 600}}, "c.json")
    assert merge_settings(settings)["authors_t_align"] == 600 and merge_settings(settings)["t_align"] == 601
    assert merge_settings(settings, {"t_align": 500})["authors_t_align"] is None
    assert merge_settings({})["authors_t_align"] is None
