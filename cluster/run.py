"""Stage 2 end to end: cached embeddings + expression -> SemST -> spatial domains -> outputs.

Stage 2 never runs an LLM. It joins the dataset's spots with the spot -> prompt-hash table that
`semst embed` wrote, reads the vectors from the shared cache, and fails with the exact `make embed`
call to run when they are absent or were written for another embedding setting.

Nothing here looks at the annotation except to *report* metrics: the embedding is the last epoch's,
k-means runs with a fixed number of domains, and every seed's result is kept.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import ClusterConfig
from shared.hashing import json_hash


class ClusterError(RuntimeError):
    """Stage 2 cannot run as asked; the message says why and what to do."""


@dataclass
class ClusterReport:
    dataset: str
    run_dir: Path
    n_spots: int
    n_domains: int
    per_seed: list[dict] = field(default_factory=list)  # seed, seconds, metrics (if annotated)
    summary: dict = field(default_factory=dict)  # metric -> {"mean", "sd"}
    labels: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> domain per spot


def embed_command(cfg: ClusterConfig) -> str:
    """The exact stage-1 call that writes the embeddings this config asks for."""
    e = cfg.embed
    make = f"make embed DATASET={cfg.dataset}" + (f" MODEL={e.model}" if e.model != "default" else "")
    options = [f"--{flag} {value}" for flag, value, default in (
        ("k-genes", e.k_genes, 20), ("pooling", e.pooling, "mean"), ("template", e.template, "semst"))
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
    from embed.cache import CacheError, EmbeddingCache
    from embed.run import embedding_tag

    tag = embedding_tag(cfg.embed) if cfg.embedding in ("llm", "random") else cfg.embedding
    try:
        cache = EmbeddingCache(cfg.cache, create=False)
        table, meta = cache.read_spot_table(cfg.dataset, tag)
    except CacheError as exc:
        raise ClusterError(f"no cached embeddings for {cfg.dataset} with tag {tag} in {cfg.cache}: {exc}. "
                           f"Run {embed_command(cfg)} first.") from None
    space = _space_from_meta(meta)
    if cfg.embedding == "random":
        rng = np.random.default_rng(seed)
        vectors = rng.normal(0.0, cfg.random_embedding_std, size=(len(spot_ids), space.dim)).astype(np.float32)
        return vectors, {"embedding": f"random N(0, {cfg.random_embedding_std}) x {space.dim}"}
    by_spot = pd.Series(table["prompt_hash"].to_numpy(), index=table["spot_id"].astype(str).to_numpy())
    missing = pd.Index(spot_ids).difference(by_spot.index)
    if len(missing):
        raise ClusterError(f"the spot table {tag} covers {len(by_spot)} spots but {len(missing)} of "
                           f"{cfg.dataset}'s {len(spot_ids)} spots are not in it (e.g. {list(missing[:3])}); "
                           f"it was written for a subset. Run {embed_command(cfg)} again.")
    hashes = by_spot.loc[list(spot_ids)].tolist()
    try:
        vectors = cache.get(space, hashes)
    except CacheError as exc:
        raise ClusterError(f"{exc}. Run {embed_command(cfg)} to compute them.") from None
    return vectors, {"embedding": tag, "space_id": meta.get("space_id"), "model": space.model,
                     "pooling": space.pooling, "dim": space.dim}


def _space_from_meta(meta: dict):
    from embed.cache import EmbeddingSpace
    return EmbeddingSpace(**meta["space"])


def resolve_n_domains(cfg: ClusterConfig, ground_truth: pd.Series) -> int:
    n_spots = len(ground_truth)
    n = cfg.n_domains
    if n is None:
        n = int(ground_truth.dropna().nunique())
        if n < 2:
            raise ClusterError(f"{cfg.dataset} has no usable annotation ({n} annotated domains): "
                               f"pass --n-domains K")
    if n < 2 or n > n_spots:
        raise ClusterError(f"n-domains must be between 2 and the number of spots ({n_spots}), got {n}")
    return n


def annotation(adata) -> pd.Series:
    """The slide's ground truth per spot (all NaN where the slide has no annotation)."""
    if "ground_truth" in adata.obs:
        return adata.obs["ground_truth"]
    return pd.Series([np.nan] * adata.n_obs, index=adata.obs_names)


def slide_spatial_graph(cfg: ClusterConfig, coords):
    """The spatial graph the config asks for: ``spatial_k`` nearest spots if set, else ``radius``."""
    from cluster.graphs import spatial_graph

    return spatial_graph(coords, radius=cfg.radius if cfg.spatial_k is None else None, k=cfg.spatial_k)


def default_run_name(cfg: ClusterConfig) -> str:
    """Readable and unique per setting: fusion, embedding, and a hash of the whole config."""
    settings = dataclasses.asdict(cfg)
    settings.pop("seeds")  # seeds add rows to one run; they don't make another run
    embedding = "none" if cfg.fusion == "none" else cfg.embedding.replace("/", "_")
    return f"{cfg.fusion}-{embedding}-{json_hash(settings, 8)}"


def cluster_dataset(cfg: ClusterConfig, out_dir: str | Path = "results", run_name: str | None = None,
                    adata=None, progress: bool = True, log=print, write: bool = True) -> ClusterReport:
    """Train SemST for every seed of ``cfg``, cluster, evaluate where annotated, and write outputs."""
    from cluster.domains import kmeans_domains
    from cluster.graphs import expression_graph
    from cluster.metrics import cluster_metrics
    from cluster.train import train_semst
    from shared.datasets import check_coordinates, load_dataset
    from shared.preprocess import preprocess

    if adata is None:
        adata = load_dataset(cfg.dataset)
    check_coordinates(adata)
    ground_truth = annotation(adata)
    n_domains = resolve_n_domains(cfg, ground_truth)
    # Embeddings first: their absence is the most common mistake and the cheapest to report.
    semantic, source = semantic_embeddings(cfg, list(adata.obs_names), cfg.seeds[0])

    prep = preprocess(adata, cfg.preprocess)
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    sgraph = slide_spatial_graph(cfg, coords)
    fgraph = expression_graph(prep.X, cfg.expr_k, cfg.expr_pcs)
    log(f"{cfg.dataset}: {adata.n_obs} spots, {prep.n_vars} genes, {n_domains} domains; spatial graph "
        f"{sgraph.num_edges()} edges, expression graph {fgraph.num_edges()} edges; embedding {source['embedding']}")

    report = ClusterReport(cfg.dataset, Path(out_dir) / cfg.dataset / (run_name or default_run_name(cfg)),
                           adata.n_obs, n_domains)
    histories, embeddings = {}, {}
    for seed in cfg.seeds:
        if cfg.embedding == "random" and seed != cfg.seeds[0]:
            semantic, source = semantic_embeddings(cfg, list(adata.obs_names), seed)
        t0 = time.perf_counter()
        result = train_semst(prep.X, prep.layers["counts"], prep.obs["size_factor"].to_numpy(),
                             sgraph, fgraph, semantic, cfg, seed, progress=progress)
        labels = kmeans_domains(result.embedding, n_domains, seed)
        seconds = time.perf_counter() - t0
        row = {"seed": seed, "seconds": round(seconds, 2)}
        if ground_truth.notna().any():
            row.update(cluster_metrics(ground_truth.to_numpy(), labels))
        report.per_seed.append(row)
        report.labels[seed] = labels
        histories[seed], embeddings[seed] = result.history, result.embedding
        log("seed {}: {}".format(seed, ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.items() if k != "seed")))
    report.summary = summarise(report.per_seed)
    if report.summary:
        log("mean +- sd over seeds " + ",".join(map(str, cfg.seeds)) + ": " + ", ".join(
            f"{k} {v['mean']:.2f} +- {v['sd']:.2f}" for k, v in report.summary.items()))
    if write:
        from cluster.outputs import write_outputs
        write_outputs(report, cfg, adata, ground_truth, embeddings, histories, source)
        log(f"results: {report.run_dir}")
    return report


METRICS = ("ARI", "NMI", "ACC", "F1_macro", "F1_weighted")


def summarise(per_seed: list[dict]) -> dict:
    """Mean and sample sd (ddof=1; 0 for a single seed) of each metric over seeds."""
    out = {}
    for m in METRICS:
        values = [r[m] for r in per_seed if m in r]
        if values:
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[m] = {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}
    return out
