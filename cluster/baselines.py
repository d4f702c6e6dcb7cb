"""Simple label-free baselines for the experiment tables: what SemST has to beat. The arithmetic is
here; the methods themselves (registered in :mod:`semst.cluster.methods`) are

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

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from semst.shared.errors import SemstError

DEFAULT_N_PCS = 30
PCA_SEED = 0  # the PCA is part of the method, not of the seed being varied


class BaselineError(SemstError, ValueError):
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


@dataclass
class BaselineSettings:
    """The baselines' own settings (a grid variant's ``baseline`` table)."""

    n_pcs: int = DEFAULT_N_PCS  # principal components clustered (capped by the data's shape)
    hops: int = 1  # pca-spatial-kmeans: how many times the PCs are averaged over the spatial graph

    def __post_init__(self):
        if self.n_pcs < 1:
            raise BaselineError(f"baseline n_pcs must be >= 1, got {self.n_pcs}")
        if self.hops < 0:
            raise BaselineError(f"baseline hops must be >= 0, got {self.hops}")


@dataclass
class FixedLatent:
    """A baseline's "fit": the same representation for every seed (only k-means varies)."""

    latent: np.ndarray
    history: dict = field(default_factory=dict)


def baseline_dataset(cfg, method: str, n_pcs: int = DEFAULT_N_PCS, hops: int = 1, adata=None,
                     log=print):
    """Run a baseline on ``cfg.dataset`` for every seed of ``cfg``: a ClusterReport like SemST's."""
    from semst.cluster.methods import METHODS, run_method

    baselines = [name for name, cls in METHODS.items() if cls.settings_class is BaselineSettings]
    if method not in baselines:
        raise BaselineError(f"unknown baseline {method!r}; known: {', '.join(baselines)}")
    return run_method(method, cfg, BaselineSettings(n_pcs, hops), adata=adata, log=log)
