"""The Python API in AnnData terms: ``semst.encode`` (stage 1) and ``semst.domains`` (stage 2),
also ``semst.tl.encode`` / ``semst.tl.domains`` (:mod:`semst.experiments.tl`).

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

    Prompts already in the cache are not computed again; new ones are added to it.

    Parameters
    ----------
    adata
        Raw counts in ``X``, gene symbols as ``var_names``, coordinates in ``obsm["spatial"]``;
        checked as ``semst embed`` checks a dataset (a :class:`~semst.shared.datasets.DatasetError`
        says what is wrong).
    dataset
        The slide's name in the cache's spot tables and the config to read
        (``shared/configs/<dataset>.toml``, else ``default.toml``). Default: ``adata.uns["dataset"]``,
        else a name derived from the spot and gene names.
    key_added
        The ``adata.obsm`` key to write the embedding to.
    progress
        Show a progress bar.
    log
        Where progress lines go (a function taking one string).
    **embed_options
        ``EmbedConfig`` fields (``k_genes``, ``model``, ``pooling``, ``backend``, ``template``,
        ``cache``, ...); every one not given comes from the config.

    Returns
    -------
    numpy.ndarray
        The (spots x hidden size) embedding, one row per spot of ``adata`` in its order.

        Sets, only once the whole call has succeeded:

        ``adata.obsm[key_added]``  (default ``"X_semst_llm"``)
            that embedding.
    """
    from semst.embed.run import embed_dataset
    from semst.shared.cache import EmbeddingCache
    from semst.shared.config import load_embed_config
    from semst.shared.datasets import checked_dataset

    name = _name(adata, dataset)
    checked = checked_dataset(adata, name)
    cfg = load_embed_config(name, embed_options)
    report = embed_dataset(cfg, adata=checked, progress=progress, log=log)
    vectors, _ = EmbeddingCache(cfg.cache, create=False).vectors_for(name, report.tag, checked.obs_names)
    adata.obsm[key_added] = vectors
    return vectors


def domains(adata, *, n_domains: int | str | None = None, seeds=(0,), fusion: str = "film", use_rep: str = LLM_KEY,
            dataset: str | None = None, out_dir: str | Path | None = None, run_name: str | None = None,
            key_added: str = DOMAIN_KEY, connectivity_key: str | None = None, progress: bool = True, log=print,
            **cluster_options: Any) -> dict:
    """Stage 2 on ``adata``: train SemST for each seed, cluster, and return the run's summary.

    Parameters
    ----------
    adata
        Raw counts in ``X``, gene symbols as ``var_names``, coordinates in ``obsm["spatial"]``
        (checked as ``semst cluster`` checks a dataset); an annotation in ``obs["ground_truth"]``
        is only used for metrics and for the default ``n_domains``.
    n_domains
        The number of domains: an integer >= 2, ``"auto"`` / ``"auto:LO-HI"`` (chosen from the learned
        embeddings by stability, :func:`semst.tl.auto_k`'s rule), or None for the number of
        annotated domains in ``obs["ground_truth"]``.
    seeds
        One training run per seed; with several, ``obs[key_added]`` is their consensus.
    fusion
        How the LLM embedding enters SemST (``"film"``, ``"concat"``, ``"add"``,
        ``"cross-attention"``), or ``"none"`` (SemST without the LLM: no :func:`encode` needed).
    use_rep
        The ``adata.obsm`` key of the LLM embedding (run :func:`encode` first).
    dataset
        The slide's name (config, run folder); default as in :func:`encode`.
    out_dir
        Also write the run folder that ``semst cluster`` writes, ``<out_dir>/<dataset>/<run_name>``
        (checked before any work, as the CLI checks it: an existing folder of that name is replaced
        only if semst wrote it).
    run_name
        The run folder's name (one folder name; only with ``out_dir``).
    key_added
        The ``adata.obs`` key to write the domains to.
    connectivity_key
        Train on the graph in ``adata.obsp[connectivity_key]`` (e.g. ``"spatial_connectivities"``,
        built by :func:`semst.gr.spatial_graph` or ``squidpy.gr.spatial_neighbors``) instead of
        building the config's, with the config rule's self-loops added.
    progress
        Show progress bars.
    log
        Where progress lines go (a function taking one string).
    **cluster_options
        ``ClusterConfig`` fields (``epochs``, ``spatial={"rule": "knn", "k": 8}`` or the old
        ``spatial_k``, ``refine``, ``auto_runs``, ...); every one not given comes from the config.

    Returns
    -------
    dict
        ``{"dataset", "n_domains", "per_seed", "summary", "consensus", "auto_k", "run_dir"}``: the
        number of domains used, per-seed rows (seconds, metrics where annotated), mean +- sd of the
        metrics, the consensus's metrics, the stability curve's summary (``"auto..."`` only), and the
        run folder (``out_dir`` only).

        Sets, only once the whole call has succeeded:

        ``adata.obs[key_added]``  (default ``"semst_domain"``)
            the domains (categorical; the consensus of the seeds with several seeds, else the seed's).
        ``adata.obsm["X_semst"]``
            SemST's learned representation of the first seed (what k-means clustered).
        ``adata.uns["semst"]``
            a dict of JSON texts (nested lists do not round-trip through ``.h5ad``): ``"config"`` (the
            resolved config, TOML), ``"summary"``, ``"per_seed"``, ``"losses"`` (seed -> loss term ->
            per-epoch values, what :func:`semst.pl.losses` draws) and, with ``"auto..."``,
            ``"stability"`` (the curve's summary, what :func:`semst.pl.stability` draws).
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
    # JSON text, as in the run folder's semst.h5ad: nested dicts of lists do not round-trip through .h5ad
    uns = {"config": config_to_toml(cfg), "summary": json.dumps(report.summary),
           "per_seed": json.dumps(report.per_seed),
           "losses": json.dumps(report.histories, default=float)}  # what semst.pl.losses draws
    if report.auto is not None:
        uns["stability"] = json.dumps(report.auto.summary())  # what semst.pl.stability draws
    adata.obs[key_added] = pd.Categorical(report.main_labels.astype(str))
    adata.obsm[LATENT_KEY] = report.latents[first]
    adata.uns["semst"] = uns
    return {"dataset": name, "n_domains": report.n_domains, "per_seed": report.per_seed,
            "summary": report.summary, "consensus": report.consensus_metrics,
            "auto_k": report.auto.summary() if report.auto is not None else None, "run_dir": str(report.run_dir) if out_dir is not None else None}
