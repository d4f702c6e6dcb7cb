"""Graph builders against brute force on tiny inputs."""
import numpy as np
import pytest
import torch

from semst.cluster.graphs import GraphError, expression_graph, isolated_spots, neighbour_pairs, spatial_graph


def edge_set(g):
    src, dst = (t.numpy() for t in g.edges())
    pairs = list(zip(src.tolist(), dst.tolist()))
    assert len(pairs) == len(set(pairs)), "duplicate edges"
    return set(pairs)


def brute_force(dist: np.ndarray, neighbours_of) -> set:
    n = len(dist)
    edges = {(i, i) for i in range(n)}
    for i in range(n):
        for j in neighbours_of(i):
            edges |= {(i, j), (j, i)}
    return edges


@pytest.fixture
def coords():
    return np.random.default_rng(1).uniform(0, 10, size=(40, 2))


def test_radius_graph_is_every_pair_within_the_radius_both_ways_plus_self_loops(coords):
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    expected = brute_force(dist, lambda i: [j for j in range(len(dist)) if j != i and dist[i, j] <= 3.0])
    assert edge_set(spatial_graph(coords, radius=3.0)) == expected


def test_knn_spatial_graph_is_the_symmetrised_k_nearest(coords):
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    expected = brute_force(dist, lambda i: np.argsort(dist[i])[:4].tolist())
    assert edge_set(spatial_graph(coords, k=4)) == expected


def test_expression_graph_is_the_symmetrised_cosine_knn():
    X = np.random.default_rng(2).normal(size=(30, 6)).astype(np.float32)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos_dist = 1 - Xn @ Xn.T
    np.fill_diagonal(cos_dist, np.inf)
    expected = brute_force(cos_dist, lambda i: np.argsort(cos_dist[i])[:3].tolist())
    assert edge_set(expression_graph(X, 3)) == expected


def test_expression_graph_on_as_many_components_as_the_rank_is_the_exact_graph():
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(40, 4)) @ rng.normal(size=(4, 25))).astype(np.float32)  # rank 4
    assert edge_set(expression_graph(X, 3, n_components=4)) == edge_set(expression_graph(X, 3))


def test_expression_graph_on_fewer_components_than_the_rank_is_a_different_graph():
    # Guards the test above: the projection really is used (a full-rank X loses information).
    X = np.random.default_rng(4).normal(size=(40, 25)).astype(np.float32)
    assert edge_set(expression_graph(X, 3, n_components=2)) != edge_set(expression_graph(X, 3))


@pytest.mark.parametrize("n_components", [0, 25])
def test_expression_graph_components_outside_1_to_genes_minus_1_is_a_clear_error(n_components):
    X = np.random.default_rng(5).normal(size=(30, 25)).astype(np.float32)
    with pytest.raises(GraphError, match="expr_pcs"):
        expression_graph(X, 3, n_components=n_components)


def test_a_radius_leaving_more_than_1_percent_of_spots_isolated_says_how_many():
    coords = np.array([[0, 0], [1, 0], [0, 1], [50, 50], [80, 0]], dtype=float)
    with pytest.raises(GraphError, match="leaves 2 of 5 spots without any spatial neighbour"):
        spatial_graph(coords, radius=2.0)


def test_a_stray_spot_beyond_the_radius_keeps_only_its_own_edge():
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    coords = np.vstack([grid, [[100.0, 100.0]]])  # 1 of 101 spots (< 1%) far from the tissue
    g = spatial_graph(coords, radius=1.5)
    src, dst = g.edges()
    assert isolated_spots(g) == 1
    assert sorted(dst[src == 100].tolist()) == [100]  # its own edge, nothing else
    assert isolated_spots(spatial_graph(grid, radius=1.5)) == 0


def test_neighbour_pairs_drop_self_loops(coords):
    src, dst = neighbour_pairs(spatial_graph(coords, k=2))
    assert (src != dst).all() and len(src) >= 2 * len(coords)


def test_exactly_one_spatial_rule_is_required(coords):
    with pytest.raises(GraphError, match="exactly one"):
        spatial_graph(coords)
    with pytest.raises(GraphError, match="exactly one"):
        spatial_graph(coords, radius=1.0, k=3)


def test_the_approximate_expression_graph_finds_most_exact_neighbours_on_a_real_slide(shared_data_dir):
    from semst.shared.config import load_cluster_config
    from semst.shared.datasets import load_dataset
    from semst.shared.preprocess import preprocess

    cfg = load_cluster_config("dlpfc-151510")
    features = preprocess(load_dataset("dlpfc-151510", shared_data_dir / "dlpfc-151510.h5ad"), cfg.preprocess).X
    exact = set(zip(*(t.numpy() for t in expression_graph(features, cfg.expr_k, method="exact").edges())))
    approx = set(zip(*(t.numpy() for t in expression_graph(features, cfg.expr_k, method="approximate").edges())))
    assert len(exact & approx) / len(exact) > 0.85


def test_the_approximate_expression_graph_is_the_same_for_the_same_seed():
    x = np.random.default_rng(0).normal(size=(300, 20)).astype(np.float32)
    a, b = (expression_graph(x, 5, method="approximate", seed=3) for _ in range(2))
    assert all(torch.equal(u, v) for u, v in zip(a.edges(), b.edges()))


def test_radius_in_spacings_gives_the_same_graph_in_any_coordinate_unit(coords):
    from semst.cluster.graphs import median_spacing

    for scale in (1.0, 22.2, 0.045):  # e.g. array units, full-resolution pixels, millimetres
        scaled = coords * scale
        g = spatial_graph(scaled, radius=3.0 * median_spacing(scaled))
        assert edge_set(g) == edge_set(spatial_graph(coords, radius=3.0 * median_spacing(coords)))


def test_median_spacing_is_the_grid_step():
    from semst.cluster.graphs import median_spacing

    grid = np.stack(np.meshgrid(np.arange(6.0), np.arange(5.0)), -1).reshape(-1, 2) * 137.0
    assert median_spacing(grid) == pytest.approx(137.0)


def test_a_radius_meant_for_other_units_is_refused_before_any_edge_is_built():
    # a Visium-like slide in array units (spacing ~6) with the full-resolution-pixel radius 275
    grid = np.stack(np.meshgrid(np.arange(30.0), np.arange(30.0)), -1).reshape(-1, 2) * 6.2
    with pytest.raises(GraphError) as err:
        spatial_graph(grid, radius=275.0, max_mean_degree=100)
    message = str(err.value)
    assert "neighbours on average (more than 100)" in message and "median spot spacing is 6.2" in message
    assert 'rule = "radius_spacings"' in message and "allow_dense = true" in message
    assert spatial_graph(grid, radius=275.0).num_nodes() == 900  # allowed when the caller asks for it


def test_a_knn_graph_with_more_than_the_limit_is_refused_too():
    pts = np.random.default_rng(0).uniform(size=(300, 2))
    with pytest.raises(GraphError, match="120 nearest spots"):
        spatial_graph(pts, k=120, max_mean_degree=100)
