"""The fused ZINB loss and gradient are those of the decoder's activations + zinb_loss under autograd."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from semst.cluster import zinb
from semst.cluster.losses import zinb_loss
from semst.cluster.zinb import SMALL_COUNT, SparseCounts, block_rows, zinb_nll_and_grad


def reference(logits: torch.Tensor, counts: np.ndarray, sf: torch.Tensor, ridge: float = 0.0):
    """Autograd (float64) through ZINBDecoder's activations and clamps, then zinb_loss summed."""
    g = counts.shape[1]
    raw = logits.detach().double().requires_grad_(True)
    a, b, c = raw[:, :g], raw[:, g:2 * g], raw[:, 2 * g:]
    pi = torch.sigmoid(a)
    disp = torch.clamp(F.softplus(b), 1e-4, 1e4)
    mean = torch.clamp(torch.exp(c), 1e-5, 1e6)
    loss = zinb_loss(torch.from_numpy(counts).double(), mean, disp, pi, sf.double(), reduce="sum", ridge=ridge)
    loss.backward()
    return loss.item(), raw.grad


@pytest.fixture
def block():
    rng = np.random.default_rng(0)
    m, g = 40, 25
    counts = (rng.negative_binomial(1, 0.5, size=(m, g)) * (rng.random((m, g)) < 0.3)).astype(np.float32)
    logits = rng.normal(0, 2, size=(m, 3 * g)).astype(np.float32)
    # every clamp and threshold: softplus linear above 20, theta below 1e-4, mu below 1e-5 and above 1e6
    logits[0, g:g + 3], logits[1, g:g + 3] = 25.0, -12.0
    logits[2, 2 * g:2 * g + 3], logits[3, 2 * g:2 * g + 3] = -13.0, 14.5
    return torch.from_numpy(logits), counts, torch.from_numpy(rng.uniform(0.5, 2, m).astype(np.float32))


def test_loss_and_gradient_equal_autograd_through_the_decoder_activations(block):
    logits, counts, sf = block
    loss, grad = zinb_nll_and_grad(logits, SparseCounts(counts).block(0, len(counts)), sf)
    want_loss, want_grad = reference(logits, counts, sf)
    assert loss == pytest.approx(want_loss, rel=1e-7)
    np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=1e-4, atol=1e-6)


def test_the_papers_target_scaled_matrix_scale_factor_1_and_ridge_equals_autograd(block):
    """The paper recipe: the ZINB reconstructs the scaled matrix (continuous values, clipped at 10,
    zero where the counts are zero) with scale factor 1 and 0.05 * pi^2 added to every entry."""
    logits, counts, _ = block
    rng = np.random.default_rng(1)
    scaled = np.where(counts > 0, np.minimum(counts * rng.uniform(0.3, 2.5, counts.shape), 10.0), 0.0).astype(np.float32)
    ones = torch.ones(len(counts))
    loss, grad = zinb_nll_and_grad(logits, SparseCounts(scaled).block(0, len(scaled)), ones, ridge=0.05)
    want_loss, want_grad = reference(logits, scaled, ones, ridge=0.05)
    assert loss == pytest.approx(want_loss, rel=1e-7)
    np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=1e-4, atol=1e-6)
    no_ridge, _ = zinb_nll_and_grad(logits, SparseCounts(scaled).block(0, len(scaled)), ones)
    assert loss - no_ridge == pytest.approx(0.05 * float((torch.sigmoid(logits[:, :25].double()) ** 2).sum()), rel=1e-6)


def test_blocks_of_rows_add_up_to_the_whole(block):
    """Equal up to float rounding: a compiled loop's vector body and its tail may round one entry
    differently (measured: 1 entry in 3000 by one ulp)."""
    logits, counts, sf = block
    sc = SparseCounts(counts)
    whole, grad = zinb_nll_and_grad(logits, sc.block(0, 40), sf)
    parts = [zinb_nll_and_grad(logits[s:s + 7], sc.block(s, min(40, s + 7)), sf[s:s + 7]) for s in range(0, 40, 7)]
    assert sum(p[0] for p in parts) == pytest.approx(whole, rel=1e-9)
    np.testing.assert_allclose(torch.cat([p[1] for p in parts]).numpy(), grad.numpy(), rtol=1e-6, atol=1e-12)


def test_sparse_counts_split_small_integer_counts_from_the_rest_with_their_log_factorial():
    counts = sp.csr_matrix(np.array([[0, 3, 0], [1, 0, 0], [0, 0, 0], [2, 5, 2.5]], dtype=np.float32))
    block = SparseCounts(counts).block(1, 4)  # rows 1..3; logits are 3 x 3 = 9 wide
    assert block.small.logit_index.tolist() == [0, 18] and block.small.row.tolist() == [0, 2]
    assert block.small.x.tolist() == [1, 2]
    assert block.large.logit_index.tolist() == [19, 20] and block.large.row.tolist() == [2, 2]
    assert block.large.x.tolist() == [5, 2.5]  # above SMALL_COUNT, or not an integer
    np.testing.assert_allclose(block.small.lgamma_x1.numpy(), np.log([1, 2]))
    np.testing.assert_allclose(block.large.lgamma_x1.numpy(), [np.log(120), 1.2009736023470743])


def test_counts_above_the_small_count_limit_take_the_lgamma_path_with_the_same_result():
    """Every count is large (>= 5) here, so the sums of logs are never used; and the same counts
    shifted into 1..4 take only the sums: both equal autograd."""
    rng = np.random.default_rng(3)
    m, g = 12, 9
    logits = torch.from_numpy(rng.normal(0, 2, size=(m, 3 * g)).astype(np.float32))
    sf = torch.ones(m)
    for counts in (rng.integers(5, 40, size=(m, g)), rng.integers(1, SMALL_COUNT + 1, size=(m, g))):
        counts = counts.astype(np.float32)
        loss, grad = zinb_nll_and_grad(logits, SparseCounts(counts).block(0, m), sf)
        want_loss, want_grad = reference(logits, counts, sf)
        assert loss == pytest.approx(want_loss, rel=1e-7)
        np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=1e-4, atol=1e-6)


def test_a_block_holds_about_a_million_entries_and_at_least_two_spots():
    assert block_rows(3000) == 349 and block_rows(500) == 2097 and block_rows(10**7) == 2


def test_uncompiled_kernels_give_the_compiled_numbers(block, monkeypatch):
    logits, counts, sf = block
    compiled = zinb_nll_and_grad(logits, SparseCounts(counts).block(0, 40), sf, ridge=0.05)
    monkeypatch.setattr(zinb, "_kernels", {})
    monkeypatch.setenv("SEMST_COMPILE", "0")
    eager = zinb_nll_and_grad(logits, SparseCounts(counts).block(0, 40), sf, ridge=0.05)
    assert all(fn is getattr(zinb, name) for (name, _), fn in zinb._kernels.items())  # nothing compiled
    assert eager[0] == pytest.approx(compiled[0], rel=1e-9)
    # float32 rounding differs between fused and separate ops (measured: <= 9e-8 absolute)
    np.testing.assert_allclose(eager[1].numpy(), compiled[1].numpy(), rtol=1e-5, atol=1e-7)


def test_a_kernel_that_cannot_compile_warns_and_runs_uncompiled(block, monkeypatch):
    logits, counts, sf = block

    def no_compiler(fn, **_):
        def fails(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fails

    monkeypatch.setattr(zinb, "_kernels", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(RuntimeWarning, match="running it uncompiled"):
        loss, grad = zinb_nll_and_grad(logits, SparseCounts(counts).block(0, 40), sf)
    want_loss, want_grad = reference(logits, counts, sf)
    assert loss == pytest.approx(want_loss, rel=1e-7)
    np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=1e-4, atol=1e-6)


def _heads_and_zinb_under(threads: int):
    """The decoder heads + ZINB over 7 blocks of 6 spots under a budget of ``threads``."""
    from types import SimpleNamespace

    from semst.cluster.train import _Clock, _heads_and_zinb

    rng = np.random.default_rng(1)
    m, g, hidden = 40, 25, 8
    counts = (rng.negative_binomial(1, 0.5, size=(m, g)) * (rng.random((m, g)) < 0.3)).astype(np.float32)
    h = torch.from_numpy(rng.normal(size=(m, hidden)).astype(np.float32))
    weight = torch.from_numpy(rng.normal(0, 0.3, size=(3 * g, hidden)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(0, 0.1, size=3 * g).astype(np.float32))
    sf = torch.from_numpy(rng.uniform(0.5, 2, m).astype(np.float32))
    cfg = SimpleNamespace(zinb_weight=1.0, zinb_ridge=0.0)
    grad_h = torch.empty(m, hidden)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # as a run's thread budget does before training
    try:
        loss, grad_w, grad_b = _heads_and_zinb(h, weight, bias, SparseCounts(counts), sf, 0, g, 6, cfg, grad_h,
                                               _Clock(), threads)
    finally:
        torch.set_num_threads(before)
    return loss, grad_w, grad_b, grad_h


def test_two_threads_give_the_one_thread_loss_and_gradients():
    one = _heads_and_zinb_under(1)
    two = _heads_and_zinb_under(2)
    assert two[0] == pytest.approx(one[0], rel=1e-6)
    for a, b in zip(one[1:], two[1:]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_two_threads_give_the_same_bits_every_time():
    first, again = _heads_and_zinb_under(2), _heads_and_zinb_under(2)
    assert first[0] == again[0]
    assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:]))
