"""The spatial graph is one rule object (semst.cluster.spatial), written as the [cluster.spatial] table.

Graph hashes and run names pinned below were computed with the code before the rule objects
(commit 6f9c056: cluster.graphs.spatial_graph_rule with the guard slide_spatial_graph passed), so
each rule must build exactly the graph, and each config keep exactly the run name, it had.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from toy_slides import two_domain_slide

import semst
from semst.cluster.graphs import GraphError, spatial_graph
from semst.cluster.run import default_run_name
from semst.cluster.spatial import SPATIAL_RULES, SpatialRule, register_spatial_rule, spatial_rule
from semst.shared.config import ConfigError, config_to_toml, load_cluster_config

SMALL = {"epochs": 3, "hidden1": 16, "hidden2": 8, "expr_k": 5, "n_domains": 2, "fusion": "none"}


def quiet(*a, **k):
    pass


def edges_hash(g) -> str:
    src, dst = (t.numpy().astype(np.int64) for t in g.edges())
    return hashlib.sha256(src.tobytes() + dst.tobytes()).hexdigest()[:16]


def jittered_hexagon() -> np.ndarray:
    rng = np.random.default_rng(0)
    hexagon = np.array([(c + 0.5 * (r % 2), r * np.sqrt(3) / 2) for r in range(12) for c in range(12)]) * 137.0
    return hexagon + rng.normal(0, 3, hexagon.shape)


RULES = {
    "knn6": {"rule": "knn", "k": 6}, "knn8": {"rule": "knn", "k": 8}, "radius1.9": {"rule": "radius", "radius": 1.9},
    "radius300": {"rule": "radius", "radius": 300.0},
    "spacings1.9": {"rule": "radius_spacings", "spacings": 1.9},
    "spacings4.1-self2": {"rule": "radius_spacings", "spacings": 4.1, "self_loops": 2},
    "adaptive15": {"rule": "adaptive", "k": 15},
}
BEFORE = {  # edges_hash of the old code's graph (see the module docstring)
    ("knn6", "grid"): "b001ae34d8438bff", ("knn8", "grid"): "37f9065a3867f2aa",
    ("radius300", "grid"): "492b3f6408f24a6b", ("spacings1.9", "grid"): "f274f2443deca96b",
    ("spacings4.1-self2", "grid"): "462ee8d7f89ff3ee", ("adaptive15", "grid"): "3d7b85eb29a5feb2",
    ("knn6", "mob"): "f7e9708e4953421c", ("knn8", "mob"): "a36d74e9e4784090", ("radius1.9", "mob"): "bd30fddf660e068d",
    ("spacings1.9", "mob"): "3f55acbd82e2215c", ("spacings4.1-self2", "mob"): "151f6bfbc39a0f6d",
    ("adaptive15", "mob"): "8cc8cbd4a7e25a81",
    ("knn6", "starmap-mpfc"): "55dceecc3032fbde", ("knn8", "starmap-mpfc"): "55c145f8b3f48cfd",
    ("spacings4.1-self2", "starmap-mpfc"): "a5a899a37d46b74d", ("adaptive15", "starmap-mpfc"): "64e2cea0409cf758",
}


def slide_coords(name: str, shared_data_dir=None) -> np.ndarray:
    if name == "grid":
        return jittered_hexagon()
    import anndata as ad

    return np.asarray(ad.read_h5ad(shared_data_dir / f"{name}.h5ad", backed="r").obsm["spatial"], dtype=float)


# -- each rule builds the graph the old code built ---------------------------------------------------------

@pytest.mark.parametrize("rule, slide", sorted(k for k in BEFORE if k[1] == "grid"))
def test_each_rule_builds_the_old_codes_graph_edge_for_edge_on_a_synthetic_grid(rule, slide):
    assert edges_hash(spatial_rule(RULES[rule]).build(slide_coords(slide))) == BEFORE[(rule, slide)]


@pytest.mark.parametrize("rule, slide", sorted(k for k in BEFORE if k[1] != "grid"))
def test_each_rule_builds_the_old_codes_graph_edge_for_edge_on_a_real_slide(shared_data_dir, rule, slide):
    assert edges_hash(spatial_rule(RULES[rule]).build(slide_coords(slide, shared_data_dir))) == BEFORE[(rule, slide)]


def test_the_knn_rule_is_the_symmetrised_k_nearest_spots_with_one_self_loop():
    coords = jittered_hexagon()
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    expected = {(i, i) for i in range(len(coords))}
    for i in range(len(coords)):
        for j in np.argsort(dist[i])[:6]:
            expected |= {(i, int(j)), (int(j), i)}
    g = spatial_rule({"rule": "knn", "k": 6}).build(coords)
    assert set(zip(*(t.tolist() for t in g.edges()))) == expected and g.num_edges() == len(expected)


def test_a_rule_describes_itself_in_the_words_of_the_run_log():
    coords = jittered_hexagon()
    words = {name: spatial_rule(table).describe(coords) for name, table in RULES.items()}
    assert words["knn6"] == "6 nearest spots" and words["radius1.9"] == "radius 1.9"
    assert words["spacings1.9"].startswith("radius 1.9 x spacing 13") and words["adaptive15"] == (
        "the authors' adaptive threshold (k 15)")


def test_allow_dense_lifts_the_density_guard_as_allow_dense_graph_did():
    coords = jittered_hexagon()
    with pytest.raises(GraphError, match="neighbours on average"):
        spatial_rule({"rule": "radius", "radius": 5000.0}).build(coords)
    g = spatial_rule({"rule": "radius", "radius": 5000.0, "allow_dense": True}).build(coords)
    assert g.num_edges() == len(coords) ** 2


# -- the config: the table, the old keys read as it, precedence -----------------------------------------------

@pytest.mark.parametrize("old, table", [
    ({"spatial_k": 8}, {"rule": "knn", "k": 8}),
    ({"radius": 2.0, "allow_dense_graph": True}, {"rule": "radius", "radius": 2.0, "allow_dense": True}),
    ({"radius_spacings": 4.1, "spatial_self_loops": 2}, {"rule": "radius_spacings", "spacings": 4.1, "self_loops": 2}),
    ({"spatial_adaptive_k": 15, "adaptive_step_spacings": 0.05}, {"rule": "adaptive", "k": 15, "step_spacings": 0.05}),
])
def test_the_old_flat_keys_and_the_table_resolve_to_the_same_rule(tmp_path, old, table):
    from semst.shared.config import _toml_value

    as_table = load_cluster_config("dlpfc-151673", {"spatial": table})
    as_keys = load_cluster_config("dlpfc-151673", old)  # an override or a semst.domains keyword
    (tmp_path / "old.toml").write_text("[cluster]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in old.items()))
    (tmp_path / "new.toml").write_text("[cluster.spatial]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                                                       for k, v in table.items()))
    from_files = [load_cluster_config("x", path=tmp_path / f) for f in ("old.toml", "new.toml")]
    assert as_table == as_keys and from_files[0] == from_files[1]
    assert as_table.spatial == from_files[0].spatial == table
    assert spatial_rule(as_keys) == spatial_rule(table)


def test_an_old_saved_config_with_every_flat_key_loads_to_its_rule(tmp_path):
    """config.toml of a run before the table lists every old key; the ones of another rule are unused."""
    (tmp_path / "c.toml").write_text("[cluster]\n# radius = (unset)\n# radius_spacings = (unset)\nspatial_k = 6\n"
                                     "# spatial_adaptive_k = (unset)\nadaptive_step_spacings = 0.0364963503649635\n"
                                     "spatial_self_loops = 1\nallow_dense_graph = false\n")
    cfg = load_cluster_config("x", path=tmp_path / "c.toml")
    assert spatial_rule(cfg) == spatial_rule({"rule": "knn", "k": 6})


@pytest.mark.parametrize("text", [
    "[cluster]\nspatial_k = 6\n[cluster.spatial]\nrule = \"knn\"\nk = 8\n",
    "[cluster]\nspatial_self_loops = 2\n[cluster.spatial]\nrule = \"knn\"\nk = 8\n",
])
def test_a_file_that_sets_an_old_key_and_the_table_is_refused_naming_both(tmp_path, text):
    path = tmp_path / "both.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {path}: \[cluster\] sets (spatial_k|spatial_self_loops) "
                                          r"and the \[cluster.spatial\] table: write the spatial graph once"):
        load_cluster_config("x", path=path)


def test_an_override_that_sets_an_old_key_and_the_table_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"\[cluster\] sets radius and the \[cluster.spatial\] table"):
        load_cluster_config("mob", {"radius": 2.0, "spatial": {"rule": "knn", "k": 8}})


def test_a_table_without_a_rule_changes_only_the_settings_it_names():
    assert load_cluster_config("mob", {"spatial": {"self_loops": 2}}).spatial == {"rule": "radius", "radius": 1.9,
                                                                                  "self_loops": 2}
    assert load_cluster_config("mob", {"spatial_self_loops": 2}).spatial == {"rule": "radius", "radius": 1.9,
                                                                             "self_loops": 2}


def test_a_rule_the_user_sets_replaces_the_recipes_rule_whole_and_its_settings_change_it():
    paper = load_cluster_config("dlpfc-151673", {"recipe": "paper"}).spatial
    assert paper == {"rule": "radius_spacings", "spacings": 4.1, "self_loops": 2}
    assert load_cluster_config("dlpfc-151673", {"recipe": "paper", "spatial": {"rule": "knn", "k": 8}}).spatial == {
        "rule": "knn", "k": 8}
    assert load_cluster_config("dlpfc-151673", {"recipe": "paper", "spatial": {"allow_dense": True}}).spatial == {
        **paper, "allow_dense": True}


def test_a_variants_table_replaces_the_grids_as_a_files_replaces_default_toml():
    from semst.experiments.schema import parse_grid

    data = {"grid": {"datasets": ["mob"], "seeds": [0]}, "cluster": {"spatial_k": 8},
            "variant": [{"name": "a", "cluster": {"radius": 2.0, "fusion": "none"}},
                        {"name": "b", "cluster": {"spatial": {"self_loops": 2}, "fusion": "none"}}]}
    from semst.experiments.cells import cell_config

    grid = parse_grid(data, "g.toml")
    assert cell_config(grid, grid.variant("a"), "mob").spatial == {"rule": "radius", "radius": 2.0}
    assert cell_config(grid, grid.variant("b"), "mob").spatial == {"rule": "knn", "k": 8, "self_loops": 2}


def test_a_bad_spatial_table_in_a_grid_is_refused_while_parsing():
    from semst.experiments.schema import ExperimentError, parse_grid

    data = {"grid": {"datasets": ["mob"], "seeds": [0]},
            "variant": [{"name": "a", "cluster": {"spatial": {"rule": "knn", "k": 0}, "fusion": "none"}}]}
    with pytest.raises(ExperimentError, match=r"variant 'a' on mob: \[cluster.spatial\] k must be >= 1"):
        parse_grid(data, "g.toml")


@pytest.mark.parametrize("table, message", [
    ({"rule": "knm", "k": 6}, "rule = 'knm' is not a spatial-graph rule; known: knn, radius, radius_spacings, "
                              "adaptive"),
    ({"rule": "knn"}, "rule 'knn' needs k"),
    ({"rule": "knn", "k": 6, "radius": 2.0}, "rule 'knn' takes self_loops, allow_dense, k; not radius"),
    ({"rule": "knn", "k": 2.5}, "[cluster.spatial] k must be an integer, got 2.5 (float)"),
    ({"rule": "knn", "k": 0}, "[cluster.spatial] k must be >= 1 (rule 'knn'), got 0"),
    ({"rule": "radius", "radius": -1.0}, "[cluster.spatial] radius must be > 0 (rule 'radius'), got -1.0"),
    ({"rule": "radius_spacings", "spacings": 0.0}, "spacings must be > 0 (rule 'radius_spacings'), got 0.0"),
    ({"rule": "adaptive", "k": 15, "step_spacings": 0}, "step_spacings must be > 0 (rule 'adaptive'), got 0"),
    ({"rule": "knn", "k": 6, "self_loops": 0}, "self_loops must be >= 1 (rule 'knn'), got 0"),
    ({"rule": "knn", "k": 6, "allow_dense": "yes"}, "allow_dense must be true or false, got \"yes\" (str)"),
])
def test_a_bad_table_is_refused_by_its_rule_naming_the_key(table, message):
    with pytest.raises(ConfigError) as err:
        spatial_rule(table)
    assert message in str(err.value)


def test_the_printed_config_writes_the_table_and_loads_back_to_the_same_config(tmp_path):
    cfg = load_cluster_config("dlpfc-151673", {"recipe": "paper", "spatial_self_loops": 3})
    text = config_to_toml(cfg)
    assert text.endswith('[cluster.spatial]\nrule = "radius_spacings"\nspacings = 4.1\nself_loops = 3\n')
    (tmp_path / "c.toml").write_text(text)
    assert load_cluster_config("dlpfc-151673", path=tmp_path / "c.toml") == cfg


@pytest.mark.parametrize("dataset, recipe, name", [
    ("mob", "semst", "film-llm-14229d33"), ("starmap-mpfc", "semst", "film-llm-80889c28"),
    ("dlpfc-151673", "paper", "film-llm-21789b88"), ("mba", "paper", "film-llm-775d4b82")])
def test_a_run_keeps_the_folder_name_it_had_before_the_table(dataset, recipe, name):
    cfg = load_cluster_config(dataset, {"recipe": recipe, "cache": "/c.zarr"}, embed_overrides={"cache": "/c.zarr"})
    assert default_run_name(cfg) == name


# -- a rule added in one class -----------------------------------------------------------------------------

@pytest.fixture
def toy_rule():
    @register_spatial_rule
    class SameRow(SpatialRule):
        """Spots in the same row at most ``reach`` apart (a rule only this test knows)."""

        name = "toy-same-row"
        reach: float = 1.0

        def describe(self, coords) -> str:
            return f"same row within {self.reach:g}"

        def connectivities(self, coords):
            from semst.cluster.graphs import symmetric_connectivities

            dx = np.abs(coords[:, None, 0] - coords[None, :, 0])
            rows, cols = np.nonzero((dx <= self.reach) & (coords[:, None, 1] == coords[None, :, 1]))
            return symmetric_connectivities(rows, cols, len(coords))

    yield SameRow
    del SPATIAL_RULES["toy-same-row"]


def test_a_rule_registered_in_one_class_runs_end_to_end_from_a_config_table(toy_rule, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    slide = two_domain_slide()
    lines = []
    semst.domains(slide, spatial={"rule": "toy-same-row", "reach": 1.0}, progress=False, log=lines.append, **SMALL)
    (line,) = [x for x in lines if "spatial graph" in x]
    assert "spatial graph (same row within 1) 1.8 neighbours per spot" in line  # 10 per row: 2 x 8 ends + 8 x 2
    assert slide.obs["semst_domain"].nunique() == 2
    assert '[cluster.spatial]\nrule = "toy-same-row"\nreach = 1.0\n' in slide.uns["semst"]["config"]
    g = semst.gr.spatial_graph(slide, rule="toy-same-row", reach=2.0)
    assert g.connectivities.nnz == 8 * (2 * 2 + 2 * 3 + 6 * 4)  # per row of 10: ends 2, next 3, others 4
    assert slide.uns["spatial_neighbors"]["params"] == {"rule": "toy-same-row", "self_loops": 1,
                                                        "allow_dense": False, "reach": 2.0}


# -- semst.gr: graphs in adata.obsp, squidpy's layout ------------------------------------------------------

def test_semst_gr_writes_squidpys_keys_and_layout():
    slide = two_domain_slide()
    graph = semst.gr.spatial_graph(slide, rule="knn", k=4)
    conn, dist = slide.obsp["spatial_connectivities"], slide.obsp["spatial_distances"]
    assert graph.connectivities is conn and graph.distances is dist
    assert sp.isspmatrix_csr(conn) and conn.dtype == np.float32 and (conn.data == 1).all()
    assert (conn != conn.T).nnz == 0 and conn.diagonal().sum() == 0
    assert sp.isspmatrix_csr(dist) and (dist.indptr == conn.indptr).all() and (dist.indices == conn.indices).all()
    coords = slide.obsm["spatial"]
    i, j = conn.nonzero()
    np.testing.assert_allclose(np.asarray(dist[i, j]).ravel(), np.linalg.norm(coords[i] - coords[j], axis=1))
    assert slide.uns["spatial_neighbors"] == {"connectivities_key": "spatial_connectivities",
                                              "distances_key": "spatial_distances",
                                              "params": {"rule": "knn", "self_loops": 1, "allow_dense": False, "k": 4}}


def test_semst_gr_without_a_rule_uses_the_slides_config_rule_and_copy_writes_nothing():
    slide = two_domain_slide()
    graph = semst.gr.spatial_graph(slide, copy=True)
    assert not slide.obsp and "spatial_neighbors" not in slide.uns
    expected = spatial_graph(slide.obsm["spatial"], k=6)  # default.toml: the 6 nearest spots
    assert graph.connectivities.nnz == expected.num_edges() - slide.n_obs


def test_semst_gr_refuses_a_bad_rule_and_leaves_adata_as_it_was():
    slide = two_domain_slide()
    with pytest.raises(ConfigError, match="not a spatial-graph rule"):
        semst.gr.spatial_graph(slide, rule="delaunay")
    with pytest.raises(GraphError, match="80 spots are too few for \\[cluster.spatial\\] k = 100"):
        semst.gr.spatial_graph(slide, rule="knn", k=100)
    assert not slide.obsp and not slide.uns


def test_semst_gr_then_domains_on_its_graph_gives_the_default_domains_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    given, default = two_domain_slide(), two_domain_slide()
    semst.gr.spatial_graph(given)
    lines = []
    semst.domains(given, connectivity_key="spatial_connectivities", seeds=[0, 1], progress=False, log=lines.append,
                  **SMALL)
    semst.domains(default, seeds=[0, 1], progress=False, log=quiet, **SMALL)
    np.testing.assert_array_equal(given.obsm["X_semst"], default.obsm["X_semst"])
    np.testing.assert_array_equal(given.obs["semst_domain"], default.obs["semst_domain"])
    assert any("spatial graph (adata.obsp['spatial_connectivities'])" in x for x in lines)


def squidpy_knn_layout(coords: np.ndarray, k: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """What squidpy.gr.spatial_neighbors(coord_type="generic", n_neighs=k) writes (KNNBuilder): each
    spot's k nearest other spots, one direction only (not symmetrised), float32 ones; distances alike."""
    from sklearn.neighbors import NearestNeighbors

    n = len(coords)
    dists, cols = NearestNeighbors(n_neighbors=k).fit(coords).kneighbors()
    rows = np.repeat(np.arange(n), k)
    conn = sp.csr_matrix((np.ones(n * k, dtype=np.float32), (rows, cols.ravel())), shape=(n, n))
    return conn, sp.csr_matrix((dists.ravel(), (rows, cols.ravel())), shape=(n, n))


def test_a_graph_in_squidpys_layout_is_the_same_graph_as_semsts_rule(tmp_path, monkeypatch):
    """squidpy's one-directional kNN (written here in its layout by hand, see squidpy_knn_layout; the
    README says whether squidpy itself installs beside our pins), weights and a diagonal included,
    gives the domains of the knn rule."""
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    given, default = two_domain_slide(), two_domain_slide()
    coords = given.obsm["spatial"] + np.random.default_rng(1).normal(0, 0.01, (80, 2))  # no ties
    given.obsm["spatial"] = default.obsm["spatial"] = coords
    conn, dist = squidpy_knn_layout(coords, 5)
    given.obsp["spatial_connectivities"] = conn * 0.5 + sp.identity(80, format="csr")  # weights, set_diag=True
    given.obsp["spatial_distances"] = dist
    semst.domains(given, connectivity_key="spatial_connectivities", progress=False, log=quiet, **SMALL)
    semst.domains(default, spatial={"rule": "knn", "k": 5}, progress=False, log=quiet, **SMALL)
    np.testing.assert_array_equal(given.obsm["X_semst"], default.obsm["X_semst"])


def test_squidpys_own_graph_is_accepted_where_squidpy_is_installed(tmp_path, monkeypatch):
    sq = pytest.importorskip("squidpy")
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    given, default = two_domain_slide(), two_domain_slide()
    coords = given.obsm["spatial"] + np.random.default_rng(1).normal(0, 0.01, (80, 2))
    given.obsm["spatial"] = default.obsm["spatial"] = coords
    sq.gr.spatial_neighbors(given, coord_type="generic", n_neighs=5)
    semst.domains(given, connectivity_key="spatial_connectivities", progress=False, log=quiet, **SMALL)
    semst.domains(default, spatial={"rule": "knn", "k": 5}, progress=False, log=quiet, **SMALL)
    np.testing.assert_array_equal(given.obsm["X_semst"], default.obsm["X_semst"])


def test_the_given_graph_gets_the_config_rules_self_loops(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    given, default = two_domain_slide(), two_domain_slide()
    semst.gr.spatial_graph(given, rule="knn", k=4)
    semst.domains(given, connectivity_key="spatial_connectivities", spatial_self_loops=2, progress=False, log=quiet,
                  **SMALL)
    semst.domains(default, spatial={"rule": "knn", "k": 4, "self_loops": 2}, progress=False, log=quiet, **SMALL)
    np.testing.assert_array_equal(given.obsm["X_semst"], default.obsm["X_semst"])


@pytest.mark.parametrize("setup, error, message", [
    (lambda a: None, ConfigError, "connectivity_key='spatial_connectivities': adata.obsp has no such graph (it holds "
                                  "nothing); build one with semst.gr.spatial_graph(adata)"),
    (lambda a: a.obsp.__setitem__("spatial_connectivities", sp.random(80, 80, 0.05, format="csr") * np.nan),
     ConfigError, "adata.obsp['spatial_connectivities'] must hold finite numbers"),
])
def test_a_missing_or_unusable_given_graph_is_refused_before_any_work(tmp_path, monkeypatch, setup, error, message):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    slide = two_domain_slide()
    setup(slide)
    with pytest.raises(error) as err:
        semst.domains(slide, connectivity_key="spatial_connectivities", progress=False, log=quiet, **SMALL)
    assert message in str(err.value) and "semst_domain" not in slide.obs


def test_connectivity_key_takes_the_graphs_name_not_the_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    slide = two_domain_slide()
    semst.gr.spatial_graph(slide)
    with pytest.raises(ConfigError, match=r'^connectivity_key must name a graph in adata.obsp \(e.g. '
                                          r'"spatial_connectivities"\), got a csr_matrix$'):
        semst.domains(slide, connectivity_key=slide.obsp["spatial_connectivities"], progress=False, log=quiet, **SMALL)


def test_a_given_graph_of_another_slide_is_refused_naming_both_sizes():
    from semst.cluster.spatial import GivenGraph

    graph = GivenGraph(matrix=sp.identity(50, format="csr"), source="adata.obsp['g']")
    with pytest.raises(GraphError, match=r"adata.obsp\['g'\] is 50 x 50 but the slide has 80 spots"):
        graph.check_spots(80)


# -- the CLI and the package ----------------------------------------------------------------------------------

def test_a_bad_rule_in_a_config_file_stops_the_cli_with_one_line_before_any_run_folder(tmp_path):
    from semst.experiments.cli import main

    two_domain_slide().write_h5ad(tmp_path / "toy.h5ad")
    (tmp_path / "bad.toml").write_text('[cluster.spatial]\nrule = "knn"\nk = "six"\n')
    out = CliRunner(env={"SEMST_DATA_PATH": str(tmp_path)}).invoke(
        main, ["cluster", "toy", "--config", str(tmp_path / "bad.toml"), "--fusion", "none", "--out",
               str(tmp_path / "r"), "--cache", str(tmp_path / "c.zarr")])
    assert out.exit_code == 2, out.output
    assert 'error: [cluster.spatial] k must be an integer, got "six" (str)' in out.output
    assert "Traceback" not in out.output and not (tmp_path / "r").exists() and not (tmp_path / "c.zarr").exists()


def test_semst_gr_is_there_without_making_import_semst_load_the_graph_libraries():
    code = ("import sys, semst; assert 'dgl' not in sys.modules and 'torch' not in sys.modules; "
            "gr = semst.gr; assert callable(gr.spatial_graph) and 'dgl' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
