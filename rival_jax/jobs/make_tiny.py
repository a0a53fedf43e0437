"""`rival-jax make-tiny`: the built-in tiny random checkpoint (and optionally its ControlNet), written to a folder."""

from __future__ import annotations

from rival_jax.jobs.options import MakeTinyOptions


def run_job(job: MakeTinyOptions) -> int:
    """Write the checkpoint to `job.folder` (a ControlNet in `folder/controlnet` with `job.controlnet`); prints it.

    >>> run_job(MakeTinyOptions(folder="tiny", format="safetensors", family="sdxl"))
    0
    """
    from rival_jax.models.random_controlnet import write_tiny_controlnet
    from rival_jax.models.random_models import write_tiny_checkpoint

    folder = write_tiny_checkpoint(job.folder, seed=job.seed, weight_format=job.format, family=job.family)
    if job.controlnet:
        write_tiny_controlnet(folder / "controlnet", folder, seed=job.seed, weight_format=job.format)
    print(folder)
    return 0
