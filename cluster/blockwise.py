"""Mini-batch mode: the full-batch epoch computed in blocks of spots, in bounded memory.

Everything in SemST but the two graph convolutions is per spot, and every loss is either a sum over
spots (ZINB), a function of sums over spots (the decoder's BatchNorm, L_cr) or of pairs of spots
(L_s). So the exact full-batch gradient does not need the whole slide's autograd graph, which at
1M spots does not fit in memory; it is computed as:

1. both GCN views forward on the whole slide without autograd: the input times the first layers'
   weights, then the normalised adjacency (:class:`NormalisedAdjacency`, DGL's aggregation) times
   (spots x hidden) matrices;
2. block by block without autograd: Z_final and the decoder body's linear output, kept for the
   slide, and its mean and variance over the slide (the statistics BatchNorm sees in full batch);
3. L_cr and L_s on the whole slide's (detached) Z_s, Z_f, Z_final, with negatives drawn exactly as
   full batch draws them; autograd gives their gradients for every spot ((spots x hidden2) each);
4. per block, from the kept linear output: BatchNorm on the slide's statistics, ReLU, heads and ZINB
   (in blocks of ``rows``, as in full batch), backward into the heads' and BatchNorm's parameters
   and dL/d(linear output);
5. the part of BatchNorm's gradient that flows through its statistics, added to dL/d(linear output)
   (it needs two sums over the slide, known after 4: the gradients of BatchNorm's bias and weight);
   then per block one forward of fusion, W and the body's Linear with autograd, and one backward
   into their parameters and dL/dZ_s, dL/dZ_f;
6. both GCN views backward on the whole slide, written out (the transposed aggregation is DGL's
   on the reversed graph), and the first layers' weights' gradient as input^T times dL/d(input W).

Memory: the data, about a dozen (spots x hidden1) matrices, and one block's autograd graph
(``batch_spots`` spots). Cost per epoch: what full batch computes, plus one more forward of the
per-spot layers (fusion, W, the body's Linear: step 2 and again in step 5). The result is full
batch's epoch up to floating-point summation order (tested), so the mode changes memory and speed,
not the model. With ``dropout`` > 0 the masks are drawn differently from full batch (each block's
per-spot masks come from one seed per block and epoch, so that steps 2 and 5 see the same masks).
"""
from __future__ import annotations

import contextlib

import torch

from semst.cluster.dgl_compat import dgl
from semst.cluster.losses import correlation_reduction_loss
from semst.cluster.network import SparseFeatures


class NormalisedAdjacency:
    """The GCN's normalised adjacency of a DGL graph, as its GraphConv applies it: ``apply(h)`` is
    what GraphConv(norm) aggregates (out-degree^-1/2 scaling, sum over in-edges, in-degree^-1/2 or
    in-degree^-1 scaling), ``apply_transposed(g)`` the same matrix transposed (the sum over the
    reversed graph's in-edges), for the backward. Unweighted ``copy_u`` sums with the scalings
    outside: measured at 100k nodes x 256 features, one core, 0.17 s against 1.1 s for DGL's
    ``u_mul_e`` with per-edge weights and 0.31 s for torch's CSR product."""

    def __init__(self, graph, norm: str):
        if norm not in ("both", "right"):
            raise ValueError(f"GCN norm must be 'both' or 'right', got {norm!r}")
        self.graph, self.reversed = graph, dgl.reverse(graph)
        in_deg = graph.in_degrees().float().clamp(min=1).unsqueeze(1)
        out_deg = graph.out_degrees().float().clamp(min=1).unsqueeze(1)
        self.source_scale = out_deg.pow(-0.5) if norm == "both" else None
        self.target_scale = in_deg.pow(-0.5) if norm == "both" else 1.0 / in_deg

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous() if self.source_scale is None else h * self.source_scale
        return dgl.ops.copy_u_sum(self.graph, h).mul_(self.target_scale)

    def apply_transposed(self, g: torch.Tensor) -> torch.Tensor:
        out = dgl.ops.copy_u_sum(self.reversed, g * self.target_scale)
        return out if self.source_scale is None else out.mul_(self.source_scale)


@contextlib.contextmanager
def _masks_from(seed: int | None):
    """Dropout masks drawn from ``seed`` (the same masks every time a block is recomputed), the
    global generator restored afterwards; no-op for ``None`` (no dropout: nothing random)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def add_to_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """``param.grad += grad`` (``grad`` itself where there is none yet)."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _views_forward(model, adjacency, x, dropout_masks):
    """Both GCN views on the whole slide (called without autograd): per view its first layer's
    activation h1 (after ReLU and dropout: what the second layer reads) and its output Z_v."""
    outs = []
    for branch, adj, xw_v, mask in zip((model.spatial, model.expression), adjacency, model.input_products(x),
                                       dropout_masks):
        h1 = adj.apply(xw_v).add_(branch.conv1.bias.detach()).relu_()
        if mask is not None:
            h1.mul_(mask)
        z_v = adj.apply(h1 @ branch.conv2.weight.detach()).add_(branch.conv2.bias.detach())
        outs.append((h1, z_v))
    return outs


def _views_backward(model, adjacency, x, views, grads, dropout_masks) -> None:
    """Adds both GCN views' parameter gradients, given dL/dZ_v for every spot (``grads``):
    z = A (h1 W2) + b2 and h1 = mask * relu(A (x W1) + b1) differentiated by hand."""
    widths = model.branch_widths()
    grad_xw = torch.empty(x.shape[0], sum(widths))  # dL/d(x W1) of both views, side by side
    for branch, adj, (h1, _), g_z, mask, cols in zip((model.spatial, model.expression), adjacency, views, grads,
                                                     dropout_masks, torch.split(grad_xw, widths, dim=1)):
        g_p = adj.apply_transposed(g_z)  # dL/d(h1 W2)
        add_to_grad(branch.conv2.weight, h1.T @ g_p)
        add_to_grad(branch.conv2.bias, g_z.sum(0))
        g_h1 = g_p @ branch.conv2.weight.detach().T
        g_h1.mul_(h1 > 0)  # ReLU's derivative (and the dropped units, which are 0 in h1)
        if mask is not None:
            g_h1.mul_(mask)
        add_to_grad(branch.conv1.bias, g_h1.sum(0))
        cols.copy_(adj.apply_transposed(g_h1))
        del g_p, g_h1
    grad_w = x.transposed_matmul(grad_xw) if isinstance(x, SparseFeatures) else x.T @ grad_xw
    g_s, g_f = torch.split(grad_w, widths, dim=1)
    add_to_grad(model.spatial.weight1, g_s.contiguous())
    add_to_grad(model.expression.weight1, g_f.contiguous())


def blockwise_epoch(model, adjacency, x, sem, dropout: float, loss_cfg, block_spots: int, clock, decode,
                    spatial_loss) -> dict:
    """One full-batch epoch's losses and gradients (added to the parameters' ``.grad``), computed in
    blocks of ``block_spots`` spots (steps 1-6 of the module docstring).

    ``adjacency``: the two views' :class:`NormalisedAdjacency`; ``dropout``: the network's; ``loss_cfg``: the
    loss's weights (a ClusterConfig's ``loss`` section); ``x``: the whole slide's input
    (dense tensor or SparseFeatures); ``decode(inputs, body, start, share) -> (zinb, dL/dinputs)``:
    the decoder and ZINB of the spots from ``start`` on, ``body(inputs)`` being the heads' input
    (train's ``_decode``); ``spatial_loss(z)``: L_s of the whole slide, as full batch computes it.
    Returns the losses, as full batch reports them.
    """
    n = x.shape[0]
    bounds = list(range(0, n, block_spots)) + [n]
    blocks = list(zip(bounds[:-1], bounds[1:]))
    masks, block_seeds = [None, None], [None] * len(blocks)
    if dropout > 0:
        keep = 1.0 - dropout
        masks = [torch.empty(n, w).bernoulli_(keep).div_(keep) for w in model.branch_widths()]
        block_seeds = torch.randint(0, 2 ** 62, (len(blocks),)).tolist()
    dec = model.decoder

    def combine(z_s, z_f, start, stop):
        with _masks_from(block_seeds[start // block_spots]):
            return model.combine(z_s, z_f, None if sem is None else sem[start:stop])

    # 1-2: the encoder forward, the decoder body's linear output and its statistics, without autograd
    with torch.no_grad():
        views = _views_forward(model, adjacency, x, masks)
        (_, z_s), (_, z_f) = views
        z = torch.empty(n, z_s.shape[1])
        linear = torch.empty(n, dec.body[0].out_features)
        total = squares = 0.0
        fusion_parts = None  # the fusion's additive statistics (the FSM's squared norms), summed over blocks
        for s, e in blocks:
            z[s:e] = combine(z_s[s:e], z_f[s:e], s, e)
            parts = model.fuse.stat_parts()
            fusion_parts = parts if fusion_parts is None else [a + b for a, b in zip(fusion_parts, parts)]
            linear[s:e] = dec.body[0](z[s:e])
            block = linear[s:e].double()
            total = total + block.sum(0)
            squares = squares + (block * block).sum(0)
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(0.0).float()
        mean = mean.float()
    clock.lap("statistics")

    # 3: L_cr and L_s on the whole slide, and their gradients for every spot
    for t in (z_s, z_f, z):
        t.requires_grad_(True)
    l_cr = correlation_reduction_loss(z_s, z_f, loss_cfg.cr_similarity)
    clock.lap("cr")
    l_s = spatial_loss(z)
    clock.lap("spatial")
    (loss_cfg.gamma * l_cr + loss_cfg.lambda_s * l_s).backward()
    grad_s, grad_f, grad_z = z_s.grad, z_f.grad, z.grad
    z_s, z_f = z_s.detach(), z_f.detach()
    clock.lap("backward")

    # 4: per block, the rest of the decoder body (BatchNorm on the slide's statistics, ReLU), the heads
    # and ZINB, from the stored linear output: dL/d(linear output) with the statistics held fixed
    zinb = 0.0
    grad_linear = torch.empty_like(linear)
    for s, e in blocks:
        loss, grad_linear[s:e] = decode(linear[s:e], lambda rows: dec.normalise(rows, mean, var), s, (e - s) / n)
        zinb += loss * (e - s) / n

    # 5: the part of BatchNorm's gradient that flows through its statistics, -(gamma / sigma) (sum_j g_j / n
    # + xhat_i sum_j g_j xhat_j / n), g = dL/d(BatchNorm output): the two sums are BatchNorm's bias and
    # weight gradients, complete after step 4. Then per block one forward of the per-spot layers
    # (fusion, W, the body's Linear) with autograd and one backward, into their parameters and dL/dZ_s,
    # dL/dZ_f.
    bn = dec.body[1]
    sums, weighted = bn.bias.grad.detach() / n, bn.weight.grad.detach() / n
    sigma = torch.sqrt(var + bn.eps)
    scale = -(bn.weight.detach() / sigma)
    for s, e in blocks:
        grad_linear[s:e] += scale * (sums + (linear[s:e] - mean) / sigma * weighted)
        rows_s, rows_f = (t[s:e].detach().requires_grad_(True) for t in (z_s, z_f))
        zb = combine(rows_s, rows_f, s, e)
        clock.lap("encoder")
        torch.autograd.backward([zb, dec.body[0](zb)], [grad_z[s:e], grad_linear[s:e]])
        grad_s[s:e] += rows_s.grad
        grad_f[s:e] += rows_f.grad
        clock.lap("backward")

    # 6: both views backward on the whole slide (the per-spot buffers go first: ~2.5 GB at 1M spots)
    del z, linear, grad_linear, grad_z
    _views_backward(model, adjacency, x, views, (grad_s, grad_f), masks)
    clock.lap("backward")
    rest = loss_cfg.gamma * l_cr.item() + loss_cfg.lambda_s * l_s.item()
    fusion_stats = model.fuse.stats_from_parts(fusion_parts)
    return {"total": loss_cfg.zinb_weight * zinb + rest, "zinb": zinb, "cr": l_cr.item(), "spatial": l_s.item(),
            **fusion_stats}
