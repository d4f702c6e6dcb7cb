"""Stage 2 of the gene-level semantic space (``semantic = "gene"``): a spot's vector from its genes'.

Each spot's semantic vector is the expression-weighted mean of the cached vectors of its genes
(GenePT-w): ``W @ G`` with ``W`` (spots x genes, CSR) the spot's raw counts of the genes that weigh
(its top-k_g genes, or every gene of the ``genes_from`` set; ``gene_weights``), each row divided by
its sum, and ``G`` (genes x d) the vectors ``semst embed --semantic gene`` cached
(:mod:`semst.embed.gene_prompts`). Counts or library-size-normalised counts give the same weights
(a per-spot factor cancels in the row normalisation). A spot with no count among its genes has an
all-zero row, so a zero vector.

Exact and deterministic: the weights are float64, the product is scipy's sequential CSR x dense
loop (no threads, fixed summation order), cast to float32 once at the end.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from semst.shared.config import EmbedConfig


def _ranking_source(cfg: EmbedConfig, adata):
    """The AnnData whose genes a spot's top list is drawn from, as stage 1 ranks them
    (:func:`semst.embed.run.spot_gene_lists`): the preprocessed HVGs, or the slide itself."""
    from semst.shared.preprocess import preprocess

    return preprocess(adata, cfg.preprocess) if cfg.genes_from == "hvg" else adata


def _positive_csr(matrix) -> sp.csr_matrix:
    m = sp.csr_matrix(matrix, dtype=np.float64)
    m.sum_duplicates()
    m.data[~(m.data > 0)] = 0  # negatives and NaN never rank nor weigh
    m.eliminate_zeros()
    m.sort_indices()
    return m


def top_k_mask(ranking: sp.csr_matrix, k: int) -> np.ndarray:
    """Which stored entries of ``ranking`` (canonical CSR, positive values) are among their row's
    ``k`` largest, ties broken by column (the lower first): exactly the genes
    :func:`semst.shared.preprocess.top_k_genes` lists, vectorised over all rows at once."""
    rows = np.repeat(np.arange(ranking.shape[0]), np.diff(ranking.indptr))
    order = np.lexsort((ranking.indices, -ranking.data, rows))  # row, then value desc, then column
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - ranking.indptr[rows[order]]
    return rank < k


def gene_weight_matrix(cfg: EmbedConfig, adata) -> tuple[sp.csr_matrix, list[str]]:
    """The raw-count weights of every spot over the genes that weigh (spots x genes, float64 CSR, not
    yet normalised), and those genes in the slide's order: with ``gene_weights = "topk"`` each spot's
    top-k_g genes (ranked as stage 1 ranks them) and the genes in some spot's list; with ``"all"``
    every gene of the ``genes_from`` set."""
    source = _ranking_source(cfg, adata)
    names = list(map(str, source.var_names))
    counts = _positive_csr(source.layers["counts"] if "counts" in source.layers else source.X)
    if cfg.gene_weights == "all":
        return counts, names
    ranking = counts if cfg.gene_ranking == "counts" else _positive_csr(source.X)
    chosen = ranking.copy()
    chosen.data = top_k_mask(ranking, cfg.k_genes).astype(np.float64)
    chosen.eliminate_zeros()
    weights = counts.multiply(chosen).tocsr()  # a chosen gene weighs by its count
    weights.eliminate_zeros()
    used = np.flatnonzero(np.diff(weights.tocsc().indptr) > 0)
    return sp.csr_matrix(weights[:, used]), [names[j] for j in used]


def normalised_rows(weights: sp.csr_matrix) -> sp.csr_matrix:
    """Each row divided by its sum (rows without weight stay empty)."""
    totals = np.asarray(weights.sum(axis=1)).ravel()
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale) @ weights)
    out.sort_indices()
    return out


def spot_vectors(weights: sp.csr_matrix, gene_vectors: np.ndarray) -> np.ndarray:
    """``weights @ gene_vectors`` (spots x d, float32), summed in float64."""
    return np.asarray(weights @ np.asarray(gene_vectors, dtype=np.float64), dtype=np.float32)


def gene_space_embeddings(cfg, spot_ids, adata, fix: Callable[[], str]) -> tuple[np.ndarray, dict]:
    """The gene-level semantic vectors of ``cfg``'s slide (a ClusterConfig), one row per spot of
    ``spot_ids``, and the gene table's metadata; a ClusterError ending in ``fix`` if the gene table
    or a gene's vector is missing."""
    from semst.cluster.run import _space_from_meta, _spot_table, cached_vectors
    from semst.cluster.seeds import ClusterError
    from semst.embed.gene_prompts import gene_table_tag
    from semst.shared.datasets import load_dataset

    if adata is None:
        adata = load_dataset(cfg.dataset)
    tag = gene_table_tag(cfg.embed)
    _, table, meta = _spot_table(cfg.cache, cfg.dataset, tag, fix)
    raw, genes = gene_weight_matrix(cfg.embed, adata)
    absent = sorted(set(genes) - set(table["spot_id"].astype(str)))
    if absent:
        raise ClusterError(f"the gene table {tag} of {cfg.dataset} has no vector for {len(absent)} of the "
                           f"{len(genes)} genes this run weighs (e.g. {absent[:3]}). {fix()} first.")
    gene_vectors, _ = cached_vectors(cfg.cache, cfg.dataset, tag, genes, fix)
    by_spot = {str(s): i for i, s in enumerate(adata.obs_names)}
    missing = [s for s in spot_ids if str(s) not in by_spot]
    if missing:
        raise ClusterError(f"{len(missing)} spots of this run are not on {cfg.dataset}'s slide (e.g. {missing[:3]})")
    weights = normalised_rows(raw)[[by_spot[str(s)] for s in spot_ids]]
    space = _space_from_meta(meta)
    return spot_vectors(weights, gene_vectors), {
        "embedding": f"gene-level mean ({cfg.embed.gene_weights}) of {tag}", "space_id": meta.get("space_id"),
        "model": space.model, "pooling": space.pooling, "dim": space.dim, "n_genes": len(genes)}
