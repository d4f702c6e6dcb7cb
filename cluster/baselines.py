"""Simple label-free baselines for the experiment tables: what SemST has to beat.

- ``pca-kmeans``: k-means on the first principal components of the preprocessed expression
  (the same HVG matrix SemST reads), i.e. no graph, no LLM.
- ``pca-spatial-kmeans``: the same principal components averaged over each spot's spatial
  neighbourhood (the dataset's spatial graph, ``hops`` times) before k-means: the simplest way to
  use the tissue layout.

Both use the dataset's own config (preprocessing, spatial graph) and the same k-means
(:func:`semst.cluster.domains.kmeans_domains`) and metrics as SemST; nothing is tuned on labels. PCA is
deterministic (fixed solver seed); seeds only change k-means, so their sd measures k-means alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

BASELINES = ("pca-kmeans", "pca-spatial-kmeans")
DEFAULT_N_PCS = 30
PCA_SEED = 0  # the PCA is part of the method, not of the seed being varied


class BaselineError(ValueError):
    """A baseline cannot run as asked; the message says what to change."""


def pca_embedding(features, n_pcs: int = DEFAULT_N_PCS) -> np.ndarray:
    """The first ``n_pcs`` principal components (capped by the data's shape) of ``features``."""
    from sklearn.decomposition import PCA

    X = np.asarray(features, dtype=np.float64)
    if n_pcs < 1:
        raise BaselineError(f"n_pcs must be >= 1, got {n_pcs}")
    n = min(n_pcs, X.shape[0] - 1, X.shape[1])
    if n < 1:
        raise BaselineError(f"PCA needs at least 2 spots and 1 gene, got shape {X.shape}")
    return PCA(n_components=n, random_state=PCA_SEED).fit_transform(X).astype(np.float32)


def graph_adjacency(graph) -> sp.csr_matrix:
    """The DGL graph's adjacency (self-loops included, as the graphs are built) as a CSR matrix."""
    src, dst = (t.numpy() for t in graph.edges())
    n = graph.num_nodes()
    adj = sp.csr_matrix((np.ones(len(src), dtype=np.float64), (dst, src)), shape=(n, n))
    adj.data[:] = 1.0  # duplicate edges count once
    return adj


def smooth_over_graph(values, adjacency, hops: int = 1) -> np.ndarray:
    """Each row replaced by the mean over its neighbourhood (row-normalised adjacency), ``hops`` times."""
    if hops < 0:
        raise BaselineError(f"hops must be >= 0, got {hops}")
    adj = sp.csr_matrix(adjacency, dtype=np.float64)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    if (degree == 0).any():
        raise BaselineError(f"{int((degree == 0).sum())} spots have no neighbour (not even themselves) "
                            f"in the graph; build it with self-loops")
    walk = sp.diags(1.0 / degree) @ adj
    out = np.asarray(values, dtype=np.float64)
    for _ in range(hops):
        out = walk @ out
    return out.astype(np.float32)


def baseline_embedding(method: str, features, spatial=None, n_pcs: int = DEFAULT_N_PCS,
                       hops: int = 1) -> np.ndarray:
    """The representation a baseline clusters: PCA, or PCA smoothed over the spatial graph."""
    if method not in BASELINES:
        raise BaselineError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    pcs = pca_embedding(features, n_pcs)
    if method == "pca-kmeans":
        return pcs
    if spatial is None:
        raise BaselineError("pca-spatial-kmeans needs the spatial graph")
    return smooth_over_graph(pcs, graph_adjacency(spatial), hops)


@dataclass
class FixedLatent:
    """A baseline's "fit": the same representation for every seed (only k-means varies)."""

    latent: np.ndarray
    history: dict = field(default_factory=dict)


def baseline_dataset(cfg, method: str, n_pcs: int = DEFAULT_N_PCS, hops: int = 1, adata=None,
                     log=print):
    """Run a baseline on ``cfg.dataset`` for every seed of ``cfg``: a ClusterReport like SemST's."""
    from semst.cluster.runner import load_slide, run_seeds

    if method not in BASELINES:
        raise BaselineError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    slide = load_slide(cfg, adata)
    t0 = time.perf_counter()
    sgraph = slide.spatial_graph if method == "pca-spatial-kmeans" else None
    fixed = FixedLatent(baseline_embedding(method, slide.prep.X, sgraph, n_pcs, hops))
    shared_seconds = time.perf_counter() - t0
    log(f"{cfg.dataset}: {method} on {fixed.latent.shape[1]} PCs of {slide.prep.n_vars} genes, "
        f"{slide.n_domains} domains")
    return run_seeds(slide, lambda seed: fixed, log=log, fixed_seconds=shared_seconds)
