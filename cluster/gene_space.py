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

BLOCK_SPOTS = 65_536  # spots per block of the product: a float64 block of 576-wide vectors is ~300 MB


def spot_vectors(weights: sp.csr_matrix, gene_vectors: np.ndarray) -> np.ndarray:
    """``weights @ gene_vectors`` (spots x d, float32), summed in float64 block by block of spots
    (each row's sum is the same whatever the block size: rows are independent)."""
    genes = np.asarray(gene_vectors, dtype=np.float64)
    out = np.empty((weights.shape[0], genes.shape[1]), dtype=np.float32)
    for lo in range(0, weights.shape[0], BLOCK_SPOTS):
        out[lo:lo + BLOCK_SPOTS] = weights[lo:lo + BLOCK_SPOTS] @ genes
    return out


def gene_space_embeddings(cfg, spot_ids, adata, fix: Callable[[], str]) -> tuple[np.ndarray, dict]:
    """The gene-level semantic vectors of the slide ``cfg`` (an EmbedConfig) names, one row per spot
    of ``spot_ids``, and where they came from; a ClusterError ending in ``fix`` if the gene table or
    a gene's vector is missing."""
    from semst.cluster.run import cached_vectors, spot_table_meta
    from semst.cluster.seeds import ClusterError
    from semst.shared.datasets import load_dataset
    from semst.shared.genes import gene_table_tag, gene_weight_matrix, normalised_rows

    if adata is None:
        adata = load_dataset(cfg.dataset)
    tag = gene_table_tag(cfg)
    from semst.shared.cache import EmbeddingCache

    spot_table_meta(cfg.cache, cfg.dataset, tag, fix)  # a ClusterError naming the fix if there is no table
    table, _ = EmbeddingCache(cfg.cache, create=False).read_spot_table(cfg.dataset, tag)
    raw, genes = gene_weight_matrix(cfg, adata)
    absent = sorted(set(genes) - set(table["spot_id"].astype(str)))
    if absent:
        raise ClusterError(f"the gene table {tag} of {cfg.dataset} has no vector for {len(absent)} of the "
                           f"{len(genes)} genes this run weighs (e.g. {absent[:3]}). {fix()} first.")
    gene_vectors, meta = cached_vectors(cfg.cache, cfg.dataset, tag, genes, fix)
    by_spot = {str(s): i for i, s in enumerate(adata.obs_names)}
    missing = [s for s in spot_ids if str(s) not in by_spot]
    if missing:
        raise ClusterError(f"{len(missing)} spots of this run are not on {cfg.dataset}'s slide (e.g. {missing[:3]})")
    weights = normalised_rows(raw)[[by_spot[str(s)] for s in spot_ids]]
    space = meta.embedding_space()
    return spot_vectors(weights, gene_vectors), {
        "embedding": f"gene-level mean ({cfg.gene_weights}) of {tag}", "space_id": meta.space_id,
        "model": space.model, "pooling": space.pooling, "dim": space.dim, "n_genes": len(genes)}
