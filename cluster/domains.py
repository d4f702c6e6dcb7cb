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


def align_labels(labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``labels`` renamed to the ``reference`` label each cluster overlaps most, under a one-to-one
    (Hungarian) matching; clusters left without a partner get new labels above the reference's."""
    from scipy.optimize import linear_sum_assignment

    labels, reference = np.asarray(labels), np.asarray(reference)
    own, li = np.unique(labels, return_inverse=True)
    refs, ri = np.unique(reference, return_inverse=True)
    overlap = np.zeros((len(own), len(refs)), dtype=np.int64)
    np.add.at(overlap, (li, ri), 1)
    rows, cols = linear_sum_assignment(-overlap)
    mapping = np.empty(len(own), dtype=np.int64)
    mapping[rows] = refs[cols]
    unmatched = np.setdiff1d(np.arange(len(own)), rows)
    mapping[unmatched] = int(refs.max()) + 1 + np.arange(len(unmatched))
    return mapping[li]


def consensus_labels(runs: list[np.ndarray], max_rounds: int = 20) -> np.ndarray:
    """One labelling from several runs (seeds): Hungarian-aligned majority vote.

    Every run is renamed to the first run's labels (:func:`align_labels`), each spot takes the label
    most runs give it (ties: the current reference's label), and the vote is repeated against its own
    result until it no longer changes. Why this and not a co-association matrix clustered once more:
    the vote needs memory linear in the spots (a co-association matrix is spots x spots: 200 MB at 5k
    spots, 80 GB at 100k), it keeps the runs' own domains (no second clustering method to choose) and
    the result keeps the first run's label numbers. Identical runs (also under renamed labels) give
    exactly the first run's labelling.
    """
    runs = [np.asarray(r, dtype=np.int64) for r in runs]
    if not runs:
        raise ValueError("consensus needs at least one labelling")
    reference = runs[0]
    for _ in range(max_rounds):
        aligned = np.stack([align_labels(r, reference) for r in runs])
        n_labels = int(aligned.max()) + 1
        votes = np.zeros((len(reference), n_labels), dtype=np.float64)
        for row in aligned:
            votes[np.arange(len(reference)), row] += 1.0
        votes[np.arange(len(reference)), reference] += 0.5  # ties keep the reference's label
        voted = votes.argmax(axis=1).astype(np.int64)
        if np.array_equal(voted, reference):
            break
        reference = voted
    return reference


def refine_labels(labels: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """GraphST's ``refine``: each spot takes the label most of its spatial neighbours have.

    ``src``, ``dst``: the spatial graph's edges without self-loops (both directions). A tie between
    labels keeps the spot's own label if it is among them (else the smallest); a spot without
    neighbours keeps its label. One pass, on the same spatial graph the model was trained on.
    """
    import scipy.sparse as sp

    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    names, idx = np.unique(labels, return_inverse=True)
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), idx)), shape=(n, len(names)))
    adjacency = sp.csr_matrix((np.ones(len(src)), (np.asarray(dst), np.asarray(src))), shape=(n, n))
    adjacency.data[:] = 1.0  # a duplicated edge counts once
    votes = np.asarray((adjacency @ onehot).todense()) + 0.5 * onehot.toarray()
    return names[votes.argmax(axis=1)]
