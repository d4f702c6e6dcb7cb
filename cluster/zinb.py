"""The ZINB loss of SemST's decoder with its gradient, block by block of spots, in two fused kernels.

The decoder's three heads give, per spot and gene, logits ``a`` (dropout), ``b`` (dispersion) and
``c`` (mean). The loss is the DCA / Spatial-MGCN negative log-likelihood of
:func:`semst.cluster.losses.zinb_loss`, with the activations and clamps of
:class:`semst.cluster.network.ZINBDecoder`:

    pi = sigmoid(a),  theta = clamp(softplus(b), 1e-4, 1e4),  mu = clamp(exp(c), 1e-5, 1e6) * s_i

Why not autograd through those torch ops: on dlpfc-151673 (3639 spots x 3000 genes) it made ~25
passes over spots x genes per epoch, each allocating a fresh 44 MB tensor, saved them all for the
backward, and evaluated the count term (lgamma, digamma) on every entry although ~85% of the counts
are zero. Here the gradient with respect to the logits is written out analytically, and the work is
split in two kernels:

- :func:`_every_entry`: the zero-count case on every entry of a block, with its gradient;
- :func:`_non_zero_entries`: on the non-zero counts only (gathered from the CSR counts,
  ``lgamma(x + 1)`` computed once per run), the count case in float64 minus the zero case the first
  kernel put there, and the gradient that replaces it. For integer counts up to
  :data:`SMALL_COUNT` (95% of dlpfc-151673's non-zeros), ``lgamma(x + theta) - lgamma(theta)`` and
  its digamma difference are the sums ``sum_{j<x} log(theta + j)`` and ``sum_{j<x} 1 / (theta + j)``
  (the same numbers, ~5x cheaper than float64 lgamma and digamma, which cost 20 and 30 ns each).

Both kernels are compiled by ``torch.compile`` (TorchInductor: one C++ loop per kernel, vectorised
exp/log): as a chain of ~45 eager torch ops, the zero case alone took 0.3 s per dlpfc-151673 epoch on
one core, mostly passes over memory; fused, 0.09 s. Where no compiler works (or with
``SEMST_COMPILE=0``) the same functions run uncompiled, after a warning: same numbers, slower.

The gradient is the derivative of the same expression, with torch's conventions (no gradient
outside a clamp's range; softplus is the identity above 20); tests compare both with autograd.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

EPS = 1e-10  # as semst.cluster.losses._EPS
# Spots x genes per block: ~4 MB per float32 temporary, the (spots x 3 genes) logits and gradient
# 12 MB each, within the 32 MB L3 of the machine measured. The heads' GEMMs on more rows run faster:
# the decoder + ZINB of 100k spots x 3000 genes, two threads, per epoch: 2^19 (174 spots) 14.9 s,
# 2^20 12.9 s, 2^21 12.7 s, 3 * 2^20 14.1 s (the kernels slow down once the block leaves L3);
# dlpfc-151673 on one thread: 0.85, 0.80, 0.84 s.
BLOCK_ELEMENTS = 1 << 20
SMALL_COUNT = 4  # integer counts up to this use sums of logs instead of lgamma / digamma


@dataclass
class Entries:
    """Some non-zero counts of a block: their positions in the block's (m, 3 * genes) logits (dropout
    head; the dispersion and mean heads are ``genes`` and ``2 * genes`` further), their rows in the
    block, their values and ``lgamma(value + 1)``."""

    logit_index: torch.Tensor
    row: torch.Tensor
    x: torch.Tensor
    lgamma_x1: torch.Tensor


@dataclass
class CountsBlock:
    small: Entries  # integer counts <= SMALL_COUNT
    large: Entries  # the other non-zeros (larger or non-integer values)


class _EntrySet:
    """Non-zeros of a CSR matrix selected by ``keep``, with a row pointer to slice rows quickly."""

    def __init__(self, csr: sp.csr_matrix, keep: np.ndarray):
        n, g = csr.shape
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(csr.indptr))[keep]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
        self.genes = g
        self.row = torch.from_numpy(rows)
        self.logit_index = torch.from_numpy(rows * 3 * g + csr.indices[keep].astype(np.int64))
        self.x = torch.from_numpy(csr.data[keep].astype(np.float64))
        self.lgamma_x1 = torch.lgamma(self.x + 1.0)

    def block(self, start: int, stop: int) -> Entries:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return Entries(self.logit_index[lo:hi] - start * 3 * self.genes, self.row[lo:hi] - start,
                       self.x[lo:hi], self.lgamma_x1[lo:hi])


class SparseCounts:
    """Raw counts of one slide as CSR, split into small integer counts and the rest."""

    def __init__(self, counts):
        csr = sp.csr_matrix(counts, dtype=np.float32)
        csr.sum_duplicates()
        csr.eliminate_zeros()
        csr.sort_indices()
        self.shape = csr.shape
        small = (csr.data <= SMALL_COUNT) & (csr.data == np.rint(csr.data))
        self._small, self._large = _EntrySet(csr, small), _EntrySet(csr, ~small)

    def block(self, start: int, stop: int) -> CountsBlock:
        """The non-zeros of rows start..stop-1, indexed within the block."""
        return CountsBlock(self._small.block(start, stop), self._large.block(start, stop))


def block_rows(n_genes: int) -> int:
    """Spots per block for ``n_genes`` genes (at least 2)."""
    return max(2, BLOCK_ELEMENTS // max(1, n_genes))


def _activations(a, b, c, s):
    """pi, theta, mu as the decoder computes them, and d theta / d b, d mu / d c (0 where clamped)."""
    pi = torch.sigmoid(a)
    theta_raw = F.softplus(b)
    theta = theta_raw.clamp(1e-4, 1e4)
    dtheta_db = torch.where(b > 20.0, 1.0, torch.sigmoid(b))  # softplus is the identity above 20 (torch)
    dtheta_db = torch.where((theta_raw < 1e-4) | (theta_raw > 1e4), 0.0, dtheta_db)
    mu_raw = torch.exp(c)
    dmu_dc = torch.where((mu_raw < 1e-5) | (mu_raw > 1e6), 0.0, mu_raw * s)
    mu = mu_raw.clamp(1e-5, 1e6) * s
    return pi, theta, dtheta_db, mu, dmu_dc


def _zero_case(pi, theta, mu):
    """-log(pi + (1 - pi) r^theta + eps), r = theta / (theta + mu + eps), and its derivatives."""
    r = theta / (theta + mu + EPS)
    log_r = torch.log(r)
    big_r = torch.exp(theta * log_r)
    one_minus_pi = 1.0 - pi
    d = pi + EPS + one_minus_pi * big_r
    dl_dbig_r = -one_minus_pi / d
    return (-torch.log(d), (big_r - 1.0) / d, dl_dbig_r * big_r * (log_r + 1.0 - r),
            -(dl_dbig_r * big_r * r))


def _every_entry(logits, s, ridge: float):
    """Zero-count loss of every entry of the block summed (float64, with ``ridge * pi^2``) and its
    gradient with respect to the (m, 3 * genes) logits. ``s``: (m, 1) size factors."""
    g = logits.shape[1] // 3
    pi, theta, dtheta_db, mu, dmu_dc = _activations(logits[:, :g], logits[:, g:2 * g], logits[:, 2 * g:], s)
    loss, dl_dpi, dl_dtheta, dl_dmu = _zero_case(pi, theta, mu)
    total = loss.sum(dtype=torch.float64) + ridge * (pi * pi).sum(dtype=torch.float64)
    grad = torch.cat([(dl_dpi + 2.0 * ridge * pi) * pi * (1.0 - pi), dl_dtheta * dtheta_db, dl_dmu * dmu_dc], 1)
    return total, grad


def _non_zero_entries(a, b, c, s, x, lgamma_x1, ridge: float, small: bool):
    """At non-zero counts ``x`` (1-D, their logits ``a``, ``b``, ``c`` and size factors ``s``): the
    count-case loss minus the zero-case loss :func:`_every_entry` summed there, and the gradient that
    replaces its gradient there (dropout, dispersion, mean logits). ``small``: every ``x`` is an
    integer <= SMALL_COUNT. (Gathering inside the compiled kernel instead was slower: measured.)"""
    pi, theta, dtheta_db, mu, dmu_dc = _activations(a, b, c, s)
    loss_zero = _zero_case(pi, theta, mu)[0]
    pik, thk, muk = pi.double(), theta.double(), mu.double()
    the = thk + EPS
    if small:  # lgamma(x + the) - lgamma(the) and digamma(x + the) - digamma(the) for integer x
        lgamma_ratio = torch.zeros_like(the)
        digamma_ratio = torch.zeros_like(the)
        for j in range(SMALL_COUNT):
            counted = x > j
            lgamma_ratio = lgamma_ratio + torch.where(counted, torch.log(the + j), 0.0)
            digamma_ratio = digamma_ratio + torch.where(counted, 1.0 / (the + j), 0.0)
    else:
        lgamma_ratio = torch.lgamma(x + the) - torch.lgamma(the)
        digamma_ratio = torch.digamma(x + the) - torch.digamma(the)
    log1p_mu = torch.log1p(muk / the)
    loss = (lgamma_x1 - lgamma_ratio + (thk + x) * log1p_mu + x * (torch.log(the) - torch.log(muk + EPS))
            - torch.log(1.0 - pik + EPS))
    total = loss.sum() - loss_zero.sum(dtype=torch.float64)
    dl_dpi = (1.0 / (1.0 - pik + EPS)).float() + 2.0 * ridge * pi
    dl_dtheta = (-digamma_ratio + log1p_mu - (thk + x) * muk / (the * (the + muk)) + x / the).float()
    dl_dmu = ((thk + x) / (the + muk) - x / (muk + EPS)).float()
    return total, dl_dpi * pi * (1.0 - pi), dl_dtheta * dtheta_db, dl_dmu * dmu_dc


_kernels: dict = {}


_warm: set[tuple[str, int]] = set()  # kernels called (so compiled) once in this process


def _compiled(fn, threads: int):
    """``fn`` compiled for ``threads`` threads, or ``fn`` itself where compiling is off or failed."""
    key = (fn.__name__, threads)
    if key not in _kernels:
        if os.environ.get("SEMST_COMPILE", "1") == "0":
            _kernels[key] = fn
        else:
            # The thread count is fixed in the generated C++ and is part of inductor's cache key, so a
            # kernel cached by a run with another budget is never reused (same bits for a fixed count).
            # min_chunk_size 1: inductor decides whether to parallelise from the shapes of the call
            # that compiles, and a dynamic kernel is cached and reused for every shape; with its default
            # (512 elements per thread) a kernel first compiled on a tiny slide (the test suite) stayed
            # serial on every later slide: at 100k spots x 3000 genes, two threads, 3.0 vs 1.9 s/epoch.
            _kernels[key] = torch.compile(fn, dynamic=True, options={"cpp.threads": threads, "cpp.min_chunk_size": 1,
                                                                     "compile_threads": 1})
    return _kernels[key]


def _call(fn, threads: int, *args):
    from semst.shared import interrupt

    kernel = _compiled(fn, threads)
    if kernel is fn:
        return fn(*args)
    key = (fn.__name__, threads)
    # The first call compiles (seconds: inductor and a C++ compiler): a signal raised inside it aborted
    # the process (exit -6) instead of stopping it, so one received then takes effect when it returns.
    guard = contextlib.nullcontext() if key in _warm else interrupt.critical()
    try:
        with guard:
            result = kernel(*args)
        _warm.add(key)
        return result
    except Exception as exc:  # no C++ compiler, unsupported platform, ...: the same function uncompiled
        warnings.warn(f"torch.compile could not build the ZINB kernel ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); running it uncompiled "
                      f"(same numbers, slower). SEMST_COMPILE=0 skips the attempt.", RuntimeWarning, stacklevel=3)
        _kernels[(fn.__name__, threads)] = fn
        return fn(*args)


def zinb_nll_and_grad(logits: torch.Tensor, block: CountsBlock, size_factors: torch.Tensor,
                      ridge: float = 0.0, threads: int | None = None) -> tuple[float, torch.Tensor]:
    """Summed ZINB NLL of a block of spots and its gradient with respect to ``logits``.

    ``logits``: (m, 3 * genes) float32, the dropout, dispersion and mean heads side by side (no
    grad needed); ``block``: :meth:`SparseCounts.block` of the same spots; ``size_factors``: (m,).
    ``ridge``: ``ridge * pi^2`` added to every entry (the authors' ridge_lambda 0.05; with the paper
    recipe the "counts" are the scaled matrix and the size factors 1, see train.py). ``threads``:
    the kernels' thread count (default torch's).
    """
    threads = torch.get_num_threads() if threads is None else threads
    s = size_factors.to(logits.dtype)
    g = logits.shape[1] // 3
    total, grad = _call(_every_entry, threads, logits, s.reshape(-1, 1), float(ridge))
    flat_logits, flat_grad = logits.reshape(-1), grad.reshape(-1)
    for entries, small in ((block.small, True), (block.large, False)):
        if not len(entries.x):
            continue
        # index_select and scatter_: 3-4x faster than x[i] and x[i] = v here (measured, deterministic mode)
        heads = (entries.logit_index, entries.logit_index + g, entries.logit_index + 2 * g)  # dropout, dispersion, mean
        correction, *grads = _call(_non_zero_entries, threads, *(flat_logits.index_select(0, i) for i in heads),
                                   s.index_select(0, entries.row), entries.x, entries.lgamma_x1, float(ridge), small)
        total = total + correction
        for i, d in zip(heads, grads):
            flat_grad.scatter_(0, i, d)
    return float(total), grad
