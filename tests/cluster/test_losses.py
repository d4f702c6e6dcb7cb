"""Each loss against a direct formula written independently here, on tiny inputs."""
import math

import numpy as np
import torch
from scipy.special import gammaln

from semst.cluster.losses import (
    correlation_reduction_loss,
    pair_keys,
    sample_negatives,
    spatial_regularisation_loss,
    zinb_loss,
)


def test_zinb_loss_is_the_zero_inflated_negative_binomial_nll():
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(5, 4)).astype(np.float64)
    x[0, :2] = 0
    mu = rng.uniform(0.5, 4.0, size=(5, 4))
    theta = rng.uniform(0.5, 3.0, size=(5, 4))
    pi = rng.uniform(0.05, 0.5, size=(5, 4))
    sf = rng.uniform(0.5, 2.0, size=5)
    m = mu * sf[:, None]
    log_nb = (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)
              + theta * np.log(theta / (theta + m)) + x * np.log(m / (theta + m)))
    nll = np.where(x == 0, -np.log(pi + (1 - pi) * (theta / (theta + m)) ** theta),
                   -(np.log(1 - pi) + log_nb))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = zinb_loss(t(x), t(mu), t(theta), t(pi), t(sf))
    assert math.isclose(float(got), nll.mean(), rel_tol=1e-6)


def test_correlation_reduction_is_zero_for_identical_decorrelated_views():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(64, 4))
    z = torch.tensor(q - q.mean(0), dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    # Whiten exactly so the cross-correlation is the identity.
    cov = (z.T @ z) / len(z)
    evals, evecs = torch.linalg.eigh(cov)
    white = z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    assert float(correlation_reduction_loss(white, white)) < 1e-8


def test_correlation_reduction_matches_the_formula():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    sa = (a - a.mean(0)) / (a.std(0) + 1e-6)
    sb = (b - b.mean(0)) / (b.std(0) + 1e-6)
    c = sa.T @ sb / 20
    off = c[~np.eye(3, dtype=bool)]
    expected = ((1 - np.diag(c)) ** 2).mean() + (off ** 2).mean()
    got = correlation_reduction_loss(torch.tensor(a), torch.tensor(b))
    assert math.isclose(float(got), expected, rel_tol=1e-6)


def test_spatial_regularisation_matches_the_formula():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(6, 3))
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    pos, neg = [(0, 1), (1, 0), (2, 3)], [(0, 4), (5, 2)]
    expected = -(np.mean([np.log(sig(zn[i] @ zn[j])) for i, j in pos])
                 + np.mean([np.log(1 - sig(zn[i] @ zn[j])) for i, j in neg])) / 2
    tt = lambda pairs, k: torch.tensor([p[k] for p in pairs])  # noqa: E731
    got = spatial_regularisation_loss(torch.tensor(z), tt(pos, 0), tt(pos, 1), tt(neg, 0), tt(neg, 1))
    assert math.isclose(float(got), expected, rel_tol=1e-6)


def test_sampled_negatives_are_never_self_or_a_neighbour():
    n = 50
    src = np.repeat(np.arange(n), 2)
    dst = np.concatenate([[(i + 1) % n, (i - 1) % n] for i in range(n)])
    s, d = sample_negatives(n, src, dst, 5, np.random.default_rng(0))
    assert len(s) == 5 * n
    neighbours = set(zip(src.tolist(), dst.tolist()))
    assert not any(a == b or (a, b) in neighbours for a, b in zip(s.tolist(), d.tolist()))


def test_spatial_regularisation_gradient_is_that_of_the_formula_under_autograd():
    rng = np.random.default_rng(5)
    z = torch.tensor(rng.normal(size=(30, 4)), requires_grad=True)
    pos = torch.tensor(rng.integers(0, 30, size=(2, 60)))
    neg = torch.tensor(rng.integers(0, 30, size=(2, 90)))
    spatial_regularisation_loss(z, pos[0], pos[1], neg[0], neg[1]).backward()
    reference = z.detach().clone().requires_grad_(True)
    zn = reference / reference.norm(dim=1, keepdim=True)
    sig = lambda a, b: torch.sigmoid((zn[a] * zn[b]).sum(1))  # noqa: E731
    loss = -(torch.log(sig(*pos) + 1e-10).mean() + torch.log(1 - sig(*neg) + 1e-10).mean()) / 2
    loss.backward()
    torch.testing.assert_close(z.grad, reference.grad, rtol=1e-10, atol=1e-12)


def test_negatives_drawn_with_kept_neighbour_keys_are_the_same_draws():
    n = 40
    src = np.repeat(np.arange(n), 3)
    dst = np.concatenate([[(i + 1) % n, (i - 1) % n, (i + 7) % n] for i in range(n)])
    fresh = sample_negatives(n, src, dst, 6, np.random.default_rng(3))
    kept = sample_negatives(n, src, dst, 6, np.random.default_rng(3), pair_keys(n, src, dst))
    assert all(np.array_equal(a, b) for a, b in zip(fresh, kept))
