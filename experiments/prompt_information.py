"""How much domain information the prompts' gene lists hold, and how much of it the LLM keeps.

A prompt lists a spot's top-k_g genes, so the list caps what any LLM can add to stage 2. This
measures, per prompt setting (recipe, gene ranking, k_g), three things on an annotated slide, each
as the ARI (x100, mean and sd over k-means seeds) of k-means with the annotated number of domains:

- ``lists``: the gene lists alone, as a bag of genes (tf-idf, truncated SVD to ``n_components``);
  the order of the genes in a list is not used, the LLM does see it;
- ``embedding``: the cached LLM embeddings of those prompts (standardised, PCA to ``n_components``),
  when the cache holds them for these settings (else NaN: run ``semst embed`` first);
- ``expression``: the preprocessed expression matrix (PCA to ``n_components``), for reference;
- ``gene_level``: the gene-level vectors of the same k_g (``semantic = "gene"``, top-k_g weights:
  each spot the count-weighted mean of its listed genes' cached vectors), when the cache holds the
  gene table (``semst embed DATASET --semantic gene``), else NaN.

Labels are only used to score; nothing is chosen with them. ``semst prompt-info DATASET``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from semst.shared.errors import SemstError


class PromptInformationError(SemstError, RuntimeError):
    """The measurement cannot run on this slide (e.g. it has no annotation to score against)."""


@dataclass
class InformationRow:
    recipe: str
    gene_ranking: str
    k_genes: int
    n_distinct_prompts: int
    lists: tuple[float, float]  # ARI mean, sd
    embedding: tuple[float, float]  # (nan, nan) where the cache lacks these prompts
    expression: tuple[float, float]
    tag: str  # the spot-table tag the embedding column read
    gene_level: tuple[float, float] = (np.nan, np.nan)  # the gene-level vectors' ARI, where cached


def gene_list_features(gene_lists: list[list[str]], n_components: int = 30, seed: int = 0) -> np.ndarray:
    """Bag-of-genes tf-idf of each spot's list, reduced by truncated SVD (sklearn)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(analyzer=lambda genes: genes).fit_transform(gene_lists)
    n = min(n_components, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
    return TruncatedSVD(n_components=n, random_state=seed).fit_transform(tfidf)


def pca_features(X: np.ndarray, n_components: int = 30, standardise: bool = False, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    if standardise:
        X = StandardScaler().fit_transform(X)
    return PCA(n_components=min(n_components, *X.shape), random_state=seed).fit_transform(X)


def kmeans_ari(features: np.ndarray, labels, seeds=(0, 1, 2)) -> tuple[float, float]:
    """ARI x100 (mean, sd over seeds) of k-means with the annotated number of domains, on annotated spots."""
    import pandas as pd
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    labels = pd.Series(np.asarray(labels, dtype=object))
    known = labels.notna().to_numpy()
    if not known.any():
        raise PromptInformationError("the slide has no annotation (obs['ground_truth']) to score against")
    k = labels[known].nunique()
    scores = [100 * adjusted_rand_score(
        labels[known], KMeans(n_clusters=k, n_init=10, random_state=s).fit_predict(features)[known])
        for s in seeds]
    return float(np.mean(scores)), float(np.std(scores, ddof=1) if len(scores) > 1 else 0.0)


def _cached_embeddings(cfg, spot_ids) -> np.ndarray | None:
    from semst.shared.cache import CacheError, EmbeddingCache, embedding_tag

    try:
        return EmbeddingCache(cfg.cache, create=False).vectors_for(cfg.dataset, embedding_tag(cfg), spot_ids)[0]
    except CacheError:  # not embedded (or not all of it): the row says "not cached"
        return None


def _gene_level_embeddings(cfg, adata, spot_ids) -> np.ndarray | None:
    import dataclasses

    from semst.cluster.gene_space import gene_space_embeddings
    from semst.cluster.run import ClusterError

    try:
        return gene_space_embeddings(dataclasses.replace(cfg, semantic="gene", gene_weights="topk"), spot_ids,
                                     adata, lambda: "Run semst embed --semantic gene")[0]
    except ClusterError:
        return None


def prompt_information(dataset: str, recipes=("semst",), rankings=("counts",), k_values=(20,),
                       seeds=(0, 1, 2), n_components: int = 30, cache: str | None = None, adata=None,
                       log=print) -> list[InformationRow]:
    """One :class:`InformationRow` per (recipe, ranking, k_g) setting; see the module docstring."""
    from semst.cluster.seeds import annotation
    from semst.embed.run import spot_gene_lists
    from semst.shared.cache import embedding_tag
    from semst.shared.config import load_embed_config
    from semst.shared.datasets import load_dataset
    from semst.shared.preprocess import preprocess

    if adata is None:
        adata = load_dataset(dataset)
    labels = annotation(adata).to_numpy()
    spot_ids = adata.obs_names.astype(str)
    # The preprocessing depends on the recipe only: done once per recipe, for the expression
    # reference and for every ranking and k_g.
    prepared: dict[str, tuple] = {}  # recipe -> (preprocessed AnnData, expression ARI)
    rows = []
    for recipe, ranking, k in itertools.product(recipes, rankings, k_values):
        cfg = load_embed_config(dataset, {"recipe": recipe, "gene_ranking": ranking, "k_genes": k,
                                          "cache": str(cache) if cache else None})
        if recipe not in prepared:
            prep = preprocess(adata, cfg.preprocess)
            prepared[recipe] = prep, kmeans_ari(pca_features(prep.X, n_components), labels, seeds)
        prep, expression_ari = prepared[recipe]
        lists = spot_gene_lists(cfg, adata, prep)
        list_ari = kmeans_ari(gene_list_features(lists, n_components), labels, seeds)
        vectors = _cached_embeddings(cfg, spot_ids)
        emb_ari = ((np.nan, np.nan) if vectors is None
                   else kmeans_ari(pca_features(vectors, n_components, standardise=True), labels, seeds))
        genes = _gene_level_embeddings(cfg, adata, spot_ids)
        gene_ari = ((np.nan, np.nan) if genes is None
                    else kmeans_ari(pca_features(genes, n_components, standardise=True), labels, seeds))
        row = InformationRow(recipe, ranking, k, len({tuple(g) for g in lists}), list_ari, emb_ari,
                             expression_ari, embedding_tag(cfg), gene_ari)
        log(format_row(dataset, row))
        rows.append(row)
    return rows


def _cell(pair: tuple[float, float]) -> str:
    return "not cached" if np.isnan(pair[0]) else f"{pair[0]:.1f} ± {pair[1]:.1f}"


HEADER = ("| slide | recipe | ranking | k_g | distinct prompts | gene lists | LLM embedding | gene-level LLM "
          "| expression PCs |\n|---|---|---|---|---|---|---|---|---|")


def format_row(dataset: str, r: InformationRow) -> str:
    return (f"| {dataset} | {r.recipe} | {r.gene_ranking} | {r.k_genes} | {r.n_distinct_prompts} | {_cell(r.lists)} "
            f"| {_cell(r.embedding)} | {_cell(r.gene_level)} | {_cell(r.expression)} |")
