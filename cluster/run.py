"""Stage 2 for SemST: cached embeddings + expression -> SemST -> spatial domains -> outputs.

Stage 2 never runs an LLM. It joins the dataset's spots with the spot -> prompt-hash table that
`semst embed` wrote, reads the vectors from the shared cache, and fails with the exact `make embed`
call to run when they are absent or were written for another embedding setting. The per-seed loop,
k-means and metrics are :mod:`semst.cluster.seeds`'s, shared with STAGATE and the baselines.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from semst.cluster.outputs import check_free_space, prepare_run_folder, write_outputs
from semst.cluster.seeds import ClusterError, ClusterReport, load_slide, run_seeds
from semst.shared.config import ClusterConfig, ConfigError, config_identity
from semst.shared.hashing import json_hash

if TYPE_CHECKING:
    from semst.shared.cache import SpotTableMeta

# The `semst embed` options that change which embeddings are written, in the order they are worked
# out: the recipe first, since it supplies the defaults of the others.
EMBED_OPTIONS = (("recipe", "--recipe"), ("model", "--model"), ("k_genes", "--k-genes"),
                 ("gene_ranking", "--gene-ranking"), ("pooling", "--pooling"), ("template", "--template"),
                 ("semantic", "--semantic"), ("gene_weights", "--gene-weights"))


def embed_command(cfg: ClusterConfig, config_path: str | Path | None = None) -> str:
    """The stage-1 call that writes the embeddings ``cfg`` asks for, in backticks, as a command that runs.

    It repeats the cache, the --config file the run was given if its [embed] or [preprocess] settings
    matter, and every option whose value a plain `semst embed DATASET` would not resolve to by itself
    -- found by resolving the suggested options exactly as `semst embed` does.
    `make embed DATASET=.. [MODEL=..] [CACHE=..]` when those say it all.
    """
    from semst.shared.paths import default_cache

    given, exact = _embed_options(cfg, None)
    if not exact and config_path is not None:
        given, exact = _embed_options(cfg, config_path)
    else:
        config_path = None  # the file sets nothing stage 1 reads
    plain = all(shlex.quote(str(v)) == str(v) for v in (cfg.dataset, *given.values()))
    if exact and plain and config_path is None and set(given) <= {"cache", "model"}:
        words = [f"DATASET={cfg.dataset}"] + ([f"MODEL={given['model']}"] if "model" in given else [])
        if str(cfg.cache) != str(default_cache()):
            words.append(f"CACHE={cfg.cache}")
        return f"`make embed {' '.join(words)}`"
    words = ["semst", "embed", cfg.dataset, "--cache", str(cfg.cache)]
    if config_path is not None:
        words += ["--config", str(config_path)]
    words += [word for name, flag in EMBED_OPTIONS if name in given for word in (flag, str(given[name]))]
    command = f"`{' '.join(shlex.quote(w) for w in words)}`"
    if exact:
        return command
    # A config built in code, or a file's settings no option sets (genes_from, preprocess, dtype).
    return command + " with this run's [embed] and [preprocess] settings in a --config file"


def _embed_options(cfg: ClusterConfig, config_path) -> tuple[dict, bool]:
    """The options (name -> value) that make `semst embed` resolve ``cfg.embed``'s embeddings, and
    whether they do so exactly."""
    from semst.shared.config import load_embed_config

    wanted = cfg.embed
    given: dict = {"cache": str(cfg.cache)}
    for name, _ in EMBED_OPTIONS:
        if getattr(load_embed_config(cfg.dataset, given, config_path), name) != getattr(wanted, name):
            given[name] = getattr(wanted, name)
    got = load_embed_config(cfg.dataset, given, config_path)
    exact = (semantic_tag(got), got.model, got.pooling, got.dtype) == (
        semantic_tag(wanted), wanted.model, wanted.pooling, wanted.dtype)
    return given, exact


def semantic_tag(embed_cfg) -> str:
    """The table stage 1 writes for these embed settings: the spot table, or with ``semantic =
    "gene"`` the gene table (:func:`semst.embed.gene_prompts.gene_table_tag`)."""
    from semst.shared.cache import embedding_tag

    if embed_cfg.semantic == "gene":
        from semst.shared.genes import gene_table_tag
        return gene_table_tag(embed_cfg)
    return embedding_tag(embed_cfg)


def check_embed_possible(cfg: ClusterConfig, adata) -> None:
    """Refuse, before any work, embed settings that no `semst embed` run can satisfy on this slide
    (a hint to run one would suggest a command that fails in its turn)."""
    from semst.shared.preprocess import check_gene_supply

    if cfg.fusion == "none" or cfg.embedding not in ("llm", "random"):
        return
    e = cfg.embed
    if e.genes_from == "hvg":  # the prompts list HVGs: min(n_top_genes, genes passing min_cells)
        n_genes = min(e.preprocess.n_top_genes, check_gene_supply(adata, e.preprocess))
        what = "genes preprocessing keeps (HVGs)"
    else:
        n_genes, what = adata.n_vars, "genes"
    if e.k_genes > n_genes:
        raise ClusterError(f"k_genes={e.k_genes} is larger than the {n_genes} {what} of {cfg.dataset}, so no "
                           f"`semst embed` run can write these embeddings; use --k-genes {n_genes} or fewer")


def semantic_embeddings(cfg: ClusterConfig, spot_ids, seed: int, config_path: str | Path | None = None,
                        adata=None) -> tuple[np.ndarray | None, dict]:
    """The per-spot semantic vectors the FSM reads, and where they came from.

    ``embedding``: "llm" = the cached LLM embeddings for this config's embed settings; "random" =
    N(0, random_embedding_std) of the same width (the paper's control, drawn per seed); anything else
    is a spot-table tag in the cache (another model, prompt template or encoder). ``config_path``:
    the --config file the run was given, repeated in the `semst embed` hint when they are missing.
    With ``semantic = "gene"`` the "llm" vectors are the expression-weighted means of the cached gene
    vectors (:mod:`semst.cluster.gene_space`), computed from ``adata`` (the raw slide; loaded if None).
    """
    if cfg.fusion == "none":
        return None, {"embedding": "none (w/o LLM)"}
    tag = semantic_tag(cfg.embed) if cfg.embedding in ("llm", "random") else cfg.embedding

    def fix() -> str:  # worked out only when needed
        if cfg.embedding not in ("llm", "random"):  # a tag of the user's: no embed setting of ours writes it
            return f"Look up the cache's tags with `semst cache info --cache {shlex.quote(str(cfg.cache))}`"
        try:
            return f"Run {embed_command(cfg, config_path)}"
        except ConfigError as exc:  # the config file changed since: still say what is missing
            return f"Run `semst embed {cfg.dataset}` with this run's embed settings ({exc})"

    if cfg.embedding == "random":
        dim = spot_table_meta(cfg.cache, cfg.dataset, tag, fix).embedding_space().dim
        rng = np.random.default_rng(seed)
        vectors = rng.normal(0.0, cfg.random_embedding_std, size=(len(spot_ids), dim)).astype(np.float32)
        return vectors, {"embedding": f"random N(0, {cfg.random_embedding_std}) x {dim}"}
    if cfg.embedding == "llm" and cfg.embed.semantic == "gene":
        from semst.cluster.gene_space import gene_space_embeddings
        return gene_space_embeddings(cfg.embed, spot_ids, adata, fix)
    vectors, meta = cached_vectors(cfg.cache, cfg.dataset, tag, spot_ids, fix)
    space = meta.space
    return vectors, {"embedding": tag, "space_id": meta.space_id, "model": space.model,
                     "pooling": space.pooling, "dim": space.dim}


def _fix_text(fix: str | Callable[[], str]) -> str:
    return fix() if callable(fix) else fix


def _no_embeddings(cache_path, dataset: str, tag: str, exc, fix: str | Callable[[], str]) -> ClusterError:
    return ClusterError(f"no cached embeddings for {dataset} with tag {tag} in {cache_path}: {exc}. "
                        f"{_fix_text(fix)} first.")


def _open_cache(cache_path, dataset: str, tag: str, fix: str | Callable[[], str]):
    from semst.shared.cache import CacheError, EmbeddingCache

    try:
        return EmbeddingCache(cache_path, create=False)
    except CacheError as exc:
        raise _no_embeddings(cache_path, dataset, tag, exc, fix) from None


def spot_table_meta(cache_path, dataset: str, tag: str,
                    fix: str | Callable[[], str] = "Run semst embed") -> SpotTableMeta:
    """The typed metadata (shared.cache.SpotTableMeta) of ``dataset``'s spot table ``tag``, which must
    name its embedding space; a ClusterError ending in ``fix`` if it cannot be read."""
    from semst.shared.cache import SpotTableError

    cache = _open_cache(cache_path, dataset, tag, fix)
    try:
        meta = cache.spot_table_meta(dataset, tag)
        meta.embedding_space()
    except SpotTableError as exc:
        raise _no_embeddings(cache_path, dataset, tag, exc, fix) from None
    return meta


def cached_vectors(cache_path, dataset: str, tag: str, spot_ids,
                   fix: str | Callable[[], str] = "Run semst embed") -> tuple[np.ndarray, SpotTableMeta]:
    """The cached vectors of ``dataset``'s spot table ``tag``, one row per spot of ``spot_ids`` in
    that order, and the table's metadata (a SpotTableMeta); a ClusterError ending in ``fix`` if any
    is missing. The reading is EmbeddingCache.vectors_for's; this only says what to run."""
    from semst.shared.cache import CacheError, SpotTableError, UncoveredSpotsError

    cache = _open_cache(cache_path, dataset, tag, fix)
    try:
        return cache.vectors_for(dataset, tag, spot_ids)
    except SpotTableError as exc:
        raise _no_embeddings(cache_path, dataset, tag, exc, fix) from None
    except UncoveredSpotsError as exc:
        raise ClusterError(f"{exc}. {_fix_text(fix)} again.") from None
    except CacheError as exc:
        raise ClusterError(f"{exc}. {_fix_text(fix)} to compute them.") from None


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
                    semantic: np.ndarray | None = None, config_path: str | Path | None = None,
                    spatial=None) -> ClusterReport:
    """Train SemST (:class:`semst.cluster.methods.SemST`) for every seed of ``cfg``, cluster, evaluate
    where annotated, and write outputs.

    With ``write``, the outputs go to ``<out_dir>/<dataset>/<run_name>`` (default
    :func:`default_run_name`); before any work, the run name must be one folder name and the folder
    free or an earlier semst run (:func:`semst.cluster.outputs.prepare_run_folder`).
    ``semantic`` (spots x d) gives the semantic vectors directly (e.g. from ``semst.encode``)
    instead of reading them from the cache; ``cfg.embedding`` then only names them. ``config_path``:
    the --config file ``cfg`` was loaded with (repeated in the `semst embed` hint if embeddings are missing). ``spatial`` (a
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
    method = SemST(slide, progress=progress, log=log, semantic=semantic, config_path=config_path)
    report = run_seeds(slide, method.fit, run_dir, log)
    if write:
        write_outputs(report, cfg, slide.adata, slide.truth, method.source)
        log(f"results: {report.run_dir}")
    return report
