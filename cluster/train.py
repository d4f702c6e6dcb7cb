"""Training SemST: both GCN views, FSM fusion, and the ZINB decoder, full batch or in blocks.

A full-batch epoch (:func:`_forward_backward`) on the whole slide and its graphs:

1. encoder: Z_s, Z_f, Z_final (autograd);
2. decoder body (Linear -> BatchNorm -> ReLU), its BatchNorm on the whole slide's statistics;
3. decoder heads + ZINB loss over blocks of a few hundred spots (:mod:`semst.cluster.zinb`): each
   block's head GEMM, loss and analytic gradient, accumulated into the heads' gradients and into
   dL/dh; memory for the (spots x genes) outputs is one block, whatever the slide's size. This is
   exactly the gradient of the whole loss (:func:`_decode`);
4. L_cr, L_s (negatives sampled among all spots), then one backward through the encoder.

Every epoch is one Adam step, as in the paper. Full batch runs the above once on the whole slide.
Mini-batch mode, for slides larger than ``minibatch_above`` spots (or forced with
``minibatch = "on"``), computes the same epoch in blocks of at most ``batch_spots`` spots so that
memory stays bounded (:mod:`semst.cluster.blockwise`): the graph convolutions run on the whole
slide without autograd and are differentiated by hand, everything per spot runs block by block,
and the losses see the whole slide (BatchNorm's statistics, L_cr, L_s with the same negatives), so
it gives full batch's gradients up to floating-point summation order. Why not Cluster-GCN-style
batches (each batch its own subgraphs and losses): measured on dlpfc-151673 (w/o LLM, 5 seeds,
ARI x100), that lost 3-6 points against full batch's 51.2 even with the BatchNorm made exact
(48.5 +- 2.0 with 4 batches, 44.9 +- 4.8 with 2) and ~10 before; see the README.

No choice is made by looking at labels: the returned latent is Z_final after the last epoch.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from semst.cluster.blockwise import NormalisedAdjacency, add_to_grad, blockwise_epoch
from semst.cluster.fusion import fusion_class
from semst.cluster.graphs import neighbour_pairs
from semst.cluster.losses import (
    all_pairs_spatial_loss,
    correlation_reduction_loss,
    pair_keys,
    sample_negatives,
    spatial_regularisation_loss,
)
from semst.cluster.network import SPARSE_INPUT_DENSITY, SemST, SparseFeatures
from semst.cluster.zinb import SparseCounts, block_rows, zinb_nll_and_grad
from semst.shared.config import LossConfig, ModelConfig, TrainConfig
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
class _SpatialPairs:
    """The spatial graph's neighbour pairs (no self pairs), what L_s reads of the graph."""

    src: np.ndarray
    dst: np.ndarray
    keys: np.ndarray  # pair_keys of the pairs, for negative sampling

    @classmethod
    def of(cls, graph) -> _SpatialPairs:
        src, dst = neighbour_pairs(graph)
        return cls(src, dst, pair_keys(graph.num_nodes(), src, dst))


def resolve_minibatch(train_cfg: TrainConfig, n_spots: int) -> bool:
    """Whether this slide trains in mini-batches: forced by ``minibatch`` "on"/"off", else above
    ``minibatch_above`` spots. A forced mini-batch larger than the slide is an error."""
    if train_cfg.minibatch == "on":
        if train_cfg.batch_spots >= n_spots:
            raise ValueError(f"minibatch = \"on\" with batch_spots = {train_cfg.batch_spots} but the slide has only "
                             f"{n_spots} spots: use a smaller batch_spots or minibatch = \"off\"")
        return True
    if train_cfg.minibatch == "off":
        return False
    return n_spots > train_cfg.minibatch_above and train_cfg.batch_spots < n_spots


def train_semst(features, counts, size_factors, spatial, expression, semantic, model_cfg: ModelConfig,
                loss_cfg: LossConfig, train_cfg: TrainConfig, seed: int, progress: bool = True) -> TrainResult:
    """Train SemST on one slide and return the last epoch's Z_final.

    features: (n, g) preprocessed expression; counts: (n, g) raw counts of the same genes (CSR ok);
    size_factors: (n,) (with ``loss_cfg.zinb_target = "scaled"`` the ZINB reconstructs ``features`` with
    scale factor 1 instead, the authors' choice, and these two are not used); spatial, expression: DGL graphs with
    self-loops; semantic: (n, d) or None (only with ``model_cfg.fusion == "none"``); model_cfg, loss_cfg,
    train_cfg: the network, loss and training sections of a ClusterConfig (``cfg.model``, ``cfg.loss``,
    ``cfg.train``); seed: seeds weights, dropout, sampling.
    """
    with deterministic_torch():
        return _train_semst(features, counts, size_factors, spatial, expression, semantic, model_cfg, loss_cfg,
                            train_cfg, seed, progress)


def _train_semst(features, counts, size_factors, spatial, expression, semantic, model_cfg, loss_cfg, train_cfg,
                 seed, progress) -> TrainResult:
    from tqdm import tqdm

    uses_semantic = fusion_class(model_cfg.fusion).uses_semantic
    if uses_semantic and semantic is None:
        raise ValueError(f"fusion {model_cfg.fusion!r} needs semantic embeddings; use fusion 'none' without them")
    clock = _Clock()
    n, g = np.shape(features)
    sem = None
    if uses_semantic:
        sem = torch.from_numpy(np.ascontiguousarray(semantic, dtype=np.float32))
        if sem.shape[0] != n:
            raise ValueError(f"semantic embeddings have {sem.shape[0]} rows for {n} spots")
    minibatch = resolve_minibatch(train_cfg, n)
    if loss_cfg.zinb_target == "scaled":  # the authors' train.py line 53
        counts, size_factors = features, np.ones(n, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    sparse_input = bool(x.numel()) and np.count_nonzero(x.numpy()) / x.numel() <= SPARSE_INPUT_DENSITY
    sparse_counts = SparseCounts(counts)
    sf = torch.from_numpy(np.asarray(size_factors, dtype=np.float32))
    pairs = _SpatialPairs.of(spatial)
    x_in = SparseFeatures(x.numpy()) if sparse_input else x
    adjacency = None
    if minibatch:
        adjacency = [NormalisedAdjacency(graph, model_cfg.gcn_norm) for graph in (spatial, expression)]
    clock.lap("graphs")

    seed_everything(seed)
    rng = np.random.default_rng(seed)
    emb_dim = None if sem is None else sem.shape[1]
    model = SemST.from_config(g, emb_dim, model_cfg)
    # fused: one kernel for all parameters; the same update (to float rounding), 10x faster on CPU than
    # the default per-tensor ops (4.3M parameters: 32 -> 3 ms per step, one core)
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)
    rows = block_rows(g) if train_cfg.decoder_batch is None else train_cfg.decoder_batch
    # The run's budget itself rather than torch's current count, which is only as good as the last
    # set_num_threads (in-process vLLM had made that a no-op until embed.backends put it back).
    threads = resolve_threads(train_cfg.threads)
    history: dict[str, list[float]] = {"total": [], "zinb": [], "cr": [], "spatial": []}
    history.update({key: [] for key in model.fuse.history_keys()})  # e.g. how far the FSM moved from the identity
    n_blocks = -(-n // train_cfg.batch_spots)
    mode = f"mini-batch ({n_blocks} blocks of <= {train_cfg.batch_spots} spots)" if minibatch else "full batch"
    mode += ", sparse input" if sparse_input else ""
    bar = tqdm(range(train_cfg.epochs), desc=f"training ({mode})", unit="epoch", disable=not progress)

    def decode(inputs, body, start, share):
        return _decode(model, inputs, body, sparse_counts, sf, start, loss_cfg, rows, clock, threads, share)

    clock.restart()
    for _ in bar:
        model.train()
        opt.zero_grad(set_to_none=True)
        if minibatch:
            step = blockwise_epoch(model, adjacency, x_in, sem, model_cfg.dropout, loss_cfg, train_cfg.batch_spots,
                                   clock, decode, lambda z: spatial_loss(z, pairs, loss_cfg, rng))
        else:
            step = _forward_backward(model, spatial, expression, x_in, sem, pairs, loss_cfg, rng, clock, decode)
        opt.step()
        clock.lap("optimiser")
        for key in history:
            history[key].append(step[key])
        if not np.isfinite(step["total"]):
            raise FloatingPointError(f"training diverged (loss {step['total']}) at epoch {len(history['total'])}")
        bar.set_postfix(loss=f"{step['total']:.4f}")
    model.eval()
    with torch.no_grad():
        _, _, z = model.encode(spatial, expression, x_in, sem)
    report = model.fuse.stats()
    return TrainResult(latent=z.numpy().astype(np.float32), history=history, mode=mode,
                       seconds={k: round(v, 3) for k, v in clock.seconds.items()}, report=report)


def _heads_and_zinb(h_data, weight, bias, counts: SparseCounts, sf, offset: int, g: int, rows: int, loss_cfg: LossConfig,
                    grad_h, clock, threads: int = 1, share: float = 1.0) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The three decoder heads and the fused ZINB loss/gradient over blocks of ``rows`` spots:
    returns the ZINB loss (mean over spots x genes), the heads' weight and bias gradients, and
    writes dL/dH into ``grad_h``, both gradients times ``share`` (the spots' share of the slide).
    Every op runs on the run's ``threads`` (GEMMs in MKL, the ZINB kernels in their compiled OpenMP
    loops); ``decoder`` = the heads' GEMMs, ``zinb`` = the loss and its gradient. Blocks are no
    longer shared among Python threads: torch.compile'd kernels must not be called from several
    threads, and splitting only the GEMMs' rows between two one-thread GEMMs was slower than MKL's
    two threads (30k spots x 3000 genes: 4.6 vs 3.1-3.5 s).
    """
    m = h_data.shape[0]
    scale = loss_cfg.zinb_weight * share / (m * g)  # the loss is the mean over spots x genes
    nll_sum, grad_w, grad_b = 0.0, torch.zeros_like(weight), torch.zeros_like(bias)
    # one buffer for every block's logits instead of a fresh (rows x 3 genes) tensor per block, paged
    # in each time (100k x 3000: torch.profiler put 1.7 s of an epoch on writing the bias into fresh
    # blocks; the bench's decoder time moved less, 9.51 -> 9.48 s, within its noise). Same numbers.
    logits_buffer = torch.empty(min(rows, m), weight.shape[0])
    for s in range(0, m, rows):
        e = min(m, s + rows)
        hb = h_data[s:e]
        logits = torch.addmm(bias, hb, weight.T, out=logits_buffer[:e - s])
        clock.lap("decoder")
        nll, grad = zinb_nll_and_grad(logits, counts.block(offset + s, offset + e), sf[offset + s:offset + e],
                                      loss_cfg.zinb_ridge, threads)
        clock.lap("zinb")
        nll_sum += nll / (m * g)
        torch.mm(grad, weight, out=grad_h[s:e]).mul_(scale)  # scaling the (rows x 256) products, not grad
        grad_w.addmm_(grad.T, hb, alpha=scale)
        grad_b.add_(grad.sum(0), alpha=scale)
        clock.lap("decoder")
    return nll_sum, grad_w, grad_b


def _decode(model, inputs, body, counts: SparseCounts, sf, start: int, loss_cfg: LossConfig, rows: int, clock,
            threads: int,
            share: float = 1.0) -> tuple[float, torch.Tensor]:
    """The decoder and the ZINB loss of the spots from ``start`` on: ``body(inputs)`` gives the heads'
    input (full batch: the decoder body on Z_final; mini-batch: the body after its Linear, on the
    slide's statistics). Adds the heads' and the body's parameter gradients (times ``share``) and
    returns the loss and dL/d``inputs`` (not yet backpropagated any further)."""
    g = counts.shape[1]
    leaf = inputs.detach().requires_grad_(True)
    h = body(leaf)
    clock.lap("decoder")
    h_data = h.detach()
    weight, bias = (t.detach() for t in model.decoder.heads())
    grad_h = torch.empty_like(h_data)
    zinb, grad_w, grad_b = _heads_and_zinb(h_data, weight, bias, counts, sf, start, g, rows, loss_cfg, grad_h, clock,
                                            threads, share)
    dec = model.decoder
    for head, gw, gb in zip((dec.pi, dec.disp, dec.mean), grad_w.chunk(3), grad_b.chunk(3)):
        add_to_grad(head.weight, gw)
        add_to_grad(head.bias, gb)
    torch.autograd.backward(h, grad_h)  # the body -> dL/dinputs in leaf.grad
    clock.lap("backward")
    return zinb, leaf.grad


def spatial_loss(z, pairs: _SpatialPairs, loss_cfg: LossConfig, rng):
    """L_s of the slide's Z_final (``loss_cfg.spatial_loss``: sampled negatives or all pairs)."""
    if loss_cfg.spatial_loss == "all-pairs":  # the authors' mean over N^2 pairs
        return all_pairs_spatial_loss(z, torch.from_numpy(pairs.src), torch.from_numpy(pairs.dst),
                                      loss_cfg.spatial_exact_below, loss_cfg.spatial_samples_per_spot, rng)
    neg_src, neg_dst = sample_negatives(z.shape[0], pairs.src, pairs.dst, loss_cfg.n_negatives, rng, pairs.keys)
    if not len(pairs.src):
        return z.sum() * 0.0
    return spatial_regularisation_loss(z, torch.from_numpy(pairs.src), torch.from_numpy(pairs.dst),
                                       torch.from_numpy(neg_src), torch.from_numpy(neg_dst))


def _forward_backward(model, spatial, expression, x, sem, pairs: _SpatialPairs, loss_cfg: LossConfig, rng, clock,
                      decode) -> dict:
    """A full-batch epoch's losses, their gradients added to the parameters' gradients."""
    z_s, z_f, z = model.encode(spatial, expression, x, sem)
    clock.lap("encoder")
    zinb, grad_z = decode(z, model.decoder.body, 0, 1.0)
    fusion_stats = model.fuse.stats()
    l_cr = correlation_reduction_loss(z_s, z_f, loss_cfg.cr_similarity)
    clock.lap("cr")
    l_s = spatial_loss(z, pairs, loss_cfg, rng)
    clock.lap("spatial")
    rest = loss_cfg.gamma * l_cr + loss_cfg.lambda_s * l_s
    torch.autograd.backward([z, rest], [grad_z, None])
    clock.lap("backward")
    total = loss_cfg.zinb_weight * zinb + rest.item()
    return {"total": total, "zinb": zinb, "cr": l_cr.item(), "spatial": l_s.item(), **fusion_stats}
