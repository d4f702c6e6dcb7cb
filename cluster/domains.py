"""Spatial domains from the learned embedding."""
from __future__ import annotations

import numpy as np


def kmeans_domains(embedding: np.ndarray, n_domains: int, seed: int) -> np.ndarray:
    """k-means with a fixed number of domains (10 restarts, seeded): labels 0..n_domains-1."""
    from sklearn.cluster import KMeans

    if not 2 <= n_domains <= len(embedding):
        raise ValueError(f"n_domains must be between 2 and {len(embedding)}, got {n_domains}")
    km = KMeans(n_clusters=n_domains, n_init=10, random_state=seed)
    return km.fit_predict(np.asarray(embedding, dtype=np.float64)).astype(np.int64)
