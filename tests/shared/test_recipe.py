"""The paper recipe pinned to the authors' formulas on small inputs (issue 9).

Every reference below is written here from the equations of the paper / the authors' code
(longjiangk/SemST), not from their code, on inputs small enough to compute by brute force.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from toy_slides import two_domain_slide

from semst.cluster.fusion import FSM
from semst.cluster.graphs import adaptive_radius, median_spacing, neighbour_pairs, spatial_graph
from semst.cluster.losses import all_pairs_spatial_loss, correlation_reduction_loss, zinb_loss
from semst.cluster.network import GCNBranch, SemST
from semst.cluster.spatial import spatial_rule
from semst.shared.cache import embedding_tag, model_label
from semst.shared.config import (
    ConfigError,
    EmbedConfig,
    PreprocessConfig,
    config_identity,
    config_to_toml,
    load_cluster_config,
    load_embed_config,
)
from semst.shared.hashing import json_hash
from semst.shared.preprocess import check_gene_supply, preprocess, top_k_genes

REPO = Path(__file__).resolve().parents[2]


# -- recipe: config fields, precedence, refusals -------------------------------------------------------

@pytest.mark.parametrize("dataset,expected", [
    # config/DLPFC.ini: epochs 100, lr 1e-3, k 14, radius 560 px (~4.1 spacings), 256/128, ratio 1.2,
    # alpha 1, gamma (spatial) 0.1, beta (correlation reduction) 0.1, fdim 3000
    ("dlpfc-151673", dict(epochs=100, lr=1e-3, expr_k=14, radius_spacings=4.1, spatial_k=None, radius=None,
                          spatial_adaptive_k=None, spatial_self_loops=2, hidden1=256, hidden2=128,
                          fsm_hidden_ratio=1.2, zinb_weight=1.0, lambda_s=0.1, gamma=0.1)),
    # config/Mouse_Brain_Anterior.ini: 200, 1e-3, k 15, adaptive threshold k 15, 128/64, ratio 0.5
    ("mba", dict(epochs=200, lr=1e-3, expr_k=15, spatial_adaptive_k=15, radius_spacings=None, spatial_k=None,
                 hidden1=128, hidden2=64, fsm_hidden_ratio=0.5, lambda_s=0.1, gamma=0.1)),
    # config/Human_Breast_Cancer.ini: 600, 1e-4, k 15, adaptive 15, 256/128, ratio 0.5
    ("hbc", dict(epochs=600, lr=1e-4, expr_k=15, spatial_adaptive_k=15, hidden1=256, hidden2=128,
                 fsm_hidden_ratio=0.5)),
    # config/MVC.ini: 2000, 1e-3, k 5, kNN 15, 128/64, ratio 0.5, gamma 1, beta 1
    ("mvc", dict(epochs=2000, lr=1e-3, expr_k=5, spatial_k=15, spatial_adaptive_k=None, radius_spacings=None,
                 hidden1=128, hidden2=64, fsm_hidden_ratio=0.5, lambda_s=1.0, gamma=1.0)),
    # config/Embryo.ini: 500, 1e-3, k 15, kNN 15, 256/128, ratio 0.5, gamma 1, beta 1
    ("me", dict(epochs=500, lr=1e-3, expr_k=15, spatial_k=15, hidden1=256, hidden2=128,
                fsm_hidden_ratio=0.5, lambda_s=1.0, gamma=1.0)),
])
def test_the_paper_recipe_takes_each_datasets_settings_from_the_authors_ini(dataset, expected):
    cfg = load_cluster_config(dataset, {"recipe": "paper"})
    flat = config_identity(cfg)  # the spatial table in the old keys, which the .ini notes above use
    assert {k: flat[k] for k in expected} == expected
    # the choices every paper dataset shares (train.py, utils.py, models.py, llm_generate_embedding.py)
    assert (cfg.zinb_target, cfg.zinb_ridge, cfg.spatial_loss, cfg.cr_similarity, cfg.gcn_norm, cfg.gcn_init,
            cfg.fsm_mode) == ("scaled", 0.05, "all-pairs", "cosine", "right", "uniform", "paper")
    assert (cfg.embed.recipe, cfg.embed.k_genes, cfg.embed.gene_ranking, cfg.embed.genes_from) == (
        "paper", 10, "scaled", "hvg")
    assert cfg.preprocess.min_cells == 100 and cfg.preprocess.require_top_genes
    assert cfg.preprocess.n_top_genes == {"hbc": 2000, "mvc": 128}.get(dataset, 3000)


def test_the_semst_recipe_is_todays_behaviour():
    cfg = load_cluster_config("dlpfc-151673")
    assert cfg.recipe == "semst" and cfg.embed.recipe == "semst"
    assert (cfg.spatial, cfg.embed.k_genes, cfg.embed.gene_ranking) == ({"rule": "knn", "k": 6}, 20, "counts")
    assert (cfg.zinb_target, cfg.zinb_ridge, cfg.spatial_loss, cfg.cr_similarity, cfg.gcn_norm, cfg.gcn_init,
            cfg.fsm_mode) == ("counts", 0.0, "sampled", "pearson", "both", "xavier", "zero-init")
    assert load_cluster_config("dlpfc-151673", {"recipe": "semst"}) == cfg


def test_a_field_the_user_sets_beats_the_recipe_and_the_spatial_rule_is_one_group():
    cfg = load_cluster_config("dlpfc-151673", {"recipe": "paper", "epochs": 7, "cr_similarity": "pearson"},
                              embed_overrides={"k_genes": 20})
    assert (cfg.epochs, cfg.cr_similarity, cfg.embed.k_genes, cfg.embed.gene_ranking) == (7, "pearson", 20, "scaled")
    assert cfg.lr == 1e-3 and cfg.zinb_target == "scaled"  # the rest stays the paper's
    knn = load_cluster_config("dlpfc-151673", {"recipe": "paper", "spatial_k": 8})
    assert knn.spatial == {"rule": "knn", "k": 8}  # the recipe's self weight 2 went with its rule
    assert spatial_rule(knn).self_loops == 1


def test_the_prompts_follow_the_cluster_recipe_unless_the_embed_settings_name_their_own():
    assert load_cluster_config("mob", {"recipe": "paper"}).embed.gene_ranking == "scaled"
    mixed = load_cluster_config("mob", {"recipe": "paper"}, embed_overrides={"recipe": "semst"})
    assert (mixed.embed.recipe, mixed.embed.k_genes, mixed.embed.gene_ranking) == ("semst", 20, "counts")
    assert mixed.spatial_loss == "all-pairs"


def test_a_printed_paper_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_cluster_config("dlpfc-151673", {"recipe": "paper", "epochs": 9, "seeds": [0, 1]})
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(cfg))
    assert load_cluster_config("dlpfc-151673", path=path) == cfg


def test_an_unknown_recipe_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'papr'; known recipes: semst, paper"):
        load_cluster_config("mob", {"recipe": "papr"})
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_embed_config("mob", {"recipe": "Paper"})


@pytest.mark.parametrize("field,value,message", [
    ("fsm_mode", "gate", 'fsm_mode must be "paper", "zero-init" or "gated", got "gate"'),
    ("gcn_norm", "left", 'gcn_norm must be "both" or "right", got "left"'),
    ("spatial_loss", "exact", 'spatial_loss must be "sampled" or "all-pairs", got "exact"'), ("zinb_ridge", -1.0, "zinb_ridge must be >= 0"),
])
def test_bad_recipe_fields_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_cluster_config("mob", {field: value})


def test_scaled_ranking_needs_the_hvg_matrix():
    with pytest.raises(ConfigError, match="only exists for the HVGs"):
        load_embed_config("mob", {"gene_ranking": "scaled", "genes_from": "all"})


def test_a_slide_with_fewer_genes_than_the_papers_fdim_is_refused_before_any_work(tmp_path):
    from semst.cluster.run import cluster_dataset

    slide = two_domain_slide()  # 20 genes
    cfg = load_cluster_config("dlpfc-151673", {"recipe": "paper", "cache": str(tmp_path / "none.zarr")})
    with pytest.raises(ConfigError, match=r"this slide has 0 genes detected in >= 100 spots \(of 20\), but the paper "
                                          r"recipe needs n_top_genes = 3000 .*: missing 3000 genes"):
        cluster_dataset(cfg, adata=slide, write=False, log=lambda *a: None)
    assert not (tmp_path / "none.zarr").exists()  # the cache was never opened
    prep = PreprocessConfig(min_cells=1, n_top_genes=20, require_top_genes=True)
    assert check_gene_supply(slide, prep) == 20


def test_the_prompt_ranking_enters_the_cache_tag_and_counts_tags_are_unchanged():
    counts = EmbedConfig(dataset="x")
    scaled = EmbedConfig(dataset="x", gene_ranking="scaled")
    assert embedding_tag(counts) != embedding_tag(scaled)
    # the tag of a counts ranking is the one written before gene_ranking existed
    import dataclasses
    prep = dataclasses.asdict(counts.preprocess)
    prep.pop("require_top_genes")
    before = {"k": 20, "template": "semst", "genes_from": "hvg", "preprocess": prep}
    assert embedding_tag(counts) == f"{model_label('default')}.mean.k20.semst.{json_hash(before, 8)}"


# -- preprocessing and the top-k ranking -----------------------------------------------------------------

def test_the_scaled_matrix_and_its_top_k_are_the_authors_formulas():
    """Normalise each spot to 1e4, divide each gene by its sd (not centred), clip at 10, then the top k
    genes of each spot by that value, largest first (llm_generate_embedding.py lines 85-93)."""
    X = np.array([[5, 0, 1, 2, 0], [0, 3, 3, 1, 9], [2, 2, 0, 0, 1], [1, 0, 7, 4, 2], [0, 1, 1, 6, 3]], dtype=np.float32)
    import anndata as ad
    a = ad.AnnData(X=X.copy())
    a.var_names = ["G0", "G1", "G2", "G3", "G4"]
    prep = preprocess(a, PreprocessConfig(min_cells=1, n_top_genes=5))
    norm = X / X.sum(1, keepdims=True) * 1e4
    ref = np.minimum(norm / norm.std(0, ddof=1), 10.0)
    np.testing.assert_allclose(prep.X, ref, rtol=1e-5)
    got = top_k_genes(prep, 2, ranking="scaled")
    want = [[f"G{j}" for j in np.argsort(-ref[i], kind="stable")[:2]] for i in range(5)]
    assert got == want
    assert top_k_genes(prep, 2) == [["G0", "G3"], ["G4", "G1"], ["G0", "G1"], ["G2", "G3"], ["G3", "G4"]]


# -- graphs -------------------------------------------------------------------------------------------------

def _authors_threshold(dist: np.ndarray, k: int) -> float:
    """The smallest multiple of 5 (px) at which every spot counts more than 2 spots within it (itself
    included) and some spot more than k (construction.py's coarse-to-fine search ends there)."""
    for t in np.arange(0, 1000, 5):
        within = (dist <= t).sum(1)
        if within.min() > 2 and within.max() > k:
            return float(t)
    raise AssertionError("no threshold below 1000")


def test_the_adaptive_threshold_is_the_authors_search():
    rng = np.random.default_rng(0)
    hexagon = np.array([(c + 0.5 * (r % 2), r * math.sqrt(3) / 2) for r in range(8) for c in range(9)]) * 137.0
    for coords in (hexagon + rng.normal(0, 3, hexagon.shape), rng.uniform(0, 1500, size=(60, 2))):
        dist = np.linalg.norm(coords[:, None] - coords[None], axis=2)
        for k in (6, 15):
            assert adaptive_radius(coords, k, step=5.0) == pytest.approx(_authors_threshold(dist, k))


def test_the_authors_knn_graph_is_the_symmetrised_k_nearest_other_spots():
    """MVC / Embryo (construction.py lines 11-35): spot i links to its k nearest other spots, then
    A = min(A + A^T, 1); here plus one self-loop (their + I in train.py)."""
    rng = np.random.default_rng(8)
    coords = rng.uniform(0, 10, (30, 2))
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    A = np.zeros((30, 30))
    for i in range(30):
        A[i, np.argsort(dist[i])[1:16]] = 1
    A = np.minimum(A + A.T, 1) + np.eye(30)
    g = spatial_rule({"rule": "knn", "k": 15}).build(coords)
    np.testing.assert_array_equal(_dense_adjacency(g, 30), A)


def test_a_spatial_table_names_exactly_one_rule_and_only_its_parameters():
    with pytest.raises(ConfigError, match="rule 'knn' takes self_loops, allow_dense, k; not spacings"):
        spatial_rule({"rule": "knn", "k": 6, "spacings": 1.5})
    with pytest.raises(ConfigError, match="names no rule"):
        spatial_rule({"k": 6})


def test_a_radius_in_spacings_is_the_same_graph_in_any_coordinate_unit():
    rng = np.random.default_rng(2)
    coords = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2) + rng.normal(0, 0.02, (100, 2))
    assert median_spacing(coords) == pytest.approx(1.0, abs=0.05)
    rule = spatial_rule({"rule": "radius_spacings", "spacings": 2.1})
    g1, g2 = rule.build(coords), rule.build(coords * 137.0)
    edges = lambda g: set(zip(*(t.tolist() for t in g.edges())))  # noqa: E731
    assert edges(g1) == edges(g2) == edges(spatial_graph(coords, radius=2.1 * median_spacing(coords)))


def test_the_authors_radius_graph_weighs_the_spot_itself_twice():
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
    g = spatial_rule({"rule": "radius", "radius": 1.5, "self_loops": 2}).build(coords)
    assert g.in_degrees().tolist() == [3, 4, 3, 3, 3]  # neighbours + 2 self-loops
    src, dst = neighbour_pairs(g)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3)]


def _dense_adjacency(g, n):
    A = np.zeros((n, n))
    for s, d in zip(*(t.tolist() for t in g.edges())):
        A[d, s] += 1.0
    return A


@pytest.mark.parametrize("self_loops", [1, 2])
def test_right_normalisation_is_row_normalised_adjacency(self_loops):
    """GCN layer of the authors: D^-1 (A + I) X W + b, with A their spatial matrix (train.py 38-41)."""
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 5, (25, 2))
    g = spatial_rule({"rule": "knn", "k": 3, "self_loops": self_loops}).build(coords)
    A = _dense_adjacency(g, 25)  # symmetric neighbours + self_loops on the diagonal
    branch = GCNBranch(6, 4, 3, 0.0, norm="right", init="uniform")
    x = torch.from_numpy(rng.normal(size=(25, 6)).astype(np.float32))
    with torch.no_grad():
        got = branch(g, x).numpy()
        P = A / A.sum(1, keepdims=True)
        W1, b1 = branch.weight1.numpy(), branch.conv1.bias.numpy()
        W2, b2 = branch.conv2.weight.numpy(), branch.conv2.bias.numpy()
        h = np.maximum(P @ (x.numpy() @ W1) + b1, 0)
        np.testing.assert_allclose(got, P @ (h @ W2) + b2, rtol=1e-4, atol=1e-5)


def test_the_authors_gcn_init_is_uniform_in_one_over_sqrt_out():
    torch.manual_seed(0)
    b = GCNBranch(300, 64, 16, 0.0, init="uniform")
    for w, bias, out in ((b.weight1, b.conv1.bias, 64), (b.conv2.weight, b.conv2.bias, 16)):
        bound = 1 / math.sqrt(out)
        assert w.abs().max() <= bound and bias.abs().max() <= bound
        assert w.abs().max() > 0.9 * bound and bias.abs().max() > 0.5 * bound  # not zero, not Xavier


# -- losses ------------------------------------------------------------------------------------------------

def _zinb_reference(x, mu, theta, pi, ridge):
    from scipy.special import gammaln
    log_nb = (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)
              + theta * np.log(theta / (theta + mu)) + x * np.log(mu / (theta + mu)))
    nll = np.where(x == 0, -np.log(pi + (1 - pi) * (theta / (theta + mu)) ** theta), -(np.log(1 - pi) + log_nb))
    return (nll + ridge * pi ** 2).mean()


def test_zinb_on_the_scaled_matrix_with_ridge_is_the_authors_loss():
    """train.py line 53: ZINB(pi, theta, ridge_lambda=0.05).loss(scaled X, mean), scale factor 1."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random((6, 5)) < 0.4, 0.0, rng.uniform(0.1, 10.0, (6, 5)))  # continuous, clipped at 10
    mu, theta, pi = rng.uniform(0.5, 4, (6, 5)), rng.uniform(0.5, 3, (6, 5)), rng.uniform(0.05, 0.5, (6, 5))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = zinb_loss(t(x), t(mu), t(theta), t(pi), ridge=0.05)
    assert float(got) == pytest.approx(_zinb_reference(x, mu, theta, pi, 0.05), rel=1e-6)


def test_cosine_correlation_reduction_is_the_authors_formula():
    """S = (Z1 columns / their L2 norm)^T (Z2 columns / their L2 norm); mean (S_ii - 1)^2 + mean S_ij^2."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(30, 4)) + 1.0, rng.normal(size=(30, 4))
    an, bn = a / np.linalg.norm(a, axis=0), b / np.linalg.norm(b, axis=0)
    S = an.T @ bn
    want = ((np.diag(S) - 1) ** 2).mean() + (S[~np.eye(4, dtype=bool)] ** 2).mean()
    assert float(correlation_reduction_loss(torch.tensor(a), torch.tensor(b), "cosine")) == pytest.approx(want, rel=1e-9)
    assert float(correlation_reduction_loss(torch.tensor(a), torch.tensor(b))) != pytest.approx(want, rel=1e-3)


def _authors_spatial_loss(z: torch.Tensor, nei: torch.Tensor) -> torch.Tensor:
    """utils.py's equation: M = sigmoid(cosine) with a zero diagonal of cosines, graph_neg = 1 - nei,
    -(mean(nei * log M) + mean(neg * log(1 - M))) / 2 over all N x N entries."""
    zn = z / z.norm(dim=1, keepdim=True)
    cos = zn @ zn.T
    cos = cos - torch.diag(torch.diag(cos))
    m = torch.sigmoid(cos)
    return -((nei * torch.log(m)).mean() + ((1 - nei) * torch.log(1 - m)).mean()) / 2


@pytest.mark.parametrize("self_in_nei", [True, False])
def test_the_all_pairs_spatial_loss_and_its_gradient_are_the_authors(self_in_nei):
    rng = np.random.default_rng(6)
    coords = rng.uniform(0, 6, (40, 2))
    src, dst = neighbour_pairs(spatial_graph(coords, radius=1.2))
    nei = torch.zeros(40, 40, dtype=torch.float64)
    nei[src, dst] = 1.0
    if self_in_nei:  # the radius graph of construction.py holds the spot itself; the others do not
        nei += torch.eye(40, dtype=torch.float64)
    z = torch.tensor(rng.normal(size=(40, 5)), requires_grad=True)
    want = _authors_spatial_loss(z, nei)
    (g_want,) = torch.autograd.grad(want, z)
    for block in (1 << 22, 7 * 40):  # one block, and blocks of 7 rows
        got = all_pairs_spatial_loss(z, torch.from_numpy(src), torch.from_numpy(dst), block_elements=block)
        (g_got,) = torch.autograd.grad(got, z)
        assert got.item() == pytest.approx(want.item(), rel=1e-9)
        np.testing.assert_allclose(g_got.numpy(), g_want.numpy(), rtol=1e-7, atol=1e-12)


def test_the_sampled_all_pairs_estimate_is_unbiased():
    rng = np.random.default_rng(7)
    coords = rng.uniform(0, 6, (50, 2))
    src, dst = (torch.from_numpy(a) for a in neighbour_pairs(spatial_graph(coords, radius=1.2)))
    z = torch.tensor(rng.normal(size=(50, 4)))
    exact = float(all_pairs_spatial_loss(z, src, dst))
    draws = [float(all_pairs_spatial_loss(z, src, dst, exact_below=10, samples_per_spot=4,
                                          rng=np.random.default_rng(s))) for s in range(400)]
    sem = np.std(draws) / math.sqrt(len(draws))
    assert abs(np.mean(draws) - exact) < 4 * sem and np.std(draws) > 0


# -- the network ---------------------------------------------------------------------------------------------

def _authors_parameter_count(genes, h1, h2, ratio, llm_dim):
    """models.py's SemST: two GCNs (gc1 genes -> h1, gc2 h1 -> h2, with biases), LLMHead llm_dim ->
    llm_dim/2 -> h2, modulation MLP h2 -> int(h2 * ratio) -> 4 h2, MLP 2 h2 -> h1 -> h2, ZINB decoder
    h2 -> h1 (+ BatchNorm scale and shift) -> three heads h1 -> genes."""
    gcn = (genes * h1 + h1) + (h1 * h2 + h2)
    head = (llm_dim * (llm_dim // 2) + llm_dim // 2) + (llm_dim // 2 * h2 + h2)
    hid = int(h2 * ratio)
    modulation = (h2 * hid + hid) + (hid * 4 * h2 + 4 * h2)
    mlp = (2 * h2 * h1 + h1) + (h1 * h2 + h2)
    zinb = (h2 * h1 + h1) + 2 * h1 + 3 * (h1 * genes + genes)
    return 2 * gcn + head + modulation + mlp + zinb


@pytest.mark.parametrize("dataset,genes,count", [
    ("dlpfc-151673", 3000, 7_588_161),  # DLPFC.ini: 256/128, ratio 1.2; Qwen3-4B hidden size 2560
    ("mba", 3000, 5_349_704),  # Mouse_Brain_Anterior.ini: 128/64, ratio 0.5
])
def test_forward_shapes_and_parameter_counts_of_the_papers_settings(dataset, genes, count):
    cfg = load_cluster_config(dataset, {"recipe": "paper"})
    llm_dim = 2560
    model = SemST.from_config(genes, llm_dim, cfg.model)
    assert cfg.model.fusion == "film"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == _authors_parameter_count(genes, cfg.hidden1, cfg.hidden2, cfg.fsm_hidden_ratio, llm_dim) == count
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10, (20, 2))
    g = spatial_graph(coords, k=3)
    x = torch.from_numpy(rng.random((20, genes), dtype=np.float32))
    with torch.no_grad():
        model.eval()
        z_s, z_f, z = model.encode(g, g, x, torch.randn(20, llm_dim))
        pi, disp, mean = model.decoder(z)
    assert z_s.shape == z_f.shape == z.shape == (20, cfg.hidden2)
    assert pi.shape == disp.shape == mean.shape == (20, genes)


# -- a modulation that starts as the identity (item 6) ----------------------------------------------------

@pytest.mark.parametrize("mode", ["zero-init", "gated"])
def test_identity_start_fsm_modes_start_as_fusion_none(mode):
    torch.manual_seed(0)
    fsm = FSM(16, 8, fsm_hidden_ratio=1.0, fsm_mode=mode)
    z = torch.randn(5, 16)
    assert torch.equal(fsm(z, torch.randn(5, 8)), z)
    assert fsm.stats()["film_change"] == 0.0
    assert ("film_gate" in fsm.stats()) == (mode == "gated")
    paper = FSM(16, 8, fsm_hidden_ratio=1.0)
    assert sum(p.numel() for p in fsm.parameters()) == sum(p.numel() for p in paper.parameters()) + (mode == "gated")


def test_the_gate_moves_in_training_and_is_reported_per_run():
    from semst.cluster.graphs import expression_graph
    from semst.cluster.train import train_semst
    from semst.shared.config import ClusterConfig

    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(8.0), np.arange(6.0)), -1).reshape(-1, 2)
    counts = rng.poisson(3.0, size=(48, 12)).astype(np.float32)
    feats = (counts / counts.std(0)).astype(np.float32)
    cfg = ClusterConfig.from_flat(dataset="toy", spatial={"rule": "knn", "k": 4}, hidden1=16, hidden2=8, epochs=5,
                                  fsm_mode="gated")
    result = train_semst(feats, sp.csr_matrix(counts), np.ones(48), spatial_graph(coords, k=4),
                         expression_graph(feats, 4), rng.normal(size=(48, 10)).astype(np.float32), cfg.model,
                         cfg.loss, cfg.train, 0, progress=False)
    assert len(result.history["film_gate"]) == 5 and result.history["film_gate"][0] == 0.0
    assert result.report["film_gate"] != 0.0 and result.report["film_change"] > 0.0


def test_the_paper_recipe_trains_end_to_end_on_a_toy_slide():
    from semst.cluster.graphs import expression_graph
    from semst.cluster.train import train_semst
    from semst.shared.config import ClusterConfig

    slide = two_domain_slide()
    prep = preprocess(slide, PreprocessConfig(min_cells=1, n_top_genes=20))
    cfg = ClusterConfig.from_flat(dataset="toy", spatial={"rule": "radius_spacings", "spacings": 1.5, "self_loops": 2},
                                  hidden1=16, hidden2=8, epochs=3, zinb_target="scaled", zinb_ridge=0.05,
                                  spatial_loss="all-pairs", cr_similarity="cosine", gcn_norm="right",
                                  gcn_init="uniform")
    g = spatial_rule(cfg).build(slide.obsm["spatial"])
    result = train_semst(prep.X, None, None, g, expression_graph(prep.X, 4),
                         np.random.default_rng(0).normal(size=(80, 6)).astype(np.float32), cfg.model, cfg.loss,
                         cfg.train, 0, progress=False)
    assert result.latent.shape == (80, 8) and all(np.isfinite(v).all() for v in result.history.values())


# -- the experiment grid of item 4 ----------------------------------------------------------------------------

def test_the_recipe_grid_parses_and_crosses_recipes_fusions_and_rankings():
    from semst.experiments.grid import cell_config, load_grid

    grid = load_grid(REPO / "experiments" / "recipe.toml")
    assert grid.datasets == ["dlpfc-151673", "starmap-mpfc", "mob"] and grid.seeds == [0, 1, 2, 3, 4]
    three = load_grid(REPO / "experiments" / "recipe-3seeds.toml")
    assert three.datasets == ["dlpfc-151510", "osmfish"] and three.seeds == [0, 1, 2]
    assert three.variants == grid.variants and [t.variants for t in three.tables] == [t.variants for t in grid.tables]
    combos = {}
    for v in grid.variants:
        cfg = cell_config(grid, v, "dlpfc-151673")
        combos[v.name] = (cfg.recipe, cfg.fusion, cfg.embed.gene_ranking, cfg.embed.k_genes, cfg.fsm_mode)
    assert combos["paper-film"] == ("paper", "film", "scaled", 10, "paper")
    assert combos["paper-none"][:2] == ("paper", "none")
    assert combos["semst-film"] == ("semst", "film", "counts", 20, "paper")
    assert combos["semst-none"][:2] == ("semst", "none")
    assert combos["paper-film-counts20"] == ("paper", "film", "counts", 20, "paper")
    assert combos["semst-film-scaled10"] == ("semst", "film", "scaled", 10, "paper")
    assert {c[4] for c in combos.values()} >= {"gated", "zero-init"}
