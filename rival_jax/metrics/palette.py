"""Palette distance as the paper defines it: 10-colour k-means palettes in RGB scaled to [0, 1], the
generated image's palette matched to the exemplar's (Hungarian matching), summed L1 distance of the pairs."""

from __future__ import annotations

import numpy as np

COLOURS = 10
# k-means restarts: fixed, so a palette depends on the image and the seed only.
RESTARTS = 4
# Pixels clustered per image: more adds time, not accuracy, for a 10-colour palette.
MAX_PIXELS = 1 << 14


def palette(pixels: np.ndarray, colours: int = COLOURS, seed: int = 0) -> np.ndarray:
    """The (colours, 3) k-means centres of an RGB uint8 image (H, W, 3), in [0, 1].

    Images larger than `MAX_PIXELS` pixels are clustered on a seeded random sample of that many.

    >>> palette(np.asarray(Image.open("a.png").convert("RGB"))).shape
    (10, 3)
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    points = np.asarray(pixels, np.float64).reshape(-1, 3) / 255.0
    rng = np.random.default_rng(seed)
    if len(points) > MAX_PIXELS:
        points = points[rng.choice(len(points), MAX_PIXELS, replace=False)]
    distinct = len(np.unique(points, axis=0))
    # Fewer distinct colours than clusters: each colour is a centre, repeated to fill the palette.
    if distinct <= colours:
        unique = np.unique(points, axis=0)
        return unique[np.arange(colours) % distinct]
    # scikit-learn's OpenMP threads spin against JAX's thread pool; one thread is many times faster here.
    with threadpool_limits(limits=1):
        kmeans = KMeans(n_clusters=colours, n_init=RESTARTS, random_state=seed).fit(points)
    return kmeans.cluster_centers_


def palette_distance(generated: np.ndarray, exemplar: np.ndarray) -> float:
    """Summed L1 distance of two palettes after matching each generated colour to one exemplar colour.

    >>> palette_distance(palette(variation), palette(exemplar))
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    cost = cdist(generated, exemplar, metric="cityblock")
    rows, columns = linear_sum_assignment(cost)
    return float(cost[rows, columns].sum())
