"""Spatial domains from the learned embedding."""
from __future__ import annotations

import numpy as np

KMEANS_FIT_MAX = 200_000  # above this many spots, k-means is fitted on a seeded sample of this size


def kmeans_domains(embedding: np.ndarray, n_domains: int, seed: int) -> np.ndarray:
    """k-means with a fixed number of domains (10 restarts, seeded): labels 0..n_domains-1.

    Up to ``KMEANS_FIT_MAX`` spots every spot takes part in the fit. Above, the centres are fitted
    on a random sample of that many spots (drawn with ``seed``) and every spot is assigned to its
    nearest centre: at 1M spots the full 10-restart fit is minutes of work that a 200k sample
    answers as well. Same seed, same labels.
    """
    from sklearn.cluster import KMeans

    X = np.asarray(embedding, dtype=np.float64)
    if not 2 <= n_domains <= len(X):
        raise ValueError(f"n_domains must be between 2 and {len(X)}, got {n_domains}")
    km = KMeans(n_clusters=n_domains, n_init=10, random_state=seed)
    if len(X) <= KMEANS_FIT_MAX:
        return km.fit_predict(X).astype(np.int64)
    sample = np.random.default_rng(seed).choice(len(X), KMEANS_FIT_MAX, replace=False)
    km.fit(X[np.sort(sample)])
    return km.predict(X).astype(np.int64)
