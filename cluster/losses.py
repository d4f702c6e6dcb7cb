"""SemST's training losses, each with memory linear in the number of spots.

L = zinb_weight * L_zinb + gamma * L_cr + lambda_s * L_s
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-10


def zinb_loss(x, mean, disp, pi, scale_factor=None, reduce: str = "mean"):
    """Negative log-likelihood of counts ``x`` under ZINB(mu = mean * scale_factor, theta = disp, pi).

    The DCA / Spatial-MGCN formulation: for x > 0, -log((1 - pi) NB(x)); for x = 0,
    -log(pi + (1 - pi) (theta / (theta + mu))^theta).
    """
    if scale_factor is not None:
        mean = mean * scale_factor.reshape(-1, 1)
    t1 = torch.lgamma(disp + _EPS) + torch.lgamma(x + 1.0) - torch.lgamma(x + disp + _EPS)
    t2 = (disp + x) * torch.log1p(mean / (disp + _EPS)) + x * (torch.log(disp + _EPS) - torch.log(mean + _EPS))
    nb_case = t1 + t2 - torch.log(1.0 - pi + _EPS)
    zero_nb = torch.pow(disp / (disp + mean + _EPS), disp)
    zero_case = -torch.log(pi + (1.0 - pi) * zero_nb + _EPS)
    nll = torch.where(x <= 1e-8, zero_case, nb_case)
    return nll.mean() if reduce == "mean" else nll.sum()


def correlation_reduction_loss(z1, z2):
    """Feature-level correlation reduction between the two views (O(d^2), never N x N).

    Columns are standardised over spots; C = z1^T z2 / n is their cross-correlation. Matching
    features are pulled to correlation 1 (the views agree) and different features to 0 (the
    features are not redundant): mean_i (1 - C_ii)^2 + mean_{i != j} C_ij^2.
    """
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + 1e-6)
    b = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + 1e-6)
    c = a.T @ b / n
    on = torch.diagonal(c)
    off_sum = (c ** 2).sum() - (on ** 2).sum()
    return ((1.0 - on) ** 2).mean() + (off_sum / (d * (d - 1)) if d > 1 else 0.0)


def spatial_regularisation_loss(z, pos_src, pos_dst, neg_src, neg_dst):
    """Spatial neighbours similar, sampled non-neighbours dissimilar.

    With p = sigmoid(cosine(z_i, z_j)): -(mean over neighbour pairs of log p + mean over sampled
    non-neighbour pairs of log(1 - p)) / 2. The authors' version averages over all N^2 pairs; here
    negatives are sampled so memory stays linear.
    """
    zn = F.normalize(z, dim=1)
    pos = torch.sigmoid((zn[pos_src] * zn[pos_dst]).sum(1))
    neg = torch.sigmoid((zn[neg_src] * zn[neg_dst]).sum(1))
    return -(torch.log(pos + _EPS).mean() + torch.log(1.0 - neg + _EPS).mean()) / 2.0


def sample_negatives(n_nodes: int, pos_src: np.ndarray, pos_dst: np.ndarray, n_per_node: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_node`` random partners per spot that are neither itself nor a spatial neighbour."""
    neighbour_keys = np.unique(pos_src.astype(np.int64) * n_nodes + pos_dst.astype(np.int64))
    src = np.repeat(np.arange(n_nodes, dtype=np.int64), n_per_node)
    dst = rng.integers(0, n_nodes, size=len(src), dtype=np.int64)

    def collides(s, d):
        return (s == d) | np.isin(s * n_nodes + d, neighbour_keys, assume_unique=False)

    bad = collides(src, dst)
    for _ in range(20):  # a spot has few neighbours among many spots: collisions vanish quickly
        if not bad.any():
            break
        dst[bad] = rng.integers(0, n_nodes, size=int(bad.sum()), dtype=np.int64)
        bad = collides(src, dst)
    keep = ~bad
    return src[keep], dst[keep]
