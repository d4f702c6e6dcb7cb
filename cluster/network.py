"""The SemST network: two GCN views of the expression, modulated by each spot's LLM embedding.

    Z_s = GCN_spatial(X),  Z_f = GCN_expression(X)          two 2-layer DGL GraphConv branches
    Z_gcn = [Z_s, Z_f]                                        (n, 2 * hidden2)
    s = P(e)                                                  the LLM embedding e projected to hidden2
    alpha, beta = split(M(s))                                 FSM: per-spot scale and shift (FiLM)
    Z_final = W(((1 + alpha) * Z_gcn + beta))                 W: MLP to hidden2
    pi, theta, mu = ZINB decoder(Z_final)

This follows the paper's description and the authors' code (LLMHead P: d -> d/2 -> hidden2;
modulation MLP M: hidden2 -> ratio * hidden2 -> 4 * hidden2; W: 2 * hidden2 -> hidden1 -> hidden2;
ZINB decoder as in Spatial-MGCN). The fusions (the FSM and the paper's ablations) are registered in
:mod:`semst.cluster.fusion`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semst.cluster.dgl_compat import dglnn
from semst.cluster.fusion import fusion_class
from semst.shared.config import ModelConfig

_MODEL = ModelConfig()  # the network's defaults

# Measured (one and two threads, 3639 and 100k spots x 3000 genes, random sparsity, the first layer's
# product + weight gradient): CSR is ~3x faster than the dense GEMM at 5% non-zeros, 1.3-2x at 10%,
# level at 15% and slower above; on the real dlpfc-151673 input (15%) neither wins consistently.
SPARSE_INPUT_DENSITY = 0.10
# Spots per block of the transposed CSR in the weight gradient: the dense (spots x 512) gradient
# block a block's product reads stays in cache (4096 x 512 floats = 8 MB). At 100k spots x 3000
# genes, 7% non-zeros, two threads: one transposed matrix 8.2 s, blocks of 4096 spots 0.73 s,
# 16384 spots 1.7 s (the dense GEMM: 1.7 s).
TRANSPOSE_BLOCK_SPOTS = 4096


class _CSRMatmul(torch.autograd.Function):
    """``csr @ weight`` with the gradient for ``weight`` only (the data is constant)."""

    @staticmethod
    def forward(ctx, weight, features):
        ctx.features = features
        return torch.sparse.mm(features.csr, weight)

    @staticmethod
    def backward(ctx, grad):
        return ctx.features.transposed_matmul(grad), None


class SparseFeatures:
    """The preprocessed expression kept CSR (and its transpose, for the backward) when it is mostly
    zeros (the network's input is scaled without centring, so zeros stay zeros); see
    ``SPARSE_INPUT_DENSITY``. The transpose is kept in blocks of ``TRANSPOSE_BLOCK_SPOTS`` spots (one
    block, the whole transpose, on slides up to that size)."""

    def __init__(self, matrix):
        import numpy as np
        import scipy.sparse as sp

        csr = sp.csr_matrix(matrix, dtype=np.float32)
        self.shape = csr.shape
        self.csr = _torch_csr(csr)
        step = TRANSPOSE_BLOCK_SPOTS
        self.transposed_blocks = [(start, _torch_csr(csr[start:start + step].T.tocsr()))
                                  for start in range(0, csr.shape[0], step)]

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        return _CSRMatmul.apply(weight, self)

    def transposed_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        """``csr.T @ grad`` (dL/dweight from dL/d(csr @ weight)), block by block of spots."""
        (_, first), *rest = self.transposed_blocks
        out = torch.sparse.mm(first, grad[:first.shape[1]])
        for start, block in rest:  # each block covers the spots start .. start + its width
            torch.addmm(out, block, grad[start:start + block.shape[1]], out=out)
        return out


def _torch_csr(csr):
    import numpy as np

    return torch.sparse_csr_tensor(torch.from_numpy(csr.indptr.astype(np.int64)),
                                   torch.from_numpy(csr.indices.astype(np.int64)),
                                   torch.from_numpy(csr.data), size=csr.shape, check_invariants=False)


class GCNBranch(nn.Module):
    """Two GCN layers (DGL GraphConv; graphs carry self-loops), ReLU between.

    ``norm``: "both" = D^-1/2 (A+I) D^-1/2 (DGL's symmetric normalisation), "right" = D^-1 (A+I)
    (row-normalised: the mean over the spot and its neighbours, the authors' train.py lines 38-41).
    ``init``: "xavier" = as GraphConv initialises (Xavier uniform, zero bias); "uniform" = the
    authors' GraphConvolution (models.py lines 39-43): weight and bias ~ U(-1/sqrt(out), 1/sqrt(out)).

    The first layer's weight is kept here rather than in its GraphConv so that both branches, which
    read the same input, multiply it in one GEMM (:meth:`SemST.encode`); the GraphConv then only
    aggregates (DGL multiplies before aggregating whenever the input is wider than the output, so
    this is the same computation).
    """

    def __init__(self, in_dim: int, hidden1: int, hidden2: int, dropout: float, norm: str = "both",
                 init: str = "xavier"):
        super().__init__()
        if norm not in ("both", "right"):
            raise ValueError(f"GCN norm must be 'both' or 'right', got {norm!r}")
        if init not in ("xavier", "uniform"):
            raise ValueError(f"GCN init must be 'xavier' or 'uniform', got {init!r}")
        self.weight1 = nn.Parameter(torch.empty(in_dim, hidden1))
        nn.init.xavier_uniform_(self.weight1)
        self.conv1 = dglnn.GraphConv(hidden1, hidden1, norm=norm, weight=False, allow_zero_in_degree=False)
        self.conv2 = dglnn.GraphConv(hidden1, hidden2, norm=norm, allow_zero_in_degree=False)
        self.dropout = nn.Dropout(dropout)
        if init == "uniform":
            for weight, bias in ((self.weight1, self.conv1.bias), (self.conv2.weight, self.conv2.bias)):
                bound = 1.0 / float(weight.shape[1]) ** 0.5
                nn.init.uniform_(weight, -bound, bound)
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, graph, x, xw=None):
        """``xw``: ``x @ weight1`` when the caller has computed it already."""
        h = F.relu(self.conv1(graph, x @ self.weight1 if xw is None else xw))
        return self.conv2(graph, self.dropout(h))


class SemanticProjection(nn.Module):
    """P: the LLM embedding (d) -> hidden2, through a d/2 hidden layer (the authors' LLMHead)."""

    def __init__(self, emb_dim: int, out_dim: int):
        super().__init__()
        hidden = max(1, emb_dim // 2)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, e):
        return self.mlp(e)


class ZINBDecoder(nn.Module):
    """Z_final -> (pi, theta, mu) per gene: dropout probability, dispersion, mean (before size factor)."""

    def __init__(self, hidden2: int, hidden1: int, n_genes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(hidden2, hidden1), nn.BatchNorm1d(hidden1), nn.ReLU())
        self.pi = nn.Linear(hidden1, n_genes)
        self.disp = nn.Linear(hidden1, n_genes)
        self.mean = nn.Linear(hidden1, n_genes)

    def normalise(self, linear, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The body after its Linear, with BatchNorm normalising by given statistics of ``linear``
        (mini-batch training: the whole slide's, :mod:`semst.cluster.blockwise`) instead of those of
        its rows; on the whole slide's own statistics it is the body in training mode, row for row.
        No gradient flows into ``mean`` and ``var`` here: mini-batch training adds that part
        afterwards."""
        bn = self.body[1]
        return F.relu(F.batch_norm(linear, mean, var, bn.weight, bn.bias, training=False, eps=bn.eps))

    def heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The three heads as one (3 * genes, hidden1) weight and bias: dropout, dispersion, mean."""
        weight = torch.cat([self.pi.weight, self.disp.weight, self.mean.weight])
        bias = torch.cat([self.pi.bias, self.disp.bias, self.mean.bias])
        return weight, bias

    def forward(self, z):
        h = self.body(z)
        pi = torch.sigmoid(self.pi(h))
        disp = torch.clamp(F.softplus(self.disp(h)), 1e-4, 1e4)
        mean = torch.clamp(torch.exp(self.mean(h)), 1e-5, 1e6)
        return pi, disp, mean


class SemST(nn.Module):
    """The full network; ``fusion`` names a registered fusion (:mod:`semst.cluster.fusion`): film |
    concat | add | cross-attention | none, or one of the user's own."""

    # The defaults are the config's (ModelConfig): one source, so SemST(...) is the network `semst cluster` trains.
    def __init__(self, n_genes: int, emb_dim: int | None, hidden1: int = _MODEL.hidden1, hidden2: int = _MODEL.hidden2,
                 dropout: float = _MODEL.dropout, fusion: str = _MODEL.fusion,
                 fsm_hidden_ratio: float = _MODEL.fsm_hidden_ratio, fsm_mode: str = _MODEL.fsm_mode,
                 gcn_norm: str = _MODEL.gcn_norm, gcn_init: str = _MODEL.gcn_init):
        super().__init__()
        fusion_cls = fusion_class(fusion)
        if fusion_cls.uses_semantic and not emb_dim:
            raise ValueError(f"fusion {fusion!r} needs a semantic embedding (emb_dim)")
        self.fusion = fusion
        width = 2 * hidden2
        self.spatial = GCNBranch(n_genes, hidden1, hidden2, dropout, gcn_norm, gcn_init)
        self.expression = GCNBranch(n_genes, hidden1, hidden2, dropout, gcn_norm, gcn_init)
        # Created in this order (projection, fusion, W, decoder) so a seed initialises the same weights.
        self.project = SemanticProjection(emb_dim, hidden2) if fusion_cls.uses_semantic else None
        self.fuse = fusion_cls(width, hidden2, fsm_hidden_ratio=fsm_hidden_ratio, dropout=dropout, fsm_mode=fsm_mode)
        self.W = nn.Sequential(nn.Linear(self.fuse.output_width, hidden1), nn.ReLU(), nn.Dropout(dropout),
                               nn.Linear(hidden1, hidden2))
        self.decoder = ZINBDecoder(hidden2, hidden1, n_genes)

    @classmethod
    def from_config(cls, n_genes: int, emb_dim: int | None, model_cfg: ModelConfig) -> SemST:
        """The network of a config's [cluster.model] section."""
        return cls(n_genes, emb_dim, model_cfg.hidden1, model_cfg.hidden2, model_cfg.dropout, model_cfg.fusion,
                   model_cfg.fsm_hidden_ratio, model_cfg.fsm_mode, model_cfg.gcn_norm, model_cfg.gcn_init)

    def fuse_views(self, z_gcn, semantic):
        return self.fuse(z_gcn, None if self.project is None else self.project(semantic))

    def branch_widths(self) -> list[int]:
        """The two branches' first-layer widths, spatial then expression."""
        return [self.spatial.weight1.shape[1], self.expression.weight1.shape[1]]

    def input_products(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """``x @ weight1`` of both branches (spatial, expression), multiplied in one GEMM."""
        weight = torch.cat([self.spatial.weight1, self.expression.weight1], dim=1)
        xw = x.matmul(weight) if isinstance(x, SparseFeatures) else x @ weight
        return torch.split(xw, self.branch_widths(), dim=1)

    def encode(self, spatial_graph, expression_graph, x, semantic=None):
        """(Z_s, Z_f, Z_final). Both branches' first layers multiply ``x`` in one GEMM."""
        xw_s, xw_f = self.input_products(x)
        z_s = self.spatial(spatial_graph, x, xw_s)
        z_f = self.expression(expression_graph, x, xw_f)
        return z_s, z_f, self.combine(z_s, z_f, semantic)

    def combine(self, z_s, z_f, semantic=None):
        """Z_final from both views' outputs (and the semantic vectors): fusion, then W. Per spot."""
        return self.W(self.fuse_views(torch.cat([z_s, z_f], dim=1), semantic))
