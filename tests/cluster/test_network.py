"""The SemST network: the FSM modulates, the ablations run, the shim is the only DGL import."""
import sys

import numpy as np
import pytest
import torch

from semst.cluster.dgl_compat import dgl
from semst.cluster.fusion import FSM, fsm_modulate
from semst.cluster.graphs import expression_graph, spatial_graph
from semst.cluster.network import SemST, SparseFeatures, ZINBDecoder


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10, size=(30, 2))
    x = rng.normal(size=(30, 12)).astype(np.float32)
    return (spatial_graph(coords, k=3), expression_graph(x, 3), torch.from_numpy(x),
            torch.from_numpy(rng.normal(size=(30, 16)).astype(np.float32)))


def test_dgl_is_imported_through_the_shim_with_graphbolt_stubbed():
    assert getattr(sys.modules["dgl.graphbolt"], "__semst_stub__", False)
    g = dgl.add_self_loop(dgl.graph(([0, 1], [1, 2]), num_nodes=3))
    assert g.num_edges() == 5


def test_fsm_with_zero_alpha_and_beta_is_the_identity():
    z = torch.randn(5, 8)
    assert torch.equal(fsm_modulate(z, torch.zeros(5, 8), torch.zeros(5, 8)), z)
    fsm = FSM(width=8, sem_width=4, fsm_hidden_ratio=1.0)
    torch.nn.init.zeros_(fsm.mlp[-1].weight)
    torch.nn.init.zeros_(fsm.mlp[-1].bias)
    assert torch.equal(fsm(z, torch.randn(5, 4)), z)


def test_semst_with_a_zeroed_fsm_equals_the_plain_branches(tiny):
    sg, fg, x, sem = tiny
    torch.manual_seed(0)
    film = SemST(12, 16, hidden1=8, hidden2=4, fusion="film")
    torch.nn.init.zeros_(film.fuse.mlp[-1].weight)
    torch.nn.init.zeros_(film.fuse.mlp[-1].bias)
    plain = SemST(12, None, hidden1=8, hidden2=4, fusion="none")
    plain.load_state_dict({k: v for k, v in film.state_dict().items() if k in plain.state_dict()})
    assert torch.allclose(film.encode(sg, fg, x, sem)[2], plain.encode(sg, fg, x)[2])


@pytest.mark.parametrize("fusion", ["film", "concat", "add", "cross-attention", "none"])
def test_every_fusion_gives_one_hidden2_vector_per_spot(tiny, fusion):
    sg, fg, x, sem = tiny
    model = SemST(12, None if fusion == "none" else 16, hidden1=8, hidden2=4, fusion=fusion)
    z_s, z_f, z = model.encode(sg, fg, x, None if fusion == "none" else sem)
    assert z_s.shape == z_f.shape == z.shape == (30, 4)
    pi, disp, mean = model.decoder(z)
    assert pi.shape == disp.shape == mean.shape == (30, 12)


def test_a_semantic_fusion_without_an_embedding_is_refused():
    with pytest.raises(ValueError, match="needs a semantic embedding"):
        SemST(12, None, fusion="film")


def test_the_decoder_body_on_the_slides_own_statistics_is_the_body_in_training_mode_row_for_row():
    """Mini-batch training normalises each batch by the whole slide's statistics: a slice of rows
    then gets exactly the rows that the whole slide gets from BatchNorm in training mode."""
    torch.manual_seed(0)
    decoder = ZINBDecoder(8, 16, 5).train()
    z = torch.randn(50, 8)
    with torch.no_grad():
        linear = decoder.body[0](z)
        mean, var = linear.mean(0), linear.var(0, unbiased=False)
    whole = decoder.body(z)
    torch.testing.assert_close(decoder.normalise(linear[10:30], mean, var), whole[10:30])
    own = decoder.body(z[10:30])  # a slice's own statistics: not the same rows
    assert not torch.allclose(own, whole[10:30], atol=1e-3)


@pytest.mark.parametrize("block_spots", [7, 30, 64])
def test_the_sparse_inputs_product_and_weight_gradient_are_the_dense_ones(monkeypatch, block_spots):
    """CSR input: ``X @ W`` and dL/dW = X^T dL/d(XW), the transpose kept in blocks of spots (7: five
    blocks, the last of 2; 30 and 64: one block)."""
    monkeypatch.setattr("semst.cluster.network.TRANSPOSE_BLOCK_SPOTS", block_spots)
    rng = np.random.default_rng(0)
    x = np.where(rng.random((30, 20)) < 0.8, 0.0, rng.normal(size=(30, 20))).astype(np.float32)
    features = SparseFeatures(x)
    assert len(features.transposed_blocks) == -(-30 // block_spots)
    weight = torch.randn(20, 6, requires_grad=True)
    upstream = torch.randn(30, 6)
    product = features.matmul(weight)
    product.backward(upstream)
    np.testing.assert_allclose(product.detach().numpy(), x @ weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weight.grad.numpy(), x.T @ upstream.numpy(), rtol=1e-5, atol=1e-5)
