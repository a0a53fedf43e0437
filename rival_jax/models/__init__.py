"""Checkpoints: diffusers folders, hub ids and single files of SD 1.x, SD 2.x and SDXL to Flax modules and
params; tiny and full-size random models of each family."""
