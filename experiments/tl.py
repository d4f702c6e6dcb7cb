"""Tools on AnnData, as in scanpy's ``tl``: ``semst.tl.encode``, ``semst.tl.domains``, ``semst.tl.auto_k``.

``encode`` and ``domains`` are the functions of :mod:`semst.experiments.api` (``semst.encode`` and
``semst.domains`` are the same objects). Every function checks its input before any work and writes
into ``adata`` only once the whole call has succeeded; the stages are imported when called, so
``import semst`` stays cheap.
"""
from __future__ import annotations

import json
import numbers
import re

import numpy as np
import pandas as pd

from semst.experiments.api import DOMAIN_KEY, LATENT_KEY, LLM_KEY, domains, encode

AUTO_KEY = "semst_auto_domain"  # obs / uns key that auto_k writes by default
AUTO_RANGE = (3, 15)  # auto_k's default k_range, as n_domains = "auto" in stage 2

__all__ = ["encode", "domains", "auto_k", "LLM_KEY", "LATENT_KEY", "DOMAIN_KEY", "AUTO_KEY"]


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def checked_k_range(k_range, n_spots: int) -> tuple[int, int]:
    """(lo, hi) from a pair of integers or the ``n_domains`` text ``"auto"`` / ``"auto:LO-HI"``, checked
    against the slide: 2 <= lo <= hi and hi + 1 <= the number of spots (the range is scored with one
    more k on each side); a ConfigError otherwise."""
    from semst.shared.config import ConfigError

    text = re.fullmatch(r"auto(?::(\d+)-(\d+))?", k_range.strip().lower()) if isinstance(k_range, str) else None
    if text:
        lo, hi = (int(text[1]), int(text[2])) if text[1] else AUTO_RANGE
    elif isinstance(k_range, (tuple, list)) and len(k_range) == 2 and all(map(_integer, k_range)):
        lo, hi = (int(b) for b in k_range)
    else:
        raise ConfigError(f"k_range must be a pair of integers (lo, hi), e.g. (3, 15), or 'auto:LO-HI', "
                          f"got {k_range!r}")
    if lo < 2:
        raise ConfigError(f"k_range {k_range!r}: the smallest number of domains must be >= 2, got {lo}")
    if lo > hi:
        raise ConfigError(f"k_range {k_range!r}: the range is empty, {lo} > {hi}; write the smaller bound "
                          f"first ({hi}, {lo})")
    if hi + 1 > n_spots:
        raise ConfigError(f"k_range {k_range!r}: scoring k up to {hi} clusters up to {hi + 1} domains, but "
                          f"adata has {n_spots} spots, so the upper bound must be at most {n_spots - 1}")
    return lo, hi


def checked_embedding(adata, use_rep: str) -> np.ndarray:
    """``adata.obsm[use_rep]`` as a finite (spots x d) float array, or a ConfigError saying what to do."""
    from semst.shared.config import ConfigError

    if not isinstance(use_rep, str) or use_rep not in adata.obsm:
        known = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise ConfigError(f"adata.obsm has no {use_rep!r} (it has {known}): run semst.tl.domains(adata) first "
                          f"(it writes obsm[{LATENT_KEY!r}]), or pass use_rep= the key of an embedding")
    try:
        X = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"adata.obsm[{use_rep!r}] is not a numeric matrix") from None
    if X.ndim != 2 or X.shape[1] < 1:
        raise ConfigError(f"adata.obsm[{use_rep!r}] must be a matrix with one row per spot, got shape {X.shape}")
    bad = int((~np.isfinite(X)).any(axis=1).sum())
    if bad:
        raise ConfigError(f"adata.obsm[{use_rep!r}] has NaN or infinite values in {bad} of {len(X)} rows: "
                          f"k-means needs a finite embedding")
    return X


def auto_k(adata, use_rep: str = LATENT_KEY, k_range=AUTO_RANGE, runs: int = 10, *, random_state: int = 0,
           key_added: str = AUTO_KEY):
    """The number of domains of an embedding already in ``adata.obsm``, by clustering stability.

    Stage 2's ``n_domains="auto:LO-HI"`` rule (:mod:`semst.cluster.autok`, after CellCharter's
    ``ClusterAutoK``) on one embedding: ``runs`` single-initialisation k-means fits for every k from
    lo - 1 to hi + 1, the stability of k is the mean pairwise Fowlkes-Mallows index of its fits, and
    the chosen k is the most stable peak that stands out of its neighbours by at least its standard
    error (else the most stable k of the range). Then the spots are clustered at the chosen k as
    stage 2 clusters a seed (k-means, 10 restarts, seeded with ``random_state``; no spatial refinement).
    On stage 2's embedding of one seed (``obsm["X_semst"]`` after :func:`domains` with one seed, the
    same ``runs`` as its ``auto_runs``) it chooses the same k. Never reads an annotation.

    Parameters
    ----------
    adata
        An AnnData with the embedding in ``obsm[use_rep]``.
    use_rep
        The ``adata.obsm`` key of the embedding (default SemST's learned representation).
    k_range
        The range of k to choose from, ``(lo, hi)`` with 2 <= lo <= hi < number of spots, or the
        stage-2 text ``"auto:LO-HI"`` / ``"auto"`` (3-15).
    runs
        k-means fits per k (>= 2); more runs, a less noisy curve.
    random_state
        Seed of the final k-means at the chosen k (each stability run r is seeded with r).
    key_added
        The ``adata.obs`` and ``adata.uns`` key to write to.

    Returns
    -------
    semst.cluster.autok.StabilityCurve
        The curve: ``chosen`` (k), ``mean`` / ``sd`` (k -> stability over pairs of runs), ``peaks``,
        ``table()`` (one row per k) and ``summary()``; draw it with :func:`semst.pl.stability`.

        Sets, only once the whole call has succeeded:

        ``adata.obs[key_added]``  (default ``"semst_auto_domain"``)
            the domains at the chosen k (categorical, ``"0"`` ... ``"k-1"``).
        ``adata.uns[key_added]``
            ``{"stability": JSON text of the curve's summary (as metrics.json's "auto_k"; what
            ``semst.pl.stability(adata, key=key_added)`` draws), "params": {"use_rep", "k_range",
            "runs", "random_state"}}``.
    """
    from semst.cluster.autok import stability_curve
    from semst.cluster.domains import kmeans_domains
    from semst.shared.config import ConfigError

    X = checked_embedding(adata, use_rep)
    lo, hi = checked_k_range(k_range, len(X))
    if not _integer(runs) or runs < 2:
        raise ConfigError(f"runs must be an integer >= 2 (stability compares runs), got {runs!r}")
    if not _integer(random_state) or random_state < 0:
        raise ConfigError(f"random_state must be an integer >= 0, got {random_state!r}")
    if not isinstance(key_added, str) or not key_added:
        raise ConfigError(f"key_added must be a non-empty string, got {key_added!r}")
    curve = stability_curve([X], lo, hi, int(runs))
    labels = kmeans_domains(X, curve.chosen, int(random_state))
    uns = {"stability": json.dumps(curve.summary()),
           "params": {"use_rep": use_rep, "k_range": [lo, hi], "runs": int(runs), "random_state": int(random_state)}}
    adata.obs[key_added] = pd.Categorical(labels.astype(str))
    adata.uns[key_added] = uns
    return curve
