"""Compiling for TPU slices without one: targets (`targets`)."""
