"""Expression preprocessing as in the paper, and each spot's top expressed genes.

:func:`preprocess` follows SemST's / Spatial-MGCN's scripts with every choice in PreprocessConfig:
gene filter (``min_cells``) -> highly variable genes (``seurat_v3`` on raw counts) -> library-size
normalisation (``target_sum``) -> optional ``log1p`` (off in the paper) -> scaling by each gene's
standard deviation (centred only with ``zero_center``; off in the paper) clipped at ``max_value``.
It returns a new AnnData (the input is not modified) restricted to the selected genes, with
``layers["counts"]`` = their raw counts (what the ZINB decoder reconstructs) and
``obs["size_factor"]`` = library size / median library size (the decoder's scale factor).

:func:`top_k_genes` ranks genes by raw count: a prompt lists what the spot actually expresses most.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from semst.shared.config import ConfigError, PreprocessConfig
from semst.shared.errors import SemstError


class PreprocessError(SemstError, ValueError):
    """Preprocessing cannot run as configured; the message says why."""


MIN_SPOTS = 2  # genes are scaled by their spread over spots (and seurat_v3 takes their variance)
# skmisc's loess (degree 2, span 0.3), which seurat_v3 fits to the genes' log variance against their
# log mean, failed on every draw of 4-13 distinct points and segfaults on 0-3 (measured, skmisc 0.5).
LOESS_MIN_GENES = 14
LOESS_SPAN = 0.3  # scanpy's default, which preprocess() keeps


def check_gene_supply(adata, cfg: PreprocessConfig) -> int:
    """Genes passing the ``min_cells`` filter; with ``require_top_genes`` (the paper recipe on the
    authors' datasets, whose network is built for exactly ``n_top_genes`` = fdim genes) a slide with
    fewer is refused here, before any work, with a message naming what is missing."""
    X = sp.csr_matrix(adata.X)
    detected = np.asarray((X > 0).sum(axis=0)).ravel()
    available = int((detected >= cfg.min_cells).sum())
    if cfg.require_top_genes and available < cfg.n_top_genes:
        raise ConfigError(
            f"this slide has {available} genes detected in >= {cfg.min_cells} spots (of {adata.n_vars}), but the "
            f"paper recipe needs n_top_genes = {cfg.n_top_genes} (the authors' fdim): missing "
            f"{cfg.n_top_genes - available} genes. Use recipe \"semst\", or set n_top_genes <= {available} "
            f"(or require_top_genes = false) in [preprocess] of a --config file")
    return available


def check_preprocessable(adata, cfg: PreprocessConfig, name: str = "dataset") -> None:
    """Refuse, before any work, a slide that :func:`preprocess` cannot handle as configured: fewer
    than MIN_SPOTS spots, no gene detected in ``min_cells`` spots, fewer genes than ``require_top_genes``
    asks for, or a seurat_v3 HVG selection that cannot run on it (:func:`check_hvg_fit`)."""
    if adata.n_obs < MIN_SPOTS:
        raise PreprocessError(f"{name}: {adata.n_obs} spot; semst needs at least {MIN_SPOTS} (each gene is "
                              f"scaled by its spread over the spots)")
    check_gene_supply(adata, cfg)  # the paper recipe's own message first: it says what the recipe needs
    X = sp.csr_matrix(adata.X)
    detected = np.asarray((X > 0).sum(axis=0)).ravel()
    keep = detected >= cfg.min_cells
    if not keep.any():
        raise PreprocessError(f"{name}: no gene is detected in at least min_cells={cfg.min_cells} spots "
                              f"({adata.n_obs} spots, {adata.n_vars} genes); lower min_cells in [preprocess] "
                              f"of a --config file, or check that the slide holds counts")
    if _selects_hvgs(cfg, int(keep.sum())):
        check_hvg_fit(X[:, keep], cfg, name)


def _selects_hvgs(cfg: PreprocessConfig, n_genes: int) -> bool:
    """Whether preprocess() runs a highly-variable-gene selection on ``n_genes`` filtered genes."""
    return min(cfg.n_top_genes, n_genes) < n_genes


def check_hvg_fit(counts, cfg: PreprocessConfig, name: str = "dataset") -> None:
    """Refuse a slide on which seurat_v3 cannot select genes (``counts``: spots x filtered genes).

    seurat_v3 fits a loess of each non-constant gene's log variance on its log mean; on a small
    slide many genes share one mean (with 20 spots, every gene seen once has mean 1/20) and the fit
    is singular (a traceback from skmisc), and with fewer than 4 genes it segfaults. The same fit
    is run here on the same numbers (milliseconds), so it fails here with a message instead.
    """
    if cfg.hvg_flavor not in ("seurat_v3", "seurat_v3_paper"):
        return
    counts = sp.csr_matrix(counts)
    n_spots, n_genes = counts.shape
    values = counts.data.astype(np.float64)
    mean = np.bincount(counts.indices, weights=values, minlength=n_genes) / n_spots
    mean_sq = np.bincount(counts.indices, weights=values * values, minlength=n_genes) / n_spots
    var = (mean_sq - mean ** 2) * (n_spots / (n_spots - 1))  # scanpy's unbiased variance
    varying = var > 0
    fix = (f"use a slide with more spots, a higher min_cells in [preprocess] (genes seen in one spot all "
           f"share one mean), or n_top_genes >= {n_genes} to keep every gene without a selection")
    where = (f"{name}: seurat_v3 cannot choose {cfg.n_top_genes} highly variable genes on this slide "
             f"({n_spots} spots, {n_genes} genes detected in >= {cfg.min_cells} spots)")
    if varying.sum() < LOESS_MIN_GENES:
        raise PreprocessError(f"{where}: only {int(varying.sum())} genes vary over the spots, and its loess fit "
                              f"needs at least {LOESS_MIN_GENES}; {fix}")
    from skmisc.loess import loess

    try:
        fit = loess(np.log10(mean[varying]), np.log10(var[varying]), span=LOESS_SPAN, degree=2)
        fit.fit()
    except ValueError as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PreprocessError(f"{where}: its loess fit of gene variance on mean failed ({reason.strip()}); "
                              f"{fix}") from None


def preprocess(adata, cfg: PreprocessConfig):
    """Filtered, normalised, scaled HVG expression (float32 dense X) plus raw counts and size factors."""
    import scanpy as sc

    check_preprocessable(adata, cfg)  # never hand scanpy a slide it crashes on (a segfault below 4 genes)
    work = adata.copy()
    work.X = sp.csr_matrix(work.X, dtype=np.float32)
    n_genes_in = work.n_vars
    detected = np.asarray((work.X > 0).sum(axis=0)).ravel()
    keep = detected >= cfg.min_cells
    if not keep.any():
        raise PreprocessError(f"no gene is detected in at least min_cells={cfg.min_cells} spots")
    work = work[:, keep].copy()
    lib = np.asarray(work.X.sum(axis=1)).ravel()
    n_top = min(cfg.n_top_genes, work.n_vars)
    if _selects_hvgs(cfg, work.n_vars):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seurat_v3's loess warns on near-constant genes
            sc.pp.highly_variable_genes(work, flavor=cfg.hvg_flavor, n_top_genes=n_top,
                                        **({} if cfg.hvg_flavor == "seurat_v3" else {}))
        work = work[:, work.var["highly_variable"].to_numpy()].copy()
    counts = work.X.copy()
    sc.pp.normalize_total(work, target_sum=cfg.target_sum)
    if cfg.log1p:
        sc.pp.log1p(work)
    if cfg.scale:
        sc.pp.scale(work, max_value=cfg.max_value, zero_center=cfg.zero_center)
    X = work.X.toarray() if sp.issparse(work.X) else np.asarray(work.X)
    out = work
    out.X = np.nan_to_num(X.astype(np.float32))  # genes constant in every spot scale to NaN
    out.layers["counts"] = sp.csr_matrix(counts)
    median = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0
    out.obs["size_factor"] = np.where(lib > 0, lib / median, 1.0).astype(np.float32)
    out.uns["preprocess"] = {"genes_in": n_genes_in, "genes_after_filter": int(keep.sum()),
                             "genes_kept": int(out.n_vars), "n_top_genes_capped": n_top < cfg.n_top_genes}
    return out


def top_k_genes(adata, k: int, ranking: str = "counts") -> list[list[str]]:
    """Per spot, the ``k`` genes with the highest raw count, most expressed first.

    ``ranking = "scaled"`` ranks by ``X`` instead (the preprocessed matrix of a preprocessed AnnData:
    normalised, divided by each gene's sd, clipped), as the authors' llm_generate_embedding.py
    (lines 85-93: argsort of the preprocessed matrix, last 10, reversed). Their argsort also lists
    genes of value 0 (in an order numpy leaves undefined) for spots with fewer than k expressed
    genes; here a listed gene always has a value > 0, as for counts.

    Counts are ``layers["counts"]`` when present (a preprocessed AnnData), else ``X``. Ties are
    broken by gene order in ``var`` (stable), genes with zero counts are never listed, so a spot may
    list fewer than ``k`` genes, and a spot with no counts at all gets an empty list (stage 1 renders
    it with a defined prompt, see embed.prompts).
    """
    n_genes = adata.n_vars
    if k < 1:
        raise PreprocessError(f"k_g must be >= 1, got {k}")
    if k > n_genes:
        raise PreprocessError(f"k_g={k} is larger than the {n_genes} genes available; "
                              f"use --k-genes {n_genes} or fewer")
    if ranking not in ("counts", "scaled"):
        raise PreprocessError(f"gene ranking must be \"counts\" or \"scaled\", got {ranking!r}")
    if ranking == "scaled":
        counts = adata.X
    else:
        counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    counts = sp.csr_matrix(counts)
    counts.sum_duplicates()
    names = np.asarray(adata.var_names, dtype=object)
    out: list[list[str]] = []
    indptr, indices, data = counts.indptr, counts.indices, counts.data
    for i in range(counts.shape[0]):
        lo, hi = indptr[i], indptr[i + 1]
        cols, vals = indices[lo:hi], data[lo:hi]
        nz = vals > 0
        cols, vals = cols[nz], vals[nz]
        if len(cols) > k:
            # Keep every gene tied with the k-th count, then sort exactly: count desc, gene order asc.
            kth = np.partition(vals, len(vals) - k)[len(vals) - k]
            sel = vals >= kth
            cols, vals = cols[sel], vals[sel]
        order = np.lexsort((cols, -vals))[:k]
        out.append(names[cols[order]].tolist())
    return out
