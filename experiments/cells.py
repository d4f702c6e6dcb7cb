"""One cell of a grid (one dataset x one variant, every seed): its configs, its identity, running it.

A cell's configs are the dataset's own, under the grid's and then the variant's overrides; its
method is the registered :mod:`semst.cluster.methods` class the variant's ``backbone`` names, with
that method's settings table (grid-wide < variant). Running a cell makes sure its semantic
embeddings are in the shared cache (stage 1 computes only missing prompts) and then runs its method
for every seed through :func:`semst.cluster.methods.run_method`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semst.cluster.methods import method_class, run_method
from semst.shared.config import ClusterConfig, config_identity, load_cluster_config, merge_cluster, spatial_from_legacy
from semst.shared.hashing import json_hash

if TYPE_CHECKING:
    from semst.experiments.schema import Grid, Variant


def now() -> str:
    """The local time, to the second, for cell files and the report."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def cell_config(grid: Grid, variant: Variant, dataset: str, cache: str | Path | None = None) -> ClusterConfig:
    """The resolved stage configs of one cell: dataset config < grid overrides < variant overrides.

    ``cluster.embedding = "sentence"`` becomes the encoder's spot-table tag, so stage 2 reads it as
    any other embedding in the cache.
    """
    cache = cache if cache is not None else grid.cache
    embed_over = {**grid.embed, **variant.embed}
    # the variant's spatial table over the grid's as a file's over default.toml's (merge_spatial)
    cluster_over = {**merge_cluster(spatial_from_legacy(grid.cluster), spatial_from_legacy(variant.cluster)),
                    "seeds": list(grid.seeds)}
    if cache is not None:
        embed_over["cache"] = str(cache)
        cluster_over["cache"] = str(cache)
    sentence = cluster_over.get("embedding") == "sentence"
    if sentence:
        cluster_over["embedding"] = "llm"  # placeholder until the embed config is known
    cfg = load_cluster_config(dataset, cluster_over, grid.dataset_configs.get(dataset), embed_overrides=embed_over)
    if sentence:
        from semst.embed.sentence_encoder import sentence_tag
        cfg = cfg.replace(embedding=sentence_tag(cfg.embed, encoder_name(variant)))
    return cfg


def encoder_name(variant: Variant) -> str:
    from semst.embed.sentence_encoder import DEFAULT_ENCODER
    return variant.encoder or DEFAULT_ENCODER


def cell_method_settings(grid: Grid, variant: Variant, cfg: ClusterConfig) -> Any:
    """The cell's method settings: its method's table, grid-wide < variant, checked against ``cfg``."""
    method = method_class(variant.backbone)
    key = method.settings_key
    values = {**grid.method_settings.get(key, {}), **variant.method_settings} if key else {}
    return method.configure(cfg, values)


def uses_semantic(variant: Variant, cfg: ClusterConfig) -> bool:
    return method_class(variant.backbone).uses_semantic(cfg)


def cell_settings(grid: Grid, variant: Variant, cfg: ClusterConfig) -> dict:
    """What identifies a cell's result (everything but the cache's location): its hash decides reuse."""
    settings = {"backbone": variant.backbone, "config": _without_cache(config_identity(cfg))}
    key = method_class(variant.backbone).settings_key
    if key:
        settings[key] = dataclasses.asdict(cell_method_settings(grid, variant, cfg))
    if variant.embedding == "sentence":
        settings["encoder"] = encoder_name(variant)
    return settings


def _without_cache(d: dict) -> dict:
    return {k: (_without_cache(v) if isinstance(v, dict) else v) for k, v in d.items() if k != "cache"}


def embedding_identity(cfg: ClusterConfig) -> dict:
    """Which model produced the semantic embeddings a cell used: label, weights SHA-256, pooling, dim."""
    from semst.cluster.run import semantic_tag
    from semst.shared.cache import EmbeddingCache

    tag = semantic_tag(cfg.embed) if cfg.model.embedding in ("llm", "random") else cfg.model.embedding
    meta = EmbeddingCache(cfg.cache, create=False).spot_table_meta(cfg.dataset, tag)
    space = dataclasses.asdict(meta.space) if meta.space is not None else {}
    if cfg.model.embedding == "random":
        source = f"random N(0, {cfg.model.random_embedding_std}); only its width comes from this model"
    elif cfg.model.embedding == "llm" and cfg.embed.semantic == "gene":
        source = f"LLM gene-level ({cfg.embed.gene_weights}), template {cfg.embed.template}, k_g {cfg.embed.k_genes}"
    elif cfg.model.embedding == "llm":
        source = f"LLM, template {cfg.embed.template}, k_g {cfg.embed.k_genes}"
    elif meta.encoder:
        source = f"sentence encoder, template {meta.template}, k_g {meta.k_genes}"
    else:
        source = f"spot table {tag}"
    return {"source": source, "tag": tag, "model": space.get("model"), "weights": space.get("weights"),
            "pooling": space.get("pooling"), "dtype": space.get("dtype"), "dim": space.get("dim"),
            "space_id": meta.space_id}


class EmbedStep:
    """Stage 1 for the cells of one run: each embed setting is looked up (and completed) once."""

    def __init__(self, progress: bool, log):
        self.done: dict[tuple, object] = {}
        self.progress = progress
        self.log = log

    def ensure(self, variant: Variant, cfg: ClusterConfig, adata) -> tuple[float, int]:
        """(seconds, embeddings computed) to make this cell's embeddings present in the cache."""
        from semst.cluster.run import semantic_tag
        from semst.embed.run import embed_dataset

        if variant.embedding == "sentence":
            from semst.embed.sentence_encoder import encode_dataset_sentence
            key = ("sentence", cfg.dataset, cfg.model.embedding, cfg.embed.cache)
            run = lambda: encode_dataset_sentence(cfg.embed, encoder_name(variant), adata=adata, log=self.log)  # noqa: E731
        elif cfg.model.embedding in ("llm", "random"):
            key = ("llm", cfg.dataset, semantic_tag(cfg.embed), cfg.embed.cache, cfg.embed.backend)
            run = lambda: embed_dataset(cfg.embed, adata=adata, progress=self.progress, log=self.log)  # noqa: E731
        else:
            return 0.0, 0  # a spot table named in the grid: stage 2 says clearly if it is absent
        if key in self.done:
            return 0.0, 0
        t0 = time.perf_counter()
        report = run()
        self.done[key] = report
        return time.perf_counter() - t0, int(report.n_computed)


def run_cell(grid: Grid, variant: Variant, dataset: str, adata, cache=None, embed_step: EmbedStep | None = None,
             progress: bool = True, log=print):
    """Run one (dataset, variant) cell for every seed; (CellResult, labels per seed)."""
    from semst.experiments.report import CellResult

    embed_step = embed_step or EmbedStep(progress, log)
    cfg = cell_config(grid, variant, dataset, cache)
    settings = cell_settings(grid, variant, cfg)
    t0 = time.perf_counter()
    embed_seconds, computed, identity = 0.0, 0, None
    if uses_semantic(variant, cfg):
        embed_seconds, computed = embed_step.ensure(variant, cfg, adata)
        identity = embedding_identity(cfg)
    report = run_method(variant.backbone, cfg, cell_method_settings(grid, variant, cfg), adata=adata,
                        progress=progress, log=log)
    cell = CellResult(
        dataset=dataset, variant=variant.name, status="ok", n_spots=report.n_spots, n_domains=report.n_domains,
        summary=report.summary, per_seed=report.per_seed, wall_seconds=round(time.perf_counter() - t0, 2),
        embed_seconds=round(embed_seconds, 2), prompts_computed=computed, embedding=identity,
        settings={"backbone": variant.backbone, "fusion": cfg.model.fusion, "embedding": cfg.model.embedding,
                  "k_genes": cfg.embed.k_genes, "template": cfg.embed.template, "epochs": cfg.train.epochs,
                  "recipe": cfg.recipe, "gene_ranking": cfg.embed.gene_ranking, "fsm_mode": cfg.model.fsm_mode},
        config_hash=json_hash(settings), finished=now(), consensus=report.consensus_metrics,
        auto_k=report.auto.summary() if report.auto is not None else None,
        auto_comparison=report.auto_comparison)
    return cell, report.labels
