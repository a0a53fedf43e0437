"""Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, over random subsets.

k(x, y) = (x . y / d + 1)^3 on d-dimensional features, as in Binkowski et al. (2018) and clean-fid;
the paper reports KID x 10^3. Subsets are drawn from an explicit JAX key made from the seed.
"""

from __future__ import annotations

import jax
import numpy as np

SUBSETS = 100
SUBSET_SIZE = 1000


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x . y / d + 1)^3 for every pair of rows of (m, d) and (n, d) features."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimate between two feature sets of at least two rows each."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kid(
    real: np.ndarray, generated: np.ndarray, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE, seed: int = 0
) -> tuple[float, float] | None:
    """(mean, std) of the unbiased MMD^2 over random subsets; None if either set has fewer than two rows.

    Each subset takes min(subset_size, len(real), len(generated)) rows of each set without replacement.

    Args:
        real: (m, d) features of the real images (the exemplars).
        generated: (n, d) features of the generated images.
        subsets: number of subsets.
        subset_size: rows per subset.
        seed: seeds the subset draws.

    >>> mean, std = kid(inception_features(exemplars), inception_features(variations))
    """
    size = min(subset_size, len(real), len(generated))
    if size < 2:
        return None
    real_key, generated_key = jax.random.split(jax.random.PRNGKey(seed))
    # Each row of uniforms sorted is a random permutation: one draw per set for every subset.
    pick_real = np.argsort(np.asarray(jax.random.uniform(real_key, (subsets, len(real)))), axis=1)[:, :size]
    pick_generated = np.argsort(np.asarray(jax.random.uniform(generated_key, (subsets, len(generated)))), axis=1)
    values = [mmd2_unbiased(real[r], generated[g]) for r, g in zip(pick_real, pick_generated[:, :size], strict=True)]
    return float(np.mean(values)), float(np.std(values))
