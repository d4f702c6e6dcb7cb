"""The Python API in AnnData terms: ``semst.encode`` (stage 1) and ``semst.domains`` (stage 2).

Both take any AnnData with raw counts in ``X``, gene symbols as ``var_names`` and coordinates in
``obsm["spatial"]`` (a registered dataset or not), check it exactly as the CLI checks a dataset
(same errors), and write into ``adata`` only once everything has succeeded, so a failed call leaves
it as it was. The per-dataset config (``shared/configs/<name>.toml``, else ``default.toml``) gives
every setting not passed as a keyword.
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

LLM_KEY = "X_semst_llm"  # adata.obsm key of the per-spot LLM embedding (encode writes, domains reads)
DOMAIN_KEY = "semst_domain"  # adata.obs key of the domains
LATENT_KEY = "X_semst"  # adata.obsm key of SemST's learned representation (what k-means clusters)


def _name(adata, dataset: str | None) -> str:
    """The slide's name: given, else the dataset it was loaded as, else one derived from its spots and
    genes (so the cache's spot table of an unregistered slide is found again next time)."""
    from semst.shared.hashing import json_hash

    if dataset:
        return dataset
    if isinstance(adata.uns.get("dataset"), str):
        return adata.uns["dataset"]
    return "adata-" + json_hash({"spots": list(map(str, adata.obs_names)), "genes": list(map(str, adata.var_names))}, 12)


def _seed_list(seeds) -> Any:
    """A tuple, range or array of integer seeds as a list of ints; anything else is left as it is
    for the config's type check to refuse ("[cluster] seeds must be a list of integers, got ...")."""
    if isinstance(seeds, (list, tuple, range, np.ndarray)):
        return [int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else s for s in seeds]
    return seeds


def encode(adata, *, dataset: str | None = None, key_added: str = LLM_KEY, progress: bool = True, log=print,
           **embed_options: Any) -> np.ndarray:
    """Stage 1 on ``adata``: every spot's top-k gene prompt through the LLM, via the shared cache.

    Prompts already in the cache are not computed again. ``embed_options`` are ``EmbedConfig`` fields
    (``k_genes``, ``model``, ``pooling``, ``backend``, ``template``, ``cache``, ...). Returns the
    (spots x hidden size) matrix and writes it to ``adata.obsm[key_added]``.
    """
    from semst.embed.run import embed_dataset
    from semst.shared.cache import EmbeddingCache, EmbeddingSpace
    from semst.shared.config import load_embed_config
    from semst.shared.datasets import checked_dataset

    name = _name(adata, dataset)
    checked = checked_dataset(adata, name)
    cfg = load_embed_config(name, embed_options)
    report = embed_dataset(cfg, adata=checked, progress=progress, log=log)
    cache = EmbeddingCache(cfg.cache, create=False)
    table, meta = cache.read_spot_table(name, report.tag)
    vectors = cache.get(EmbeddingSpace(**meta["space"]), table["prompt_hash"].tolist())
    adata.obsm[key_added] = vectors
    return vectors


def domains(adata, *, n_domains: int | str | None = None, seeds=(0,), fusion: str = "film", use_rep: str = LLM_KEY,
            dataset: str | None = None, out_dir: str | Path | None = None, run_name: str | None = None,
            key_added: str = DOMAIN_KEY, connectivity_key: str | None = None, progress: bool = True, log=print,
            **cluster_options: Any) -> dict:
    """Stage 2 on ``adata``: train SemST for each seed, cluster, and return the run's summary.

    The semantic vectors are ``adata.obsm[use_rep]`` (run :func:`encode` first), unless ``fusion``
    is "none" (SemST without the LLM). ``n_domains`` defaults to the number of annotated domains in
    ``obs["ground_truth"]``; ``"auto"`` / ``"auto:LO-HI"`` chooses it from the learned embeddings by
    stability. ``cluster_options`` are ``ClusterConfig`` fields (``epochs``, ``spatial_k``,
    ``spatial={"rule": "knn", "k": 8}``, ``refine``, ...). ``connectivity_key`` (e.g.
    ``"spatial_connectivities"``) trains on the graph in ``adata.obsp[connectivity_key]`` (built by
    :func:`semst.gr.spatial_graph` or ``squidpy.gr.spatial_neighbors``) instead of building the
    config's, with the config rule's self-loops added (:func:`semst.experiments.gr.given_graph`).
    Writes ``adata.obs[key_added]`` (the consensus of the seeds' domains with several seeds, else the
    seed's), ``adata.obsm["X_semst"]`` (first seed) and
    ``adata.uns["semst"]``; with ``out_dir``, also the run folder that ``semst cluster`` writes,
    ``<out_dir>/<dataset>/<run_name>`` (checked before any work, as the CLI checks it: ``run_name``
    is one folder name, and an existing folder of that name is replaced only if semst wrote it). Returns
    ``{"dataset", "n_domains", "per_seed", "summary", "consensus", "auto_k", "run_dir"}``.
    """
    from semst.cluster.run import cluster_dataset
    from semst.shared.config import ConfigError, config_to_toml, load_cluster_config
    from semst.shared.datasets import checked_dataset

    if run_name is not None and out_dir is None:
        raise ConfigError(f"run_name={run_name!r} names a run folder, which is only written with out_dir=: "
                          f"pass out_dir too, or drop run_name")
    name = _name(adata, dataset)
    checked = checked_dataset(adata, name)
    # A slide whose config sets no spatial graph gets default.toml's rule (its 6 nearest spots), as in the CLI.
    overrides = {**cluster_options, "n_domains": n_domains, "seeds": _seed_list(seeds), "fusion": fusion}
    cfg = load_cluster_config(name, overrides)
    spatial = None
    if connectivity_key is not None:  # the user's graph, with the self-loops the config's rule would add
        from semst.cluster.spatial import spatial_rule
        from semst.experiments.gr import given_graph

        spatial = given_graph(adata, connectivity_key, spatial_rule(cfg).self_loops)
    semantic = None
    if cfg.fusion != "none":
        if use_rep not in adata.obsm:
            raise ConfigError(f"fusion {cfg.fusion!r} needs the LLM embedding in adata.obsm[{use_rep!r}]: run "
                              f"semst.encode(adata) first, or pass fusion='none' (SemST without the LLM)")
        semantic = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    report = cluster_dataset(cfg, out_dir=out_dir or "results", run_name=run_name, adata=checked,
                             progress=progress, log=log, write=out_dir is not None, semantic=semantic,
                             spatial=spatial)
    first = cfg.seeds[0]
    adata.obs[key_added] = pd.Categorical(report.main_labels.astype(str))
    adata.obsm[LATENT_KEY] = report.latents[first]
    # JSON text, as in the run folder's semst.h5ad: nested dicts of lists do not round-trip through .h5ad
    adata.uns["semst"] = {"config": config_to_toml(cfg), "summary": json.dumps(report.summary),
                          "per_seed": json.dumps(report.per_seed)}
    return {"dataset": name, "n_domains": report.n_domains, "per_seed": report.per_seed,
            "summary": report.summary, "consensus": report.consensus_metrics,
            "auto_k": report.auto.summary() if report.auto is not None else None, "run_dir": str(report.run_dir) if out_dir is not None else None}
