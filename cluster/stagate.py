"""A second backbone for the plug-and-play experiment: a STAGATE-style graph-attention autoencoder.

STAGATE (Dong & Zhang 2022, Nat Commun 13:1739) learns a spot embedding by reconstructing the
expression through graph attention over the spatial neighbour graph::

    H1 = ELU(GAT_1(X))            attention over spatial neighbours, W1: genes -> 512
    Z  = H1 W2                    the 30-d embedding (a plain linear layer: no attention)
    H3 = ELU(GAT_3(Z))            W2^T and the *same* attention coefficients as GAT_1 (tied)
    X' = H3 W1^T                  reconstruction; loss = MSE(X, X')

trained with Adam (lr 1e-3, weight decay 1e-4, gradient clipping at 5) for 1000 epochs; the
embedding Z is then clustered. Here the encoder's attention layer is DGL's ``GATConv`` (one head,
no bias); the decoder reuses its weights transposed and its attention coefficients, as STAGATE's
does. Differences from the authors' code, each said where it matters: DGL's attention score is
``LeakyReLU(a_l.Wh_i + a_r.Wh_j)`` where STAGATE's is ``sigmoid(...)`` (both softmax-normalised
over neighbours); the tied weights share gradients from both paths (STAGATE copies the tensors);
the input is semst's preprocessed expression (``shared.preprocess``: HVG, library-size normalised,
scaled) rather than STAGATE's log-normalised HVGs; and domains come from the same seeded k-means as
every semst method (STAGATE used mclust), so the comparison isolates the network.

Plug-and-play (the paper's Table 3): with ``fsm=True`` the FSM of :mod:`semst.cluster.network` modulates
the embedding with the spot's semantic vector, ``Z' = (1 + alpha) * Z + beta`` with
``alpha, beta = FSM(P(e))``, before the decoder; Z' is what is clustered. Everything else is equal,
so before/after differ only by the FSM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semst.cluster.dgl_compat import dgl, dglnn
from semst.cluster.fusion import FSM
from semst.cluster.network import SemanticProjection
from semst.shared.errors import SemstError


class StagateError(SemstError, ValueError):
    """STAGATE cannot run as asked; the message says what to change."""


@dataclass
class StagateConfig:
    """STAGATE's own hyper-parameters (defaults: the authors' ``train_STAGATE``)."""

    hidden: int = 512
    latent: int = 30
    epochs: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    fsm_hidden_ratio: float = 1.2  # FSM MLP hidden width = ratio * latent, as SemST's

    def __post_init__(self):
        for name in ("hidden", "latent", "epochs"):
            if getattr(self, name) < 1:
                raise StagateError(f"stagate {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise StagateError(f"stagate lr and grad_clip must be > 0, got {self.lr}, {self.grad_clip}")


class STAGATE(nn.Module):
    """The autoencoder; ``emb_dim`` (the semantic vectors' width) switches the FSM on."""

    def __init__(self, n_genes: int, hidden: int = 512, latent: int = 30, emb_dim: int | None = None,
                 fsm_hidden_ratio: float = 1.2):
        super().__init__()
        # allow_zero_in_degree: semst's graphs carry self-loops, so no spot is without a neighbour
        self.gat1 = dglnn.GATConv(n_genes, hidden, num_heads=1, bias=False, allow_zero_in_degree=True)
        self.W2 = nn.Parameter(torch.empty(latent, hidden))
        nn.init.xavier_uniform_(self.W2)
        self.fsm = None
        if emb_dim:
            self.project = SemanticProjection(emb_dim, latent)
            self.fsm = FSM(latent, latent, fsm_hidden_ratio=fsm_hidden_ratio, dropout=0.0, fsm_mode="paper")

    def encode(self, graph, x, semantic=None):
        """(Z, attention of the first layer); Z is FSM-modulated when the FSM is on."""
        h1, attention = self.gat1(graph, x, get_attention=True)
        z = F.linear(F.elu(h1.squeeze(1)), self.W2)
        if self.fsm is not None:
            if semantic is None:
                raise StagateError("this STAGATE has an FSM: pass the semantic embeddings")
            z = self.fsm(z, self.project(semantic))
        return z, attention

    def decode(self, graph, z, attention):
        """X' = ELU(tied-attention propagation of Z W2) W1, the encoder's weights transposed."""
        h3 = torch.matmul(z, self.W2)  # latent -> hidden with W2^T (F.linear(z, W2^T))
        with graph.local_scope():
            graph.srcdata["h"] = h3
            graph.edata["a"] = attention.reshape(-1, 1)
            graph.update_all(dgl.function.u_mul_e("h", "a", "m"), dgl.function.sum("m", "h"))
            h3 = F.elu(graph.dstdata["h"])
        return torch.matmul(h3, self.gat1.fc.weight)  # hidden -> genes with W1^T

    def forward(self, graph, x, semantic=None):
        z, attention = self.encode(graph, x, semantic)
        return z, self.decode(graph, z, attention)


@dataclass
class StagateResult:
    latent: np.ndarray  # Z (or Z') after the last epoch, evaluation mode
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch: mse


def train_stagate(features, graph, semantic, cfg: StagateConfig, seed: int, progress: bool = False) -> StagateResult:
    """Train on one slide (features: (n, g) preprocessed expression; graph: spatial, with self-loops).

    ``semantic`` (n, d) turns the FSM on; ``None`` trains plain STAGATE. Returns the last epoch's
    embedding: nothing is selected by looking at labels.
    """
    from semst.cluster.train import deterministic_torch

    with deterministic_torch():
        return _train_stagate(features, graph, semantic, cfg, seed, progress)


def _train_stagate(features, graph, semantic, cfg: StagateConfig, seed: int, progress: bool) -> StagateResult:
    from tqdm import tqdm

    from semst.cluster.train import seed_everything

    seed_everything(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n, g = x.shape
    if graph.num_nodes() != n:
        raise StagateError(f"the graph has {graph.num_nodes()} nodes for {n} spots")
    sem = None
    if semantic is not None:
        sem = torch.from_numpy(np.ascontiguousarray(semantic, dtype=np.float32))
        if sem.shape[0] != n:
            raise StagateError(f"semantic embeddings have {sem.shape[0]} rows for {n} spots")
    model = STAGATE(g, cfg.hidden, cfg.latent, None if sem is None else sem.shape[1], cfg.fsm_hidden_ratio)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: dict[str, list[float]] = {"mse": []}
    for _ in tqdm(range(cfg.epochs), desc="STAGATE", unit="epoch", disable=not progress):
        model.train()
        opt.zero_grad(set_to_none=True)
        _, recon = model(graph, x, sem)
        loss = F.mse_loss(recon, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history["mse"].append(loss.item())
        if not np.isfinite(history["mse"][-1]):
            raise FloatingPointError(f"STAGATE diverged (loss {history['mse'][-1]}) at epoch {len(history['mse'])}")
    model.eval()
    with torch.no_grad():
        z, _ = model.encode(graph, x, sem)
    return StagateResult(latent=z.numpy().astype(np.float32), history=history)


def stagate_dataset(cfg, stagate: StagateConfig | None = None, adata=None, progress: bool = False,
                    log=print):
    """STAGATE (``cfg.fusion == "none"``) or STAGATE + FSM (``"film"``) on ``cfg.dataset``, every seed.

    Uses the dataset's preprocessing, spatial graph, number of domains and, with the FSM, the same
    semantic embeddings SemST would (``cfg.embedding``); returns a :class:`semst.cluster.seeds.ClusterReport`.
    The method itself is :class:`semst.cluster.methods.STAGATE`.
    """
    from semst.cluster.methods import run_method

    return run_method("stagate", cfg, stagate or StagateConfig(), adata=adata, progress=progress, log=log)
