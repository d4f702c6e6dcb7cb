"""Stage 2 for SemST: cached embeddings + expression -> SemST -> spatial domains -> outputs.

Stage 2 never runs an LLM. It joins the dataset's spots with the spot -> prompt-hash table that
`semst embed` wrote, reads the vectors from the shared cache, and fails with the exact `make embed`
call to run when they are absent or were written for another embedding setting. The per-seed loop,
k-means and metrics are :mod:`semst.cluster.runner`'s, shared with STAGATE and the baselines.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from semst.cluster.outputs import check_free_space, prepare_run_folder, write_outputs
from semst.cluster.runner import ClusterError, ClusterReport, load_slide, run_seeds
from semst.shared.config import ClusterConfig, config_identity
from semst.shared.hashing import json_hash


def embed_command(cfg: ClusterConfig) -> str:
    """The exact stage-1 call that writes the embeddings this config asks for."""
    from semst.shared.recipes import recipe_values

    e = cfg.embed
    make = f"make embed DATASET={cfg.dataset}" + (f" MODEL={e.model}" if e.model != "default" else "")
    recipe = {"k_genes": 20, "gene_ranking": "counts", **recipe_values(e.recipe, cfg.dataset, "embed")}
    options = [f"--{flag} {value}" for flag, value, default in (
        ("recipe", e.recipe, "semst"),
        ("k-genes", e.k_genes, recipe["k_genes"]), ("gene-ranking", e.gene_ranking, recipe["gene_ranking"]),
        ("pooling", e.pooling, "mean"), ("template", e.template, "semst"))
        if value != default]
    if not options:
        return f"`{make}`" + (f" (with --cache {cfg.cache})" if cfg.cache != e.cache else "")
    cli = f"semst embed {cfg.dataset} --cache {cfg.cache}" + (f" --model {e.model}" if e.model != "default" else "")
    return f"`{cli} {' '.join(options)}`"


def semantic_embeddings(cfg: ClusterConfig, spot_ids, seed: int) -> tuple[np.ndarray | None, dict]:
    """The per-spot semantic vectors the FSM reads, and where they came from.

    ``embedding``: "llm" = the cached LLM embeddings for this config's embed settings; "random" =
    N(0, random_embedding_std) of the same width (the paper's control, drawn per seed); anything else
    is a spot-table tag in the cache (another model, prompt template or encoder).
    """
    if cfg.fusion == "none":
        return None, {"embedding": "none (w/o LLM)"}
    from semst.shared.cache import embedding_tag

    tag = embedding_tag(cfg.embed) if cfg.embedding in ("llm", "random") else cfg.embedding
    fix = f"Run {embed_command(cfg)}"
    if cfg.embedding == "random":
        _, _, meta = _spot_table(cfg.cache, cfg.dataset, tag, fix)
        dim = _space_from_meta(meta).dim
        rng = np.random.default_rng(seed)
        vectors = rng.normal(0.0, cfg.random_embedding_std, size=(len(spot_ids), dim)).astype(np.float32)
        return vectors, {"embedding": f"random N(0, {cfg.random_embedding_std}) x {dim}"}
    vectors, meta = cached_vectors(cfg.cache, cfg.dataset, tag, spot_ids, fix)
    space = _space_from_meta(meta)
    return vectors, {"embedding": tag, "space_id": meta.get("space_id"), "model": space.model,
                     "pooling": space.pooling, "dim": space.dim}


def _spot_table(cache_path, dataset: str, tag: str, fix: str):
    from semst.shared.cache import CacheError, EmbeddingCache

    try:
        cache = EmbeddingCache(cache_path, create=False)
        table, meta = cache.read_spot_table(dataset, tag)
    except CacheError as exc:
        raise ClusterError(f"no cached embeddings for {dataset} with tag {tag} in {cache_path}: {exc}. "
                           f"{fix} first.") from None
    return cache, table, meta


def cached_vectors(cache_path, dataset: str, tag: str, spot_ids, fix: str = "Run semst embed") -> tuple[np.ndarray, dict]:
    """The cached vectors of ``dataset``'s spot table ``tag``, one row per spot of ``spot_ids`` in
    that order, and the table's metadata; a ClusterError ending in ``fix`` if any is missing."""
    from semst.shared.cache import CacheError

    cache, table, meta = _spot_table(cache_path, dataset, tag, fix)
    space = _space_from_meta(meta)
    by_spot = pd.Series(table["prompt_hash"].to_numpy(), index=table["spot_id"].astype(str).to_numpy())
    missing = pd.Index(spot_ids).difference(by_spot.index)
    if len(missing):
        raise ClusterError(f"the spot table {tag} covers {len(by_spot)} spots but {len(missing)} of "
                           f"{dataset}'s {len(spot_ids)} spots are not in it (e.g. {list(missing[:3])}); "
                           f"it was written for a subset. {fix} again.")
    hashes = by_spot.loc[list(spot_ids)].tolist()
    try:
        return cache.get(space, hashes), meta
    except CacheError as exc:
        raise ClusterError(f"{exc}. {fix} to compute them.") from None


def _space_from_meta(meta: dict):
    from semst.shared.cache import EmbeddingSpace
    return EmbeddingSpace(**meta["space"])


def default_run_name(cfg: ClusterConfig) -> str:
    """Readable and unique per setting: fusion, embedding, and a hash of the whole config; always one
    plain folder name (anything but letters, digits and ``.+-_`` in the embedding's name becomes ``_``)."""
    settings = config_identity(cfg)  # the names runs had before the spatial table, for the same settings
    settings.pop("seeds")  # seeds add rows to one run; they don't make another run
    settings.pop("threads")  # how fast, not what (recorded in metrics.json)
    embedding = "none" if cfg.fusion == "none" else re.sub(r"[^\w.+-]", "_", cfg.embedding, flags=re.ASCII)
    return f"{cfg.fusion}-{embedding}-{json_hash(settings, 8)}"


def cluster_dataset(cfg: ClusterConfig, out_dir: str | Path = "results", run_name: str | None = None,
                    adata=None, progress: bool = True, log=print, write: bool = True,
                    semantic: np.ndarray | None = None, spatial=None) -> ClusterReport:
    """Train SemST (:class:`semst.cluster.methods.SemST`) for every seed of ``cfg``, cluster, evaluate
    where annotated, and write outputs.

    With ``write``, the outputs go to ``<out_dir>/<dataset>/<run_name>`` (default
    :func:`default_run_name`); before any work, the run name must be one folder name and the folder
    free or an earlier semst run (:func:`semst.cluster.outputs.prepare_run_folder`).
    ``semantic`` (spots x d) gives the semantic vectors directly (e.g. from ``semst.encode``)
    instead of reading them from the cache; ``cfg.embedding`` then only names them. ``spatial`` (a
    :class:`semst.cluster.spatial.SpatialRule`, e.g. a ``GivenGraph``) builds the spatial graph
    instead of the config's rule, which is checked before anything else.
    """
    from semst.cluster.methods import SemST
    from semst.cluster.spatial import spatial_rule

    spatial = spatial or spatial_rule(cfg)
    name = default_run_name(cfg) if run_name is None else run_name
    if write:
        run_dir = prepare_run_folder(out_dir, cfg.dataset, name, log)
    else:  # nothing is written: the name only labels the report
        run_dir = Path(out_dir) / cfg.dataset / (name or default_run_name(cfg))
    slide = load_slide(cfg, adata, spatial)
    if write:  # a disk too full for the outputs stops here, not after training
        check_free_space(run_dir, slide.adata, len(cfg.seeds), cfg.hidden2)
    method = SemST(slide, progress=progress, log=log, semantic=semantic)
    report = run_seeds(slide, method.fit, run_dir, log)
    if write:
        write_outputs(report, cfg, slide.adata, slide.truth, method.source)
        log(f"results: {report.run_dir}")
    return report
