"""The experiment report: ``REPORT.md`` with its tables, and the figures it shows.

Pure rendering: :func:`render_report` turns a :class:`ReportData` (what the grid declared and what
each cell produced) into markdown, and the ``plot_*`` functions draw figures from plain arrays.
:mod:`experiments.assemble` gathers the data; nothing here trains, embeds or reads a dataset.

Numbers are the metrics of :func:`semst.cluster.metrics.cluster_metrics` (x100, labelled spots only),
shown as ``mean ± sd`` over seeds (sample sd; 0.00 for one seed) with two decimals. F1 is the
macro F1 after the same Hungarian matching as ACC.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from semst.cluster.plots import annotation_palette, new_figure, save
from semst.shared.io import atomic_write_text

# (key in a cell's summary, column title)
METRIC_COLUMNS = (("ARI", "ARI"), ("NMI", "NMI"), ("ACC", "ACC"), ("F1_macro", "F1"))

NO_SELECTION_STATEMENT = (
    "Nothing was selected by looking at labels. Every method uses its configured settings, declared "
    "before the run in the grid file and the dataset configs; the embedding clustered is the last "
    "epoch's (no early stopping, no checkpoint picked by score); k-means runs with a fixed seed and "
    "the number of annotated domains (the only use of the annotation before scoring, as in the "
    "paper), or, for methods run with n_domains = \"auto\", a number chosen from the stability of their "
    "own embeddings alone; every seed is reported, none dropped. The annotation is otherwise used only to compute "
    "the metrics and to give matched domains the colour of their annotated layer in the domain maps.")


@dataclass
class VariantInfo:
    name: str
    label: str
    description: str = ""  # backbone and settings, in words


@dataclass
class TableInfo:
    title: str
    variants: list[str]
    caption: str = ""


@dataclass
class FigureInfo:
    title: str
    path: str  # relative to the report's folder
    caption: str = ""


@dataclass
class DatasetInfo:
    name: str
    n_spots: int | None = None
    n_domains: int | None = None
    skipped: str | None = None  # why the dataset was not run (None = it was)


@dataclass
class CellResult:
    """One (dataset, variant) cell: every seed of one method on one dataset."""

    dataset: str
    variant: str
    status: str = "ok"  # "ok" | "failed"
    n_spots: int | None = None
    n_domains: int | None = None
    summary: dict = field(default_factory=dict)  # metric -> {"mean", "sd", "n"}
    per_seed: list = field(default_factory=list)  # {"seed", "seconds", metrics...}
    wall_seconds: float = 0.0  # the whole cell: embedding step + every seed
    embed_seconds: float = 0.0  # the embedding step alone (cache look-up, and computing what is missing)
    prompts_computed: int = 0  # embeddings computed (not found in the cache) by this cell
    embedding: dict | None = None  # identity of the semantic embeddings (tag, model, weights, ...)
    settings: dict = field(default_factory=dict)  # backbone, fusion, k_genes, ... (for figures)
    error: str | None = None
    config_hash: str = ""
    finished: str = ""  # ISO time the cell finished
    reused: bool = False  # taken from an earlier run of the same grid and settings
    consensus: dict = field(default_factory=dict)  # metrics of the consensus over seeds (several seeds)
    auto_k: dict | None = None  # n_domains = "auto...": the stability curve and the chosen k
    auto_comparison: dict = field(default_factory=dict)  # annotated vs chosen k and the ARI at both

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CellResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ReportData:
    title: str
    grid: str  # the grid file
    seeds: list[int]
    variants: list[VariantInfo]
    datasets: list[DatasetInfo]
    tables: list[TableInfo]
    cells: list[CellResult]
    figures: list[FigureInfo] = field(default_factory=list)
    figure_problems: list[str] = field(default_factory=list)
    generated: str = ""
    notes: list[str] = field(default_factory=list)


# -- formatting -----------------------------------------------------------------------------------

def format_mean_sd(entry: dict | None) -> str:
    """``"45.12 ± 1.03"``; ``"n/a"`` when the metric was not computed (no annotation)."""
    if not entry:
        return "n/a"
    return f"{entry['mean']:.2f} ± {entry['sd']:.2f}"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}"


def _cell_index(cells: list[CellResult]) -> dict[tuple[str, str], CellResult]:
    return {(c.dataset, c.variant): c for c in cells}


def _labels(data: ReportData) -> dict[str, str]:
    return {v.name: v.label for v in data.variants}


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_table(table: TableInfo, data: ReportData) -> str:
    """One markdown table: a row per (run dataset, variant), metrics as mean ± sd over seeds."""
    labels = _labels(data)
    cells = _cell_index(data.cells)
    header = (["dataset", "spots", "domains", "method", "seeds"] + [title for _, title in METRIC_COLUMNS]
              + ["s per run", "peak GiB"])
    lines = ["| " + " | ".join(header) + " |",
             "|---|---:|---:|---|---:|" + "---:|" * (len(METRIC_COLUMNS) + 2)]
    for ds in data.datasets:
        if ds.skipped is not None:
            continue
        for name in table.variants:
            cell = cells.get((ds.name, name))
            spots = ds.n_spots if ds.n_spots is not None else (cell.n_spots if cell else None)
            domains = ds.n_domains if ds.n_domains is not None else (cell.n_domains if cell else None)
            if cell is None:
                seeds, values = "-", ["not run"] * len(METRIC_COLUMNS) + ["-", "-"]
            elif cell.status != "ok":
                seeds, values = "-", ["failed"] * len(METRIC_COLUMNS) + ["-", "-"]
            else:
                seeds = str(len(cell.per_seed))
                values = [format_mean_sd(cell.summary.get(key)) for key, _ in METRIC_COLUMNS] + list(_run_costs(cell))
            row = [ds.name, "-" if spots is None else str(spots), "-" if domains is None else str(domains),
                   _md_escape(labels.get(name, name)), seeds, *values]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _run_costs(cell: CellResult) -> tuple[str, str]:
    """Mean seconds per seed, and the largest peak memory of a seed where it was measured (methods run
    in their own process, such as the peers; "-" for methods run inside semst's process)."""
    seconds = [r["seconds"] for r in cell.per_seed if "seconds" in r]
    peaks = [r["peak_gib"] for r in cell.per_seed if r.get("peak_gib") is not None]
    return (format_seconds(float(np.mean(seconds))) if seconds else "-",
            f"{max(peaks):.2f}" if peaks else "-")


def render_models(data: ReportData) -> str:
    """Which model produced the semantic embeddings of which methods (label + weights SHA-256)."""
    labels = _labels(data)
    groups: dict[tuple, set[str]] = {}
    for cell in data.cells:
        e = cell.embedding
        if cell.status != "ok" or not e:
            continue
        key = (e.get("source", ""), e.get("model", ""), e.get("weights", ""), e.get("pooling", ""), e.get("dim", ""))
        groups.setdefault(key, set()).add(labels.get(cell.variant, cell.variant))
    if not groups:
        return "No method in this grid used semantic embeddings."
    lines = ["| source | model | weights (SHA-256 of the weight files) | pooling | dim | used by |",
             "|---|---|---|---|---:|---|"]
    for (source, model, weights, pooling, dim), users in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        lines.append(f"| {_md_escape(source)} | {_md_escape(model)} | `{weights}` | {pooling} | {dim} | "
                     f"{_md_escape(', '.join(sorted(users)))} |")
    return "\n".join(lines)


def render_datasets(data: ReportData) -> str:
    lines = ["| dataset | spots | domains | status |", "|---|---:|---:|---|"]
    for ds in data.datasets:
        status = "run" if ds.skipped is None else f"skipped: {_md_escape(ds.skipped)}"
        lines.append(f"| {ds.name} | {'-' if ds.n_spots is None else ds.n_spots} | "
                     f"{'-' if ds.n_domains is None else ds.n_domains} | {status} |")
    return "\n".join(lines)


def render_variants(data: ReportData) -> str:
    lines = ["| method | name in the grid | what it is |", "|---|---|---|"]
    for v in data.variants:
        lines.append(f"| {_md_escape(v.label)} | `{v.name}` | {_md_escape(v.description)} |")
    return "\n".join(lines)


def render_wall_times(data: ReportData) -> str:
    """Per cell: wall time (embedding step + all seeds), embedding step, prompts computed, s per seed."""
    labels = _labels(data)
    lines = ["| dataset | method | status | wall (s) | embedding step (s) | embeddings computed | "
             "s per seed | from |", "|---|---|---|---:|---:|---:|---:|---|"]
    for cell in data.cells:
        per_seed = [r["seconds"] for r in cell.per_seed if "seconds" in r]
        mean_seed = format_seconds(float(np.mean(per_seed))) if per_seed else "-"
        origin = f"earlier run ({cell.finished})" if cell.reused else "this run"
        lines.append(f"| {cell.dataset} | {_md_escape(labels.get(cell.variant, cell.variant))} | {cell.status} | "
                     f"{format_seconds(cell.wall_seconds)} | {format_seconds(cell.embed_seconds)} | "
                     f"{cell.prompts_computed} | {mean_seed} | {origin} |")
    total = sum(c.wall_seconds for c in data.cells if not c.reused)
    computed = sum(c.prompts_computed for c in data.cells if not c.reused)
    lines.append("")
    lines.append(f"This run: {total:.1f} s of cell wall time, {computed} embeddings computed "
                 f"(everything else came from the shared cache).")
    return "\n".join(lines)


def _ari_cell(entry: dict | None) -> str:
    if not entry or entry.get("n", 0) == 0:
        return "n/a"
    text = f"{entry['mean']:.2f} ± {entry['sd']:.2f}"
    return text + (f" (consensus {entry['consensus']:.2f})" if entry.get("consensus") is not None else "")


def render_auto_k(data: ReportData) -> str | None:
    """Per dataset and method run with n_domains = "auto": chosen vs annotated k, stability at both,
    ARI at both (mean ± sd over seeds, and the consensus's). None when no cell used "auto"."""
    labels = _labels(data)
    cells = [c for c in data.cells if c.status == "ok" and c.auto_k]
    if not cells:
        return None
    lines = ["| dataset | method | range | annotated k | chosen k | stability at chosen | stability at annotated | "
             "ARI at chosen k | ARI at annotated k | auto (s) |", "|---|---|---|---:|---:|---:|---:|---|---|---:|"]
    for c in cells:
        a, cmp = c.auto_k, c.auto_comparison or {}
        stab = a.get("stability", {})
        annotated = cmp.get("annotated_k")
        at_annotated = stab.get(str(annotated)) if annotated is not None else None
        lines.append(f"| {c.dataset} | {_md_escape(labels.get(c.variant, c.variant))} | {a.get('range', '')} | "
                     f"{'-' if annotated is None else annotated} | {a['chosen']} | "
                     f"{stab.get(str(a['chosen']), float('nan')):.3f} | "
                     f"{'-' if at_annotated is None else f'{at_annotated:.3f}'} | "
                     f"{_ari_cell(cmp.get('ARI_chosen'))} | {_ari_cell(cmp.get('ARI_annotated'))} | "
                     f"{format_seconds(a.get('seconds'))} |")
    return "\n".join(lines)


def render_report(data: ReportData) -> str:
    out = [f"# {data.title}", ""]
    meta = f"Grid `{data.grid}`; seeds {', '.join(map(str, data.seeds))}"
    if data.generated:
        meta += f"; generated {data.generated}"
    out += [meta + ".", ""]
    out += ["## How to read this", "",
            "Metrics are ARI, NMI, ACC (Hungarian-matched accuracy) and F1 (macro F1 after the same "
            "matching), x100, on annotated spots only, as mean ± sd over the seeds (sample sd). "
            "`spots` and `domains` are the dataset's number of spots and of annotated domains (the "
            "number of clusters). `s per run` is the mean wall time of one seed; `peak GiB` the largest "
            "resident memory of one seed, measured for methods run in a process of their own (other "
            "tools' methods, e.g. the field grid's peers) and `-` for those run inside semst's.", "",
            NO_SELECTION_STATEMENT, ""]
    out += ["## Embedding models", "", render_models(data), ""]
    out += ["## Datasets", "", render_datasets(data), ""]
    out += ["## Methods", "", render_variants(data), ""]
    for table in data.tables:
        out += [f"## {table.title}", ""]
        if table.caption:
            out += [table.caption, ""]
        out += [render_table(table, data), ""]
    auto = render_auto_k(data)
    if auto:
        out += ["## Number of domains chosen by stability (auto)", "",
                "Methods run with `n_domains = \"auto\"` choose k from their own embeddings (k-means stability "
                "over runs, never the annotation); the annotated k is clustered afterwards only for this "
                "comparison. ARI x100, mean ± sd over seeds, and of the consensus over seeds.", "", auto, ""]
    for fig in data.figures:
        out += [f"## {fig.title}", ""]
        if fig.caption:
            out += [fig.caption, ""]
        out += [f"![{fig.title}]({fig.path})", ""]
    if data.figure_problems:
        out += ["## Figures that could not be drawn", ""] + [f"- {_md_escape(p)}" for p in data.figure_problems] + [""]
    out += ["## Wall time per cell", "", render_wall_times(data), ""]
    failed = [c for c in data.cells if c.status != "ok"]
    if failed:
        labels = _labels(data)
        out += ["## Failed cells", ""]
        out += [f"- {c.dataset} / {labels.get(c.variant, c.variant)}: {_md_escape(c.error or 'unknown error')}"
                for c in failed] + [""]
    if data.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    return "\n".join(out)


def write_report(data: ReportData, out_dir: str | Path) -> Path:
    """``out_dir/REPORT.md`` (written to a temporary name, then renamed)."""
    return atomic_write_text(Path(out_dir) / "REPORT.md", render_report(data))


# -- figures ------------------------------------------------------------------------------------------

def umap_coordinates(vectors, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-d UMAP (cosine) of the embeddings; seeded, so the figure is reproducible."""
    import umap

    vectors = np.asarray(vectors, dtype=np.float32)
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(vectors) - 1), min_dist=0.3, metric="cosine",
                        random_state=seed, n_components=2)
    return reducer.fit_transform(vectors)


def plot_umaps(path, annotation, panels: list[tuple[str, np.ndarray]], title: str = "") -> Path:
    """Side-by-side 2-d embeddings (e.g. UMAPs of two embedding sources) coloured by annotation."""
    from matplotlib.lines import Line2D

    ann = pd.Series(annotation, dtype="object")
    palette = annotation_palette(ann)
    grey = (0.85, 0.85, 0.85, 1.0)
    colours = [palette.get(str(a), grey) if pd.notna(a) else grey for a in ann]
    fig = new_figure((4.2 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (panel_title, xy) in zip(axes[0], panels):
        xy = np.asarray(xy)
        ax.scatter(xy[:, 0], xy[:, 1], s=max(1.0, 2000.0 / max(len(xy), 1)), c=colours, linewidths=0)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1", fontsize=8)
        ax.set_ylabel("UMAP 2", fontsize=8)
    handles = [Line2D([], [], marker="o", ls="", color=c, label=name) for name, c in palette.items()]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 0.93 if title else 1))
    return save(fig, path, dpi=110)


def plot_sweep(path, series: dict[str, list[tuple[float, dict]]], metrics=("ARI", "NMI"),
               xlabel: str = "k_g (genes per prompt)", title: str = "") -> Path:
    """mean ± sd of each metric against a setting (e.g. k_g), one line per dataset.

    ``series``: dataset -> [(x, summary)] where summary is a cell's metric -> {"mean", "sd"}.
    """
    fig = new_figure((4.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for dataset, points in sorted(series.items()):
            pts = sorted((x, s[metric]) for x, s in points if metric in s)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ax.errorbar(xs, [e["mean"] for _, e in pts], yerr=[e["sd"] for _, e in pts], marker="o",
                        capsize=3, lw=1.2, label=dataset)
            ax.set_xticks(xs)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{metric} (x100)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, path, dpi=110)
