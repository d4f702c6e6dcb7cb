"""The two graphs SemST convolves over, built sparse (memory linear in the number of spots).

- :func:`spatial_connectivities`: spots within ``radius`` of each other, or each spot's ``k`` nearest
  spots, as squidpy lays a spatial graph out (symmetric CSR, one entry per neighbour, no diagonal);
  :func:`spatial_graph` is the same as a DGL graph. A graph denser than ``max_mean_degree``
  neighbours per spot is refused (a radius meant for other units makes every spot neighbour every
  other). Which radius or k a slide gets is its rule's (:mod:`semst.cluster.spatial`), e.g. a
  multiple of the slide's median nearest-neighbour distance (:func:`median_spacing`).
- :func:`expression_graph`: each spot's ``k`` nearest spots by cosine similarity of expression.

Both are symmetric (an edge either way makes both), carry a self-loop on every spot, and have no
duplicate edges. Neighbour search is scikit-learn's (kd-tree / ball-tree / brute force chosen by
size); DGL's default ``knn_graph`` would allocate an N x N matrix and is never used.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from semst.cluster.dgl_compat import dgl
from semst.shared.errors import SemstError


class GraphError(SemstError, ValueError):
    """A graph cannot be built as configured; the message says why and what to change."""


def _symmetric_graph(rows: np.ndarray, cols: np.ndarray, n: int):
    """DGL graph of the symmetric closure of (rows, cols), self-loops on all nodes, no duplicates."""
    adj = sp.coo_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n)).tocsr()
    adj = adj + adj.T + sp.identity(n, dtype=np.float32, format="csr")
    adj = adj.tocoo()
    g = dgl.graph((torch.from_numpy(adj.row.astype(np.int64)), torch.from_numpy(adj.col.astype(np.int64))),
                  num_nodes=n)
    return g


def symmetric_connectivities(rows: np.ndarray, cols: np.ndarray, n: int) -> sp.csr_matrix:
    """The symmetric closure of the pairs (rows, cols) less self-pairs: squidpy's layout of a spatial
    graph (CSR, float32 1 per neighbour, empty diagonal)."""
    keep = rows != cols
    adj = sp.coo_matrix((np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])), shape=(n, n)).tocsr()
    adj = (adj + adj.T).tocsr()
    adj.data[:] = 1.0
    return adj


def connectivities_of(matrix) -> sp.csr_matrix:
    """Any (n, n) adjacency (sparse or dense; weights, a diagonal or one direction only) as
    :func:`symmetric_connectivities`: spots i and j neighbour each other where either entry is non-zero."""
    adj = sp.coo_matrix(matrix)
    nonzero = adj.data != 0
    return symmetric_connectivities(adj.row[nonzero], adj.col[nonzero], adj.shape[0])


def graph_from_connectivities(connectivities, self_loops: int = 1):
    """The DGL graph SemST convolves over: every neighbour of ``connectivities`` both ways and each
    spot's own edge ``self_loops`` times (its weight in the GCN's aggregation)."""
    adj = sp.coo_matrix(connectivities)
    return add_self_loops(_symmetric_graph(adj.row, adj.col, adj.shape[0]), self_loops - 1)


def edge_distances(coords, connectivities) -> sp.csr_matrix:
    """The Euclidean length of every edge of ``connectivities`` (squidpy's ``spatial_distances``)."""
    adj = sp.csr_matrix(connectivities, copy=True)
    coords = np.asarray(coords, dtype=np.float64)
    rows = np.repeat(np.arange(adj.shape[0]), np.diff(adj.indptr))
    adj = adj.astype(np.float64)
    adj.data = np.linalg.norm(coords[rows] - coords[adj.indices], axis=1)
    return adj


def neighbour_pairs(g) -> tuple[np.ndarray, np.ndarray]:
    """Edges of ``g`` without self-loops, as (src, dst) arrays."""
    src, dst = (t.numpy() for t in g.edges())
    keep = src != dst
    return src[keep], dst[keep]


def median_spacing(coords) -> float:
    """The median distance from a spot to its nearest other spot (the slide's spot spacing)."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        raise GraphError("a spatial graph needs at least 2 spots")
    dist, _ = cKDTree(coords).query(coords, k=2)
    spacing = float(np.median(dist[:, 1]))
    if not spacing > 0:
        raise GraphError("the median distance between neighbouring spots is 0 (most spots share their "
                         "coordinates with another); use the k nearest spots ([cluster.spatial] rule = \"knn\") "
                         "instead of a radius")
    return spacing


def _dense_error(what: str, mean_degree: float, limit: float, coords) -> GraphError:
    return GraphError(
        f"the spatial graph ({what}) gives every spot {mean_degree:.0f} neighbours on average (more than "
        f"{limit:g}); this slide's median spot spacing is {median_spacing(coords):.4g} coordinate units, so the "
        f"radius was probably meant for other units. Use rule = \"radius_spacings\", spacings = 2.0 (2 x the "
        f"spacing, in any unit) or rule = \"knn\" in [cluster.spatial] of the dataset config, or set "
        f"allow_dense = true there if this graph is intended")


MAX_ISOLATED_FRACTION = 0.01  # spots a radius may leave without a neighbour before it is refused


def isolated_spots(graph) -> int:
    """Spots whose only spatial edge is their own."""
    import torch

    n = graph.num_nodes()
    src, dst = graph.edges()
    others = torch.bincount(dst[src != dst], minlength=n)
    return int((others == 0).sum())


def spatial_connectivities(coords, radius: float | None = None, k: int | None = None,
                           max_mean_degree: float | None = None) -> sp.csr_matrix:
    """Spatial neighbours within ``radius`` (coordinate units), or the ``k`` nearest spots, in
    squidpy's layout (:func:`symmetric_connectivities`).

    A radius that leaves up to ``MAX_ISOLATED_FRACTION`` of the spots without a neighbour keeps them
    with their own edge only (:func:`isolated_spots` counts them); more is refused as a unit mistake.

    ``max_mean_degree``: refuse (GraphError) a graph with more neighbours per spot on average; for a
    radius this is counted before any edge is built, so an absurd radius costs no memory.
    """
    from sklearn.neighbors import KDTree, NearestNeighbors

    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or not np.isfinite(coords).all():
        raise GraphError("coordinates must be a finite (n_spots, 2) array")
    n = len(coords)
    if (radius is None) == (k is None):
        raise GraphError("give exactly one of radius or k for the spatial graph")
    if k is not None:
        if not 1 <= k < n:
            raise GraphError(f"spatial k must be between 1 and n_spots - 1 ({n - 1}), got {k}")
        nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
        _, idx = nn.kneighbors(coords)
        rows = np.repeat(np.arange(n), k + 1)
        cols = idx.ravel()
    else:
        if radius <= 0:
            raise GraphError(f"radius must be > 0, got {radius}")
        if max_mean_degree is not None:
            counts = KDTree(coords).query_radius(coords, radius, count_only=True)
            mean_degree = float(np.mean(counts)) - 1.0
            if mean_degree > max_mean_degree:
                raise _dense_error(f"radius {radius:g}", mean_degree, max_mean_degree, coords)
        nn = NearestNeighbors(radius=radius).fit(coords)
        adj = nn.radius_neighbors_graph(coords, mode="connectivity")
        degree = np.diff(adj.indptr) - 1  # minus the spot itself
        isolated = int((degree <= 0).sum())
        # A few stray spots or cells beyond the radius keep only their own edge, as in the authors'
        # radius graph (construction.py); many mean the radius is in the wrong units.
        if isolated > MAX_ISOLATED_FRACTION * n:
            raise GraphError(f"radius {radius} leaves {isolated} of {n} spots without any spatial neighbour "
                             f"(at most {MAX_ISOLATED_FRACTION:.0%} may be); use a larger radius, a radius in "
                             f"spot spacings or the k nearest spots ([cluster.spatial] rule = \"radius_spacings\" "
                             f"or \"knn\") in the dataset config")
        adj = adj.tocoo()
        rows, cols = adj.row, adj.col
    connectivities = symmetric_connectivities(rows, cols, n)
    if max_mean_degree is not None and k is not None:
        mean_degree = connectivities.nnz / n
        if mean_degree > max_mean_degree:
            raise _dense_error(f"{k} nearest spots", mean_degree, max_mean_degree, coords)
    return connectivities


def spatial_graph(coords, radius: float | None = None, k: int | None = None,
                  max_mean_degree: float | None = None):
    """:func:`spatial_connectivities` as a DGL graph with one self-loop per spot."""
    return graph_from_connectivities(spatial_connectivities(coords, radius, k, max_mean_degree))


EXACT_KNN_MAX = 50_000  # "auto": exact expression kNN up to this many spots, NN-descent above


def expression_graph(features, k: int, n_components: int | None = None, method: str = "auto",
                     progress: bool = False, seed: int = 0):
    """Cosine kNN graph of the expression profiles (rows of ``features``).

    ``method``: "exact" (scikit-learn, searched in chunks of query rows), "approximate"
    (pynndescent's NN-descent, installed with umap-learn; its recall against the exact graph is
    measured in the README), or "auto": exact up to ``EXACT_KNN_MAX`` spots. The exact search is
    O(n^2 x genes): 462 s at 30k spots x 3000 genes, ~1.5 h at 100k.

    With ``n_components``, similarities are computed on the rows projected onto the top
    ``n_components`` right singular vectors (uncentred truncated SVD, scikit-learn's randomized
    solver, fixed seed): inner products and norms are those of the full rows minus the dropped
    directions, so with ``n_components`` >= the rank of ``features`` the graph is the exact one.
    """
    X = np.asarray(features, dtype=np.float32)
    n = len(X)
    if not 1 <= k < n:
        raise GraphError(f"expression k must be between 1 and n_spots - 1 ({n - 1}), got {k}")
    if method not in ("auto", "exact", "approximate"):
        raise GraphError(f"expression kNN method must be auto, exact or approximate, got {method!r}")
    if n_components is not None:
        if not 1 <= n_components < X.shape[1]:
            raise GraphError(f"expression-graph components (expr_pcs) must be between 1 and n_genes - 1 "
                             f"({X.shape[1] - 1}), got {n_components}")
        from sklearn.decomposition import TruncatedSVD

        X = TruncatedSVD(n_components, algorithm="randomized", random_state=0).fit_transform(X).astype(np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    Xn = X / np.where(norms > 0, norms, 1.0)  # cosine = euclidean order on unit vectors
    approximate = method == "approximate" or (method == "auto" and n > EXACT_KNN_MAX)
    idx = _nn_descent(Xn, k + 1, seed, progress) if approximate else _exact_knn(Xn, k + 1, progress)
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    keep = (rows != cols) & (cols >= 0)
    return _symmetric_graph(rows[keep], cols[keep], n)


def _exact_knn(X: np.ndarray, k: int, progress: bool, chunk: int = 4096) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors
    from tqdm import tqdm

    nn = NearestNeighbors(n_neighbors=k).fit(X)
    out = np.empty((len(X), k), dtype=np.int64)
    for start in tqdm(range(0, len(X), chunk), desc="expression kNN (exact)", unit="block",
                      disable=not progress or len(X) <= chunk):
        out[start:start + chunk] = nn.kneighbors(X[start:start + chunk], return_distance=False)
    return out


def _nn_descent(X: np.ndarray, k: int, seed: int, progress: bool) -> np.ndarray:
    from pynndescent import NNDescent
    from tqdm import tqdm

    with tqdm(total=2, desc="expression kNN (NN-descent)", unit="step", disable=not progress) as bar:
        # Twice the neighbours asked for, then the nearest k: measured on dlpfc-151673 (3639 spots x
        # 3000 genes, k 15) the recall of the exact kNN is 0.73 searching for k, 0.92 for 2k, 0.99
        # for 4k (0.7 s, 1.5 s, 4.3 s). One job: NN-descent's parallel updates make its graph depend
        # on thread timing; with one job the same seed gives the same graph.
        index = NNDescent(X, n_neighbors=max(2 * k, 10), metric="euclidean", random_state=seed, n_jobs=1,
                          low_memory=True, compressed=False)
        bar.update(1)
        idx, _ = index.neighbor_graph
        bar.update(1)
    return np.asarray(idx[:, :k], dtype=np.int64)


# -- helpers of the spatial rules (semst.cluster.spatial) ----------------------------------------------

def adaptive_radius(coords, k: int, step: float, min_neighbours: int = 2) -> float:
    """The authors' adaptive threshold (preprocess/construction.py lines 65-84, MBA and HBC).

    Their coarse-to-fine search (steps of 100, 10, 5 px) returns the smallest multiple of 5 px at
    which every spot has more than ``min_neighbours`` spots (itself included) within the threshold and
    some spot more than ``k``; the condition only grows with the threshold, so that is
    ``step * ceil(t / step)`` with t = max(the largest distance of a spot to its
    ``min_neighbours``-th nearest other spot, the smallest distance of a spot to its ``k``-th nearest).
    """
    from sklearn.neighbors import NearestNeighbors

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if not 1 <= k < n or not 1 <= min_neighbours < n:
        raise GraphError(f"the adaptive threshold's k must be between 1 and n_spots - 1 ({n - 1}), got {k}")
    if not step > 0:
        raise GraphError(f"the adaptive threshold's step must be > 0, got {step}")
    dist, _ = NearestNeighbors(n_neighbors=max(k, min_neighbours) + 1).fit(coords).kneighbors(coords)
    t = max(float(dist[:, min_neighbours].max()), float(dist[:, k].min()))
    return step * float(np.ceil(t / step - 1e-9))


def add_self_loops(g, extra: int):
    """``g`` with ``extra`` more self-loops on every node: a spot's own weight 1 + extra in the
    GCN's aggregation (the authors' DLPFC radius graph already holds the spot, then adds I: 2)."""
    for _ in range(extra):
        g = dgl.add_self_loop(g)
    return g
