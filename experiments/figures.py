"""The figures a grid declares (``[[figure]]``), drawn from its finished cells on disk.

Kinds: "domains" (each variant's domains beside the annotation, first seed), "umap" (each variant's
semantic embeddings, coloured by annotation) and "k_genes" (metrics against the variants' k_g). A
figure that cannot be drawn is reported as a problem in REPORT.md; it never costs the report.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from semst.experiments.cells import cell_config, embedding_identity
from semst.experiments.store import cell_labels, spots_path

if TYPE_CHECKING:
    from semst.experiments.schema import FigureSpec, Grid


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
    """One figure file: the k_g sweep over ``datasets``, or the domains / UMAPs of dataset ``d``."""
    index = {(c.dataset, c.variant): c for c in cells}
    if spec.kind == "k_genes":
        return _draw_k_genes(spec, grid, out, datasets, index)
    spots = pd.read_parquet(spots_path(out, d))
    truth = spots["ground_truth"].astype(object).where(spots["ground_truth"].notna(), None).to_numpy()
    if spec.kind == "domains":
        return _draw_domains(spec, grid, out, d, spots, truth, index)
    return _draw_umaps(spec, grid, out, d, spots, truth, cache, log)


def _draw_k_genes(spec: FigureSpec, grid: Grid, out: Path, datasets: list[str], index: dict):
    from semst.experiments.report import FigureInfo, plot_sweep

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


def _draw_domains(spec: FigureSpec, grid: Grid, out: Path, d: str, spots: pd.DataFrame, truth, index: dict):
    from semst.cluster.plots import plot_domain_maps
    from semst.experiments.report import FigureInfo

    labels = {v.name: v.label for v in grid.variants}
    seed = grid.seeds[0]
    rel = f"figures/{spec.name}-{d}.png"
    panels = []
    for name in spec.variants:
        c = index.get((d, name))
        lab = cell_labels(out, d, name, seed) if c is not None and c.status == "ok" else None
        ari = f" (ARI {c.per_seed[0]['ARI']:.1f})" if lab is not None and c.per_seed and "ARI" in c.per_seed[0] else ""
        panels.append((labels[name] + ari, lab))
    plot_domain_maps(out / rel, spots[["x", "y"]].to_numpy(), truth, panels, title=f"{d}: domains, seed {seed}")
    caption = (f"{d}: the annotation beside each method's domains (seed {seed}, ARI of that seed). "
               "Domains take the colour of the annotated domain they are matched to (Hungarian "
               "matching, for display only); unmatched domains get other colours.")
    return FigureInfo(f"{spec.title}: {d}", rel, (spec.caption + " " if spec.caption else "") + caption)


def _draw_umaps(spec: FigureSpec, grid: Grid, out: Path, d: str, spots: pd.DataFrame, truth, cache, log):
    from semst.cluster.run import semantic_embeddings
    from semst.experiments.report import FigureInfo, plot_umaps, umap_coordinates

    labels = {v.name: v.label for v in grid.variants}
    seed = grid.seeds[0]
    rel = f"figures/{spec.name}-{d}.png"
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
