"""Training SemST: both GCN views, FSM fusion, and the ZINB decoder, full batch or in spatial batches.

One forward and backward (:func:`_forward_backward`) on a set of spots and their graphs:

1. encoder: Z_s, Z_f, Z_final (autograd);
2. decoder body (Linear -> BatchNorm -> ReLU), its BatchNorm always on the whole slide's statistics
   (full batch: every spot at once; mini-batch: see below), never on those of a slice;
3. decoder heads + ZINB loss over blocks of a few hundred spots (:mod:`semst.cluster.zinb`): each
   block's head GEMM, loss and analytic gradient, accumulated into the heads' gradients and into
   dL/dh; memory for the (spots x genes) outputs is one block, whatever the slide's size. This is
   exactly the gradient of the step's whole loss;
4. L_cr, L_s (negatives sampled among the step's spots), then one backward through body and
   encoder.

Every epoch is one Adam step, as in the paper. Full batch runs the above once on the whole slide.
Mini-batch mode, for slides larger than ``minibatch_above`` spots (or forced with
``minibatch = "on"``), cuts the slide into spatially compact batches of at most ``batch_spots`` spots
(recursive median bisection of the coordinates), each trained on its induced spatial subgraph and an
expression kNN graph searched among its spots (Cluster-GCN style: spatial edges between batches are
dropped). An epoch then (a) computes, without gradients, the mean and variance over the whole slide
of the decoder body's linear output (:func:`decoder_statistics`); (b) runs 1-4 on each batch with
BatchNorm normalising by those statistics and every loss weighted by the batch's share of the spots,
summing the gradients; (c) adds the part of BatchNorm's gradient that flows through the statistics
(:func:`batchnorm_correction`); (d) makes one Adam step. Cost: two more encoder forwards and one
more encoder backward per epoch than the batches alone. What still differs from full batch: the
graphs, and L_cr and L_s computed per batch. Why: on dlpfc-151673 (w/o LLM, 5 seeds) the earlier
scheme (one Adam step per batch, BatchNorm on each batch's own statistics) lost ~10 ARI points, and
full batch with only its BatchNorm split between two halves of the slide lost as much (41.5 +- 2.3),
while splitting the graphs or the correlation reduction in two did not (50.3, 51.7, 53.4); see the
README for the mode's figures. Memory is one batch plus the data. The returned latent is always
computed on the whole slide, full graphs, in evaluation mode.

No choice is made by looking at labels: the returned latent is Z_final after the last epoch.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from semst.cluster.dgl_compat import dgl
from semst.cluster.graphs import neighbour_pairs
from semst.cluster.losses import (all_pairs_spatial_loss, correlation_reduction_loss, pair_keys, sample_negatives,
                                  spatial_regularisation_loss)
from semst.cluster.model import SPARSE_INPUT_DENSITY, SemST, SparseFeatures
from semst.cluster.zinb import SparseCounts, block_rows, zinb_nll_and_grad
from semst.shared.threads import resolve_threads

PARTS = ("graphs", "statistics", "encoder", "decoder", "zinb", "cr", "spatial", "backward", "optimiser")


@dataclass
class TrainResult:
    latent: np.ndarray  # Z_final (n, hidden2), last epoch: what k-means clusters
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch: total, zinb, cr, spatial
    mode: str = "full batch"  # or "mini-batch (k batches of <= m spots)"
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per part of training, all epochs
    # Reported per seed (metrics.json per_seed): with fusion film, the FSM's relative change of Z_gcn
    # after the last epoch (film_change) and, with fsm_mode "gated", its gate (film_gate).
    report: dict[str, float] = field(default_factory=dict)


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


class _Clock:
    """Wall seconds per part of a step (time.perf_counter; CPU ops are synchronous)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.restart()

    def restart(self) -> None:
        self._t = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self._t
        self._t = now


@dataclass
class _Batch:
    """The spots of one step (rows start..stop of the run's order) and what a step reads of them."""

    start: int
    stop: int
    spatial: object  # DGL graph on these spots
    expression: object
    pos_src: np.ndarray  # spatial neighbour pairs, local indices
    pos_dst: np.ndarray
    neighbour_keys: np.ndarray  # pair_keys of the neighbour pairs, for negative sampling
    features: object = None  # SparseFeatures of these rows when the input is kept sparse


def bisect_spots(coords: np.ndarray, max_spots: int) -> list[np.ndarray]:
    """Spatially compact parts of at most ``max_spots`` spots: split the wider side at its median,
    recursively. Deterministic; parts differ in size by at most one spot per level."""
    parts, todo = [], [np.arange(len(coords))]
    while todo:
        idx = todo.pop()
        if len(idx) <= max_spots:
            parts.append(idx)
            continue
        pts = coords[idx]
        axis = int(np.argmax(pts.max(0) - pts.min(0)))
        order = idx[np.argsort(pts[:, axis], kind="stable")]
        half = len(order) // 2
        todo += [order[half:], order[:half]]
    return parts


def _batch(graph_s, graph_f, start: int, stop: int, whole: bool, features=None, cfg=None) -> _Batch:
    """A batch's graphs: the spatial graph's induced subgraph (a compact batch keeps nearly all its
    spatial edges) and the expression kNN graph searched again among the batch's spots, so every spot
    keeps k expression neighbours while training, as in the whole-slide graph it is inferred on."""
    if whole:
        sg, fg = graph_s, graph_f
    else:
        from semst.cluster.graphs import expression_graph

        sg = dgl.node_subgraph(graph_s, torch.arange(start, stop))
        fg = expression_graph(features[start:stop], min(cfg.expr_k, stop - start - 1), cfg.expr_pcs, cfg.expr_knn)
    ps, pd = neighbour_pairs(sg)
    return _Batch(start, stop, sg, fg, ps, pd, pair_keys(stop - start, ps, pd))


def resolve_minibatch(cfg, n_spots: int) -> bool:
    """Whether this slide trains in mini-batches: forced by ``minibatch`` "on"/"off", else above
    ``minibatch_above`` spots. A forced mini-batch larger than the slide is an error."""
    if cfg.minibatch == "on":
        if cfg.batch_spots >= n_spots:
            raise ValueError(f"minibatch = \"on\" with batch_spots = {cfg.batch_spots} but the slide has only "
                             f"{n_spots} spots: use a smaller batch_spots or minibatch = \"off\"")
        return True
    if cfg.minibatch == "off":
        return False
    return n_spots > cfg.minibatch_above and cfg.batch_spots < n_spots


def train_semst(features, counts, size_factors, spatial, expression, semantic, cfg, seed: int,
                progress: bool = True, coords=None) -> TrainResult:
    """Train SemST on one slide and return the last epoch's Z_final.

    features: (n, g) preprocessed expression; counts: (n, g) raw counts of the same genes (CSR ok);
    size_factors: (n,) (with ``cfg.zinb_target = "scaled"`` the ZINB reconstructs ``features`` with
    scale factor 1 instead, the authors' choice, and these two are not used); spatial, expression: DGL graphs with self-loops; semantic: (n, d) or None
    (only with ``cfg.fusion == "none"``); cfg: ClusterConfig; seed: seeds weights, dropout, sampling;
    coords: (n, 2) spot coordinates, needed only to cut mini-batches.
    """
    with deterministic_torch():
        return _train_semst(features, counts, size_factors, spatial, expression, semantic, cfg, seed,
                            progress, coords)


def _train_semst(features, counts, size_factors, spatial, expression, semantic, cfg, seed, progress,
                 coords) -> TrainResult:
    from tqdm import tqdm

    if cfg.fusion != "none" and semantic is None:
        raise ValueError(f"fusion {cfg.fusion!r} needs semantic embeddings; use fusion 'none' without them")
    clock = _Clock()
    n, g = np.shape(features)
    sem_np = None
    if cfg.fusion != "none":
        sem_np = np.ascontiguousarray(semantic, dtype=np.float32)
        if sem_np.shape[0] != n:
            raise ValueError(f"semantic embeddings have {sem_np.shape[0]} rows for {n} spots")
    minibatch = resolve_minibatch(cfg, n)
    if minibatch and coords is None:
        raise ValueError("mini-batch training needs the spot coordinates (coords=)")
    # Spots in batch order (identity for full batch), so every batch is a contiguous row range.
    parts = bisect_spots(np.asarray(coords, dtype=np.float64), cfg.batch_spots) if minibatch else [np.arange(n)]
    order = np.concatenate(parts)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    identity = not minibatch
    if cfg.zinb_target == "scaled":  # the authors' train.py line 53
        counts, size_factors = features, np.ones(n, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(features if identity else np.asarray(features)[order], dtype=np.float32))
    sparse_input = bool(x.numel()) and float((x != 0).sum()) / x.numel() <= SPARSE_INPUT_DENSITY
    sparse_counts = SparseCounts(counts if identity else _rows(counts, order))
    sf = torch.from_numpy(np.asarray(size_factors, dtype=np.float32)[order])
    sem = None if sem_np is None else torch.from_numpy(sem_np if identity else sem_np[order])
    perm = {"nodes_perm": torch.from_numpy(order)}
    graph_s, graph_f = (g_ if identity else dgl.reorder_graph(g_, "custom", permute_config=perm)
                        for g_ in (spatial, expression))
    bounds = np.cumsum([0] + [len(p) for p in parts])
    batches = [_batch(graph_s, graph_f, int(bounds[i]), int(bounds[i + 1]), identity, x.numpy(), cfg)
               for i in range(len(parts))]
    if sparse_input:
        for b in batches:
            b.features = SparseFeatures(x[b.start:b.stop].numpy())
        x_all = batches[0].features if identity else SparseFeatures(x.numpy())
    else:
        x_all = x
    clock.lap("graphs")

    seed_everything(seed)
    rng = np.random.default_rng(seed)
    emb_dim = None if sem is None else sem.shape[1]
    model = SemST(g, emb_dim, cfg.hidden1, cfg.hidden2, cfg.dropout, cfg.fusion, cfg.fsm_hidden_ratio,
                  cfg.fsm_mode, cfg.gcn_norm, cfg.gcn_init)
    # fused: one kernel for all parameters; the same update (to float rounding), 10x faster on CPU than
    # the default per-tensor ops (4.3M parameters: 32 -> 3 ms per step, one core)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    rows = block_rows(g) if cfg.decoder_batch is None else cfg.decoder_batch
    # The run's budget itself rather than torch's current count, which is only as good as the last
    # set_num_threads (in-process vLLM had made that a no-op until embed.backends put it back).
    threads = resolve_threads(cfg.threads)
    history: dict[str, list[float]] = {"total": [], "zinb": [], "cr": [], "spatial": []}
    if cfg.fusion == "film" and cfg.fsm_mode != "paper":  # per epoch: how far the FSM moved from the identity
        history["film_change"] = []
        if cfg.fsm_mode == "gated":
            history["film_gate"] = []
    mode = "full batch" if identity else f"mini-batch ({len(parts)} batches of <= {cfg.batch_spots} spots)"
    mode += ", sparse input" if sparse_input else ""
    bar = tqdm(range(cfg.epochs), desc=f"training ({mode})", unit="epoch", disable=not progress)
    clock.restart()
    for _ in bar:
        sums = dict.fromkeys(history, 0.0)
        model.train()
        opt.zero_grad(set_to_none=True)
        statistics = None if identity else decoder_statistics(model, batches, x, sem)
        clock.lap("statistics")
        for b in batches:
            weight = (b.stop - b.start) / n  # the batch's share of the epoch's loss and gradient
            step = _forward_backward(model, b, x, sem, sparse_counts, sf, cfg, rows, rng, clock, threads,
                                     weight, statistics)
            for key in sums:
                sums[key] += weight * step[key]
        if statistics is not None:
            batchnorm_correction(model, batches, x, sem, *statistics)
            clock.lap("statistics")
        opt.step()
        clock.lap("optimiser")
        for key, value in sums.items():
            history[key].append(value)
        if not np.isfinite(sums["total"]):
            raise FloatingPointError(f"training diverged (loss {sums['total']}) at epoch {len(history['total'])}")
        bar.set_postfix(loss=f"{sums['total']:.4f}")
    model.eval()
    with torch.no_grad():
        _, _, z = model.encode(graph_s, graph_f, x_all, sem)
    latent = z.numpy().astype(np.float32)
    report = dict(model.fuse.stats) if cfg.fusion == "film" else {}
    return TrainResult(latent=latent if identity else latent[inverse], history=history, mode=mode,
                       seconds={k: round(v, 3) for k, v in clock.seconds.items()}, report=report)


def _rows(matrix, order):
    import scipy.sparse as sp

    return sp.csr_matrix(matrix)[order] if sp.issparse(matrix) else np.asarray(matrix)[order]


def _encode(model, b: _Batch, x, sem):
    """(Z_s, Z_f, Z_final) of the spots of ``b``, on its graphs."""
    xb = x[b.start:b.stop] if b.features is None else b.features
    return model.encode(b.spatial, b.expression, xb, None if sem is None else sem[b.start:b.stop])


def decoder_statistics(model, batches, x, sem) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (biased, as BatchNorm's) over the whole slide of the decoder body's linear
    output, the encoder run batch by batch without gradients (float64 sums): what the decoder's
    BatchNorm sees in full batch, for mini-batch training to normalise every batch by. Costs one
    forward of the encoder per epoch; exact for the step that follows (parameters change once per
    epoch), up to dropout's masks when ``dropout`` > 0 (drawn again in training)."""
    n = sum(b.stop - b.start for b in batches)
    total = squares = 0.0
    with torch.no_grad():
        for b in batches:
            linear = model.decoder.body[0](_encode(model, b, x, sem)[2]).double()
            total = total + linear.sum(0)
            squares = squares + (linear * linear).sum(0)
    mean = total / n
    return mean.float(), (squares / n - mean * mean).clamp_min(0.0).float()


def batchnorm_correction(model, batches, x, sem, mean, var) -> None:
    """Adds to the parameters' gradients the part of BatchNorm's whole-slide backward that flows
    through its statistics, which the batches (normalised by fixed statistics) left out.

    For BatchNorm on all n spots, dL/dlinear_i = (gamma / sigma) * (g_i - sum_j g_j / n - xhat_i *
    sum_j g_j xhat_j / n), g = dL/d(BatchNorm output). The batches gave the first term; the two sums
    are exactly the gradients of BatchNorm's bias and weight, known once every batch has run. So:
    one more forward and backward of the encoder per batch, backpropagating the rest from the
    body's linear output. With this, a mini-batch epoch whose graphs have no edge between batches
    and that has only the ZINB loss is the full-batch epoch (tested; with ``dropout`` > 0 the masks
    are drawn again here, so only nearly). Without it (measured on dlpfc-151673, 4 batches, seed 0:
    ARI 23-31 against ~50) the encoder follows gradient components that BatchNorm's normalisation
    cancels (a common shift or scaling of the linear output), and Z presumably drifts along them.
    """
    bn = model.decoder.body[1]
    n = sum(b.stop - b.start for b in batches)
    sums, weighted = bn.bias.grad.detach() / n, bn.weight.grad.detach() / n
    sigma = torch.sqrt(var + bn.eps)
    for b in batches:
        linear = model.decoder.body[0](_encode(model, b, x, sem)[2])
        xhat = (linear.detach() - mean) / sigma
        linear.backward(-(bn.weight.detach() / sigma) * (sums + xhat * weighted))


def _heads_and_zinb(h_data, weight, bias, counts: SparseCounts, sf, offset: int, g: int, rows: int, cfg,
                    grad_h, clock, threads: int = 1, share: float = 1.0) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The three decoder heads and the fused ZINB loss/gradient over blocks of ``rows`` spots:
    returns the ZINB loss (mean over spots x genes), the heads' weight and bias gradients, and
    writes dL/dH into ``grad_h``, both gradients times ``share`` (the batch's share of the slide).
    Every op runs on the run's ``threads`` (GEMMs in MKL, the ZINB kernels in their compiled OpenMP
    loops); ``decoder`` = the heads' GEMMs, ``zinb`` = the loss and its gradient. Blocks are no
    longer shared among Python threads: torch.compile'd kernels must not be called from several
    threads, and splitting only the GEMMs' rows between two one-thread GEMMs was slower than MKL's
    two threads (30k spots x 3000 genes: 4.6 vs 3.1-3.5 s).
    """
    m = h_data.shape[0]
    scale = cfg.zinb_weight * share / (m * g)  # the loss is the mean over spots x genes
    nll_sum, grad_w, grad_b = 0.0, torch.zeros_like(weight), torch.zeros_like(bias)
    for s in range(0, m, rows):
        e = min(m, s + rows)
        hb = h_data[s:e]
        logits = torch.addmm(bias, hb, weight.T)
        clock.lap("decoder")
        nll, grad = zinb_nll_and_grad(logits, counts.block(offset + s, offset + e), sf[offset + s:offset + e],
                                      cfg.zinb_ridge, threads)
        clock.lap("zinb")
        nll_sum += nll / (m * g)
        torch.mm(grad, weight, out=grad_h[s:e]).mul_(scale)  # scaling the (rows x 256) products, not grad
        grad_w.addmm_(grad.T, hb, alpha=scale)
        grad_b.add_(grad.sum(0), alpha=scale)
        clock.lap("decoder")
    return nll_sum, grad_w, grad_b


def _forward_backward(model, b: _Batch, x, sem, counts: SparseCounts, sf, cfg, rows: int, rng, clock,
                      threads: int, share: float = 1.0, statistics=None) -> dict:
    """The losses on the spots of ``b`` and their gradients times ``share``, added to the parameters'
    gradients; ``statistics``: the slide's (mean, var) for the decoder's BatchNorm (mini-batch), or
    None to use the batch's own (full batch, where the batch is the slide). Returns the losses."""
    m, g = b.stop - b.start, x.shape[1]
    z_s, z_f, z = _encode(model, b, x, sem)
    clock.lap("encoder")
    z_leaf = z.detach().requires_grad_(True)
    h = model.decoder.body(z_leaf) if statistics is None else model.decoder.body_with_statistics(z_leaf, *statistics)
    clock.lap("decoder")
    h_data = h.detach()
    weight, bias = (t.detach() for t in model.decoder.heads())
    grad_h = torch.empty_like(h_data)
    zinb, grad_w, grad_b = _heads_and_zinb(h_data, weight, bias, counts, sf, b.start, g, rows, cfg, grad_h, clock,
                                            threads, share)
    dec = model.decoder
    for head, gw, gb in zip((dec.pi, dec.disp, dec.mean), grad_w.chunk(3), grad_b.chunk(3)):
        if head.weight.grad is None:
            head.weight.grad, head.bias.grad = gw, gb
        else:
            head.weight.grad.add_(gw)
            head.bias.grad.add_(gb)
    film_stats = dict(model.fuse.stats) if model.fusion == "film" else {}
    l_cr = correlation_reduction_loss(z_s, z_f, cfg.cr_similarity)
    clock.lap("cr")
    if cfg.spatial_loss == "all-pairs":  # the authors' mean over N^2 pairs
        l_s = all_pairs_spatial_loss(z, torch.from_numpy(b.pos_src), torch.from_numpy(b.pos_dst),
                                     cfg.spatial_exact_below, cfg.spatial_samples_per_spot, rng)
    else:
        neg_src, neg_dst = sample_negatives(m, b.pos_src, b.pos_dst, cfg.n_negatives, rng, b.neighbour_keys)
        l_s = (spatial_regularisation_loss(z, torch.from_numpy(b.pos_src), torch.from_numpy(b.pos_dst),
                                           torch.from_numpy(neg_src), torch.from_numpy(neg_dst))
               if len(b.pos_src) else z.sum() * 0.0)
    clock.lap("spatial")
    torch.autograd.backward(h, grad_h)  # decoder body -> dL/dZ_final in z_leaf.grad
    rest = cfg.gamma * l_cr + cfg.lambda_s * l_s
    torch.autograd.backward([z, rest * share], [z_leaf.grad, None])  # x 1.0 in full batch: the same bits
    clock.lap("backward")
    total = cfg.zinb_weight * zinb + rest.item()
    return {"total": total, "zinb": zinb, "cr": l_cr.item(), "spatial": l_s.item(), **film_stats}
