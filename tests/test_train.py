"""Training: runs, is deterministic per seed, and never needs labels."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from semst.cluster.dgl_compat import dgl
from semst.cluster.domains import kmeans_domains
from semst.cluster.graphs import expression_graph, spatial_graph
from semst.cluster.train import bisect_spots, resolve_minibatch, train_semst
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
    base = dict(dataset="synthetic", spatial_k=4, hidden1=16, hidden2=8, epochs=4, decoder_batch=50)
    return ClusterConfig(**{**base, **kw})


def run(slide, c, seed):
    return train_semst(slide["features"], slide["counts"], slide["size_factors"], slide["spatial"],
                       slide["expression"], slide["semantic"], c, seed, progress=False)


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
                    slide["expression"], None, c, 0, progress=False)
    assert r.latent.shape == (120, 8)
    with pytest.raises(ValueError, match="needs semantic embeddings"):
        train_semst(slide["features"], slide["counts"], slide["size_factors"], slide["spatial"],
                    slide["expression"], None, cfg(), 0, progress=False)


_TRAIN_IN_A_FRESH_PROCESS = """
import hashlib, sys
import numpy as np, scipy.sparse as sp
sys.path.insert(0, {tests!r})
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

    code = _TRAIN_IN_A_FRESH_PROCESS.format(tests=str(Path(__file__).parent))
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parents[1]).stdout.strip() for _ in range(2)}
    assert len(digests) == 1, digests


def test_sparse_input_trains_the_same_model_as_dense_input(slide, monkeypatch):
    """Below SPARSE_INPUT_DENSITY the first layer multiplies a CSR matrix: the same numbers."""
    sparse_features = np.where(np.random.default_rng(1).random(slide["features"].shape) < 0.9, 0.0,
                               slide["features"]).astype(np.float32)
    s = {**slide, "features": sparse_features}
    dense = run(s, cfg(epochs=3), 4)
    monkeypatch.setattr("semst.cluster.train.SPARSE_INPUT_DENSITY", 0.5)
    sparse = run(s, cfg(epochs=3), 4)
    assert "sparse input" in sparse.mode and "sparse" not in dense.mode
    np.testing.assert_allclose(sparse.latent, dense.latent, rtol=1e-3, atol=2e-4)  # summation order only


def test_bisection_cuts_the_slide_into_compact_parts_of_at_most_the_batch_size():
    coords = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    parts = bisect_spots(coords, 40)
    assert sorted(np.concatenate(parts).tolist()) == list(range(120))
    assert [len(p) for p in parts] == [30, 30, 30, 30]
    for p in parts:  # each part is a rectangle of the grid: 6 x 5 spots
        assert np.ptp(coords[p, 0]) == 5 and np.ptp(coords[p, 1]) == 4


def test_mini_batch_returns_the_latent_of_each_spot_in_the_slide_order(slide):
    """With nothing learned (lr 0), mini-batch and full-batch training give the same latent: the
    batch order of the spots is undone."""
    coords = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    frozen = dict(epochs=1, lr=0.0, weight_decay=0.0)
    full = run(slide, cfg(**frozen), 5)
    batched = train_semst(slide["features"], slide["counts"], slide["size_factors"], slide["spatial"],
                          slide["expression"], slide["semantic"], cfg(**frozen, minibatch="on", batch_spots=40), 5,
                          progress=False, coords=coords)
    assert batched.mode.startswith("mini-batch (4 batches of <= 40 spots)") and full.mode == "full batch"
    np.testing.assert_allclose(batched.latent, full.latent, rtol=1e-5, atol=1e-6)


def test_a_mini_batch_epoch_is_the_full_batch_epoch_where_no_edge_joins_two_batches(slide):
    """Graphs without edges between the four batches (each batch's spatial edges, and its own
    expression kNN, as mini-batch training builds them) and only the ZINB loss: every batch is
    normalised by the whole slide's BatchNorm statistics, the batches' losses and gradients add up to
    the slide's (with the part of BatchNorm's gradient that flows through its statistics added after
    the batches), and the epoch is one Adam step: mini-batch training follows full batch, epoch by
    epoch."""
    coords = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    parts = bisect_spots(coords, 40)
    part_of = np.empty(120, dtype=np.int64)
    for i, p in enumerate(parts):
        part_of[p] = i
    src, dst = (t.numpy() for t in slide["spatial"].edges())
    spatial = dgl.remove_edges(slide["spatial"], torch.from_numpy(np.nonzero(part_of[src] != part_of[dst])[0]))
    edges = [(p[u.numpy()], p[v.numpy()]) for p in parts
             for u, v in [expression_graph(slide["features"][p], 5).edges()]]
    expression = dgl.graph((torch.from_numpy(np.concatenate([u for u, _ in edges])),
                            torch.from_numpy(np.concatenate([v for _, v in edges]))), num_nodes=120)
    args = (slide["features"], slide["counts"], slide["size_factors"], spatial, expression, slide["semantic"])
    only_zinb = dict(epochs=3, gamma=0.0, lambda_s=0.0, expr_k=5)
    full = train_semst(*args, cfg(**only_zinb), 5, progress=False)
    batched = train_semst(*args, cfg(**only_zinb, minibatch="on", batch_spots=40), 5, progress=False, coords=coords)
    assert batched.mode.startswith("mini-batch (4 batches")
    np.testing.assert_allclose(batched.history["zinb"], full.history["zinb"], rtol=1e-6)


def test_mini_batch_training_learns_with_finite_losses(slide):
    coords = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    r = train_semst(slide["features"], slide["counts"], slide["size_factors"], slide["spatial"],
                    slide["expression"], slide["semantic"], cfg(epochs=5, minibatch="on", batch_spots=60), 0,
                    progress=False, coords=coords)
    assert r.latent.shape == (120, 8) and all(np.isfinite(v).all() and len(v) == 5 for v in r.history.values())
    assert r.history["total"][-1] < r.history["total"][0]


@pytest.mark.parametrize("settings, mini", [({"minibatch": "auto", "minibatch_above": 119}, True),
                                            ({"minibatch": "auto", "minibatch_above": 120}, False),
                                            ({"minibatch": "off", "minibatch_above": 1}, False),
                                            ({"minibatch": "on", "batch_spots": 119}, True)])
def test_mini_batch_mode_is_chosen_by_size_unless_forced(settings, mini):
    assert resolve_minibatch(cfg(**{"batch_spots": 60, **settings}), 120) is mini


def test_a_forced_mini_batch_as_large_as_the_slide_is_refused():
    with pytest.raises(ValueError, match="batch_spots = 120 but the slide has only 120 spots"):
        resolve_minibatch(cfg(minibatch="on", batch_spots=120), 120)
