"""Training: runs, is deterministic per seed, and never needs labels."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from semst.cluster.domains import kmeans_domains
from semst.cluster.graphs import expression_graph, spatial_graph
from semst.cluster.train import resolve_minibatch, train_semst
from semst.shared.config import ClusterConfig


@pytest.fixture(scope="module")
def slide():
    rng = np.random.default_rng(0)
    n, g = 120, 30
    coords = np.stack(np.meshgrid(np.arange(12), np.arange(10)), -1).reshape(-1, 2).astype(float)
    domain = (coords[:, 0] >= 6).astype(int)
    rates = np.where(domain[:, None] == 1, rng.uniform(1, 8, g), rng.uniform(1, 8, g)[::-1])
    counts = rng.poisson(rates).astype(np.float32)
    features = np.log1p(counts)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    sf = counts.sum(1) / np.median(counts.sum(1))
    return dict(features=features.astype(np.float32), counts=sp.csr_matrix(counts), size_factors=sf,
                spatial=spatial_graph(coords, k=4), expression=expression_graph(features, 5),
                semantic=rng.normal(size=(n, 16)).astype(np.float32), domain=domain)


def cfg(**kw):
    base = dict(dataset="synthetic", spatial={"rule": "knn", "k": 4}, hidden1=16, hidden2=8, epochs=4, decoder_batch=50)
    return ClusterConfig.from_flat(**{**base, **kw})


def run(slide, c, seed):
    return train_semst(slide["features"], slide["counts"], slide["size_factors"], slide["spatial"],
                       slide["expression"], slide["semantic"], c.model, c.loss, c.train, seed, progress=False)


def test_training_returns_one_embedding_row_per_spot_and_finite_losses(slide):
    result = run(slide, cfg(), 0)
    assert result.latent.shape == (120, 8)
    # the four losses, and how far the default FSM (zero-init: starts as the identity) has moved
    assert set(result.history) == {"total", "zinb", "cr", "spatial", "film_change"}
    assert all(len(v) == 4 and np.isfinite(v).all() for v in result.history.values())


def test_the_same_seed_gives_the_same_embedding_and_domains(slide):
    a, b = run(slide, cfg(), 7), run(slide, cfg(), 7)
    np.testing.assert_array_equal(a.latent, b.latent)
    np.testing.assert_array_equal(kmeans_domains(a.latent, 2, 7), kmeans_domains(b.latent, 2, 7))


def test_another_seed_gives_another_embedding(slide):
    assert not np.array_equal(run(slide, cfg(), 1).latent, run(slide, cfg(), 2).latent)


def test_the_decoder_block_size_changes_neither_the_loss_nor_the_training(slide):
    """Blocks are a memory device: BatchNorm sees every spot, so the loss and the trained model are
    the same up to floating-point summation order (120 spots in one block, or in blocks of 7)."""
    whole = run(slide, cfg(epochs=3, decoder_batch=120), 3)
    blocks = run(slide, cfg(epochs=3, decoder_batch=7), 3)
    np.testing.assert_allclose(whole.history["zinb"], blocks.history["zinb"], rtol=1e-6)
    np.testing.assert_allclose(whole.latent, blocks.latent, rtol=1e-4, atol=1e-5)


def test_w_o_llm_needs_no_embedding_and_a_semantic_fusion_needs_one(slide):
    c = cfg(fusion="none")
    r = train_semst(slide["features"], slide["counts"], slide["size_factors"], slide["spatial"],
                    slide["expression"], None, c.model, c.loss, c.train, 0, progress=False)
    assert r.latent.shape == (120, 8)
    with pytest.raises(ValueError, match="needs semantic embeddings"):
        run(dict(slide, semantic=None), cfg(), 0)


_TRAIN_IN_A_FRESH_PROCESS = """
import hashlib, sys
import numpy as np, scipy.sparse as sp
sys.path[:0] = [{here!r}, {tests!r}]
from test_train import slide, cfg, run
s = slide.__wrapped__()
print(hashlib.sha256(run(s, cfg(epochs=2, hidden1=256, hidden2=128), 5).latent.tobytes()).hexdigest())
"""


def test_the_same_seed_gives_the_same_embedding_in_another_process(slide):
    # Within one process some CPU kernels repeat themselves; across processes only deterministic
    # algorithms do (measured: scatter-add in the spatial loss's backward differed at 1e-6).
    import subprocess
    import sys
    from pathlib import Path

    code = _TRAIN_IN_A_FRESH_PROCESS.format(here=str(Path(__file__).resolve().parent),
                                            tests=str(Path(__file__).resolve().parents[1]))
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip() for _ in range(2)}
    assert len(digests) == 1, digests


def test_sparse_input_trains_the_same_model_as_dense_input(slide, monkeypatch):
    """Below SPARSE_INPUT_DENSITY the first layer multiplies a CSR matrix: the same numbers (its
    transpose, for the weight gradient, in three blocks of spots here)."""
    sparse_features = np.where(np.random.default_rng(1).random(slide["features"].shape) < 0.9, 0.0,
                               slide["features"]).astype(np.float32)
    s = {**slide, "features": sparse_features}
    dense = run(s, cfg(epochs=3), 4)
    monkeypatch.setattr("semst.cluster.train.SPARSE_INPUT_DENSITY", 0.5)
    monkeypatch.setattr("semst.cluster.network.TRANSPOSE_BLOCK_SPOTS", 50)
    sparse = run(s, cfg(epochs=3), 4)
    assert "sparse input" in sparse.mode and "sparse" not in dense.mode
    np.testing.assert_allclose(sparse.latent, dense.latent, rtol=1e-3, atol=2e-4)  # summation order only


@pytest.mark.parametrize("settings", [dict(), dict(fusion="none", gcn_norm="right", batch_spots=50),
                                      dict(spatial_loss="all-pairs", cr_similarity="cosine", fsm_mode="paper")])
def test_a_mini_batch_epoch_is_the_full_batch_epoch(slide, settings):
    """Mini-batch mode computes full batch's epoch in blocks (here 3 of 40 spots, or 50 + 50 + 20):
    the graph convolutions on the whole slide, differentiated by hand, the per-spot layers block by
    block, BatchNorm on the slide's statistics with its gradient through them, L_cr and L_s on the
    whole slide with the same negatives. Five epochs follow full batch's losses and end at its
    latent, up to floating-point summation order."""
    settings = {"batch_spots": 40, **settings}
    full = run(slide, cfg(epochs=5, **{k: v for k, v in settings.items() if k != "batch_spots"}), 5)
    blocks = run(slide, cfg(epochs=5, minibatch="on", **settings), 5)
    assert blocks.mode == f"mini-batch ({-(-120 // settings['batch_spots'])} blocks of <= {settings['batch_spots']} spots)"
    for key in full.history:
        np.testing.assert_allclose(blocks.history[key], full.history[key], rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(blocks.latent, full.latent, rtol=1e-4, atol=1e-5)


def test_a_mini_batch_epoch_with_sparse_input_is_the_full_batch_epoch(slide, monkeypatch):
    """The first layers' weight gradient from the CSR input (input^T times dL/d(input W))."""
    monkeypatch.setattr("semst.cluster.train.SPARSE_INPUT_DENSITY", 1.0)
    full = run(slide, cfg(epochs=3), 2)
    blocks = run(slide, cfg(epochs=3, minibatch="on", batch_spots=40), 2)
    assert "sparse input" in blocks.mode
    np.testing.assert_allclose(blocks.history["total"], full.history["total"], rtol=2e-5)
    np.testing.assert_allclose(blocks.latent, full.latent, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["both", "right"])
def test_the_normalised_adjacency_is_graphconvs_and_its_transpose_is_the_adjoint(slide, norm):
    from semst.cluster.blockwise import NormalisedAdjacency
    from semst.cluster.dgl_compat import dglnn

    graph = slide["expression"]  # a kNN graph: directed, so the transpose is not the matrix itself
    adjacency = NormalisedAdjacency(graph, norm)
    h, g = torch.randn(120, 6, dtype=torch.float32), torch.randn(120, 6, dtype=torch.float32)
    conv = dglnn.GraphConv(6, 6, norm=norm, weight=False, bias=False)
    torch.testing.assert_close(adjacency.apply(h), conv(graph, h))
    torch.testing.assert_close((adjacency.apply(h) * g).sum(), (h * adjacency.apply_transposed(g)).sum())


def test_mini_batch_with_dropout_trains_and_repeats_per_seed(slide):
    """With dropout each block's per-spot masks come from one seed per block and epoch, so its passes
    agree; the same seed gives the same run."""
    c = cfg(epochs=4, dropout=0.2, minibatch="on", batch_spots=40)
    a, b = run(slide, c, 3), run(slide, c, 3)
    np.testing.assert_array_equal(a.latent, b.latent)
    assert np.isfinite(a.history["total"]).all() and a.history["total"][-1] < a.history["total"][0]


@pytest.mark.parametrize("settings, mini", [({"minibatch": "auto", "minibatch_above": 119}, True),
                                            ({"minibatch": "auto", "minibatch_above": 120}, False),
                                            ({"minibatch": "off", "minibatch_above": 1}, False),
                                            ({"minibatch": "on", "batch_spots": 119}, True)])
def test_mini_batch_mode_is_chosen_by_size_unless_forced(settings, mini):
    assert resolve_minibatch(cfg(**{"batch_spots": 60, **settings}).train, 120) is mini


def test_a_forced_mini_batch_as_large_as_the_slide_is_refused():
    with pytest.raises(ValueError, match="batch_spots = 120 but the slide has only 120 spots"):
        resolve_minibatch(cfg(minibatch="on", batch_spots=120).train, 120)
