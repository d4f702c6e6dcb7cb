"""Training SemST: full-graph GCN views, ZINB decoder in mini-batches of spots.

Memory stays linear in the number of spots: the graphs are sparse, negatives are sampled, the
correlation reduction is d x d, and the ZINB decoder (n x genes outputs) runs over ``decoder_batch``
spots at a time. Each decoder batch is back-propagated on its own into a detached copy of Z_final;
the accumulated gradient then flows once through the encoder, together with L_cr and L_s. This gives
exactly the gradient of the full loss without ever holding every batch's decoder activations.

No choice is made by looking at labels: the returned latent is Z_final after the last epoch
(evaluation mode, no dropout).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from semst.cluster.graphs import neighbour_pairs
from semst.cluster.losses import (correlation_reduction_loss, sample_negatives, spatial_regularisation_loss,
                            zinb_loss)
from semst.cluster.model import SemST


@dataclass
class TrainResult:
    latent: np.ndarray  # Z_final (n, hidden2), last epoch: what k-means clusters
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch: total, zinb, cr, spatial


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_torch():
    """Deterministic kernels while training, the previous setting restored afterwards.

    Seeding alone is not enough: measured on CPU (torch 2.13), the backward of the spatial loss
    differed at ~1e-6 between two processes with the same seed, and k-means turned that into
    different domains. ``torch.use_deterministic_algorithms`` removes the difference.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _dense_rows(counts, idx: np.ndarray) -> torch.Tensor:
    rows = counts[idx]
    rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    return torch.from_numpy(rows.astype(np.float32, copy=False))


def train_semst(features, counts, size_factors, spatial, expression, semantic, cfg, seed: int,
                progress: bool = True, model_factory=None) -> TrainResult:
    """Train SemST on one slide and return the last epoch's Z_final.

    features: (n, g) preprocessed expression; counts: (n, g) raw counts of the same genes (CSR ok);
    size_factors: (n,); spatial, expression: DGL graphs with self-loops; semantic: (n, d) or None
    (only with ``cfg.fusion == "none"``); cfg: ClusterConfig; seed: seeds weights, dropout, sampling.
    ``model_factory(n_genes, emb_dim) -> nn.Module`` swaps the backbone (plug-and-play experiments);
    the module must offer ``encode(sg, fg, x, semantic) -> (z1, z2, z_final)`` and ``decoder``.
    """
    with deterministic_torch():
        return _train_semst(features, counts, size_factors, spatial, expression, semantic, cfg, seed,
                            progress, model_factory)


def _train_semst(features, counts, size_factors, spatial, expression, semantic, cfg, seed, progress,
                 model_factory) -> TrainResult:
    from tqdm import tqdm

    if cfg.fusion != "none" and semantic is None:
        raise ValueError(f"fusion {cfg.fusion!r} needs semantic embeddings; use fusion 'none' without them")
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n, g = x.shape
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    sf = torch.from_numpy(np.asarray(size_factors, dtype=np.float32))
    sem = None
    if cfg.fusion != "none":
        sem = torch.from_numpy(np.ascontiguousarray(semantic, dtype=np.float32))
        if sem.shape[0] != n:
            raise ValueError(f"semantic embeddings have {sem.shape[0]} rows for {n} spots")
    emb_dim = None if sem is None else sem.shape[1]
    if model_factory is None:
        model = SemST(g, emb_dim, cfg.hidden1, cfg.hidden2, cfg.dropout, cfg.fusion, cfg.fsm_hidden_ratio)
    else:
        model = model_factory(g, emb_dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pos_src, pos_dst = neighbour_pairs(spatial)
    pos_src_t, pos_dst_t = torch.from_numpy(pos_src), torch.from_numpy(pos_dst)
    batch = max(2, int(cfg.decoder_batch))  # BatchNorm needs >= 2 spots per batch
    history: dict[str, list[float]] = {"total": [], "zinb": [], "cr": [], "spatial": []}

    bar = tqdm(range(cfg.epochs), desc="training", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        opt.zero_grad(set_to_none=True)
        z1, z2, z = model.encode(spatial, expression, x, sem)
        # ZINB over spot batches, each back-propagated into a detached copy of Z_final.
        z_leaf = z.detach().requires_grad_(True)
        order = rng.permutation(n)
        starts = list(range(0, n, batch))
        if len(starts) > 1 and n - starts[-1] < 2:  # never a 1-spot batch (BatchNorm)
            starts.pop()
        zinb_total = 0.0
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else n
            idx = np.sort(order[start:stop])
            pi, disp, mean = model.decoder(z_leaf[idx])
            loss_b = zinb_loss(_dense_rows(counts, idx), mean, disp, pi, sf[idx], reduce="sum") / (n * g)
            (cfg.zinb_weight * loss_b).backward()
            zinb_total += loss_b.item()
        neg_src, neg_dst = sample_negatives(n, pos_src, pos_dst, cfg.n_negatives, rng)
        l_cr = correlation_reduction_loss(z1, z2)
        l_s = (spatial_regularisation_loss(z, pos_src_t, pos_dst_t, torch.from_numpy(neg_src), torch.from_numpy(neg_dst))
               if len(pos_src) else z.sum() * 0.0)
        rest = cfg.gamma * l_cr + cfg.lambda_s * l_s
        torch.autograd.backward([z, rest], [z_leaf.grad, None])
        opt.step()
        total = cfg.zinb_weight * zinb_total + rest.item()
        for key, value in (("total", total), ("zinb", zinb_total), ("cr", l_cr.item()), ("spatial", l_s.item())):
            history[key].append(value)
        if not np.isfinite(total):
            raise FloatingPointError(f"training diverged (loss {total}) at epoch {len(history['total'])}")
        bar.set_postfix(loss=f"{total:.4f}")
    model.eval()
    with torch.no_grad():
        _, _, z = model.encode(spatial, expression, x, sem)
    return TrainResult(latent=z.numpy().astype(np.float32), history=history)
