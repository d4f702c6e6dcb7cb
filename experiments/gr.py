"""``semst.gr``: spatial graphs on AnnData, laid out as ``squidpy.gr.spatial_neighbors`` lays them out.

:func:`spatial_graph` builds one of semst's spatial-graph rules (:mod:`semst.cluster.spatial`) on
``adata.obsm["spatial"]`` and writes ``adata.obsp["spatial_connectivities"]`` (CSR, 1 per neighbour,
symmetric, empty diagonal), ``adata.obsp["spatial_distances"]`` (CSR, each edge's Euclidean length)
and ``adata.uns["spatial_neighbors"]`` (the two keys and the rule's parameters), so squidpy's tools
read it; ``semst.domains(adata, connectivity_key="spatial_connectivities")`` trains on such a graph,
this module's or squidpy's, instead of building its own (:func:`given_graph`).

Imports are inside the functions, so ``import semst`` stays cheap.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class SpatialGraph(NamedTuple):
    """What :func:`spatial_graph` writes: squidpy's two matrices."""

    connectivities: Any  # scipy.sparse.csr_matrix, float32 1 per neighbour
    distances: Any  # scipy.sparse.csr_matrix, float64 edge lengths


def spatial_graph(adata, rule: str | None = None, *, key_added: str = "spatial", dataset: str | None = None,
                  copy: bool = False, **params: Any) -> SpatialGraph:
    """The spatial graph of ``rule`` (with its ``params``, e.g. ``rule="knn", k=6`` or
    ``rule="radius_spacings", spacings=1.9``) on ``adata``'s spots, in squidpy's layout.

    Without ``rule``, the rule ``semst.domains`` would use on this slide (its dataset's config, else
    default.toml's 6 nearest spots), ``params`` changing its settings (e.g. ``self_loops=2``). Writes
    ``adata.obsp[f"{key_added}_connectivities"]``, ``adata.obsp[f"{key_added}_distances"]`` and
    ``adata.uns[f"{key_added}_neighbors"]`` unless ``copy``; returns both matrices. A rule that cannot
    be made (unknown name or parameter, a wrong value) or built on this slide is a ConfigError or
    GraphError, and ``adata`` is left as it was.
    """
    from semst.cluster.graphs import edge_distances
    from semst.cluster.spatial import spatial_rule
    from semst.experiments.api import _name
    from semst.shared.config import load_cluster_config, merge_spatial
    from semst.shared.datasets import check_coordinates

    name = _name(adata, dataset)
    coords = check_coordinates(adata, name)
    table = {**({"rule": rule} if rule is not None else {}), **params}
    built = spatial_rule(merge_spatial(load_cluster_config(name).spatial, table))
    built.check_spots(adata.n_obs)
    connectivities = built.connectivities(coords)
    graph = SpatialGraph(connectivities, edge_distances(coords, connectivities))
    if not copy:
        conns_key, dists_key = f"{key_added}_connectivities", f"{key_added}_distances"
        adata.obsp[conns_key] = graph.connectivities
        adata.obsp[dists_key] = graph.distances
        adata.uns[f"{key_added}_neighbors"] = {"connectivities_key": conns_key, "distances_key": dists_key,
                                               "params": built.table()}
    return graph


def given_graph(adata, connectivity_key: str, self_loops: int = 1):
    """``adata.obsp[connectivity_key]`` (squidpy's ``spatial_connectivities`` or :func:`spatial_graph`'s)
    as the graph stage 2 trains on (:class:`semst.cluster.spatial.GivenGraph`): its non-zero entries
    are the edges (weights ignored, symmetrised), and each spot's own edge is added ``self_loops``
    times, as the config's rule would. A ConfigError or GraphError if there is no such matrix or it
    does not fit the slide."""
    from semst.cluster.spatial import GivenGraph
    from semst.shared.config import ConfigError

    if not isinstance(connectivity_key, str):
        raise ConfigError(f"connectivity_key must name a graph in adata.obsp (e.g. \"spatial_connectivities\"), got "
                          f"a {type(connectivity_key).__name__}")
    if connectivity_key not in adata.obsp:
        have = ", ".join(map(repr, adata.obsp.keys())) or "nothing"
        raise ConfigError(f"connectivity_key={connectivity_key!r}: adata.obsp has no such graph (it holds {have}); "
                          f"build one with semst.gr.spatial_graph(adata) or squidpy.gr.spatial_neighbors(adata)")
    graph = GivenGraph(matrix=adata.obsp[connectivity_key], source=f"adata.obsp[{connectivity_key!r}]",
                       self_loops=self_loops)
    graph.check_spots(adata.n_obs)
    return graph
