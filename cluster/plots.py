"""Figures of a stage-2 run: domain maps on the tissue and loss curves.

Domain maps draw every spot as a disc whose diameter is the slide's median nearest-neighbour
distance, in data units (a matplotlib ``EllipseCollection`` with ``units="xy"``), so spots fill the
tissue as in scanpy's ``pl.spatial`` whatever the figure size or the number of spots; scanpy's own
``pl.spatial`` needs a Visium image and scale factors, and ``pl.embedding`` sizes dots in points,
which does not. Axes are cut to the tissue. Where an annotation exists, it is drawn beside the
domains and each domain takes the colour of the annotated domain it is matched to one-to-one
(Hungarian matching on overlap), so equal colours mean "the same region". One legend per panel.

Each figure has a ``draw_*`` function that draws into a given matplotlib Axes (what ``semst.pl``
calls, in the user's figure and backend) and a ``plot_*`` function that writes the run folder's PNG
with it. The files are drawn on :class:`matplotlib.figure.Figure` objects, outside pyplot: writing
them never chooses or switches a backend and leaves no figure open in a notebook.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from semst.shared.io import atomic_write

GREY = (0.85, 0.85, 0.85, 1.0)


def new_figure(figsize: tuple[float, float], layout: str | None = None):
    """A figure outside pyplot (no backend chosen or switched, nothing registered to close)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout=layout)


def colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write the figure as PNG under a temporary name and rename it (never half a file)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))


def spot_diameter(coords) -> float:
    """The disc size that fills the tissue: the larger of the median nearest-neighbour distance (a
    regular grid: Visium, ST) and the side of the tissue area per spot (irregularly placed cells,
    whose nearest neighbours are often much closer than the typical spacing). The tissue area is
    counted as the occupied cells of a raster whose pixel is the median distance to the 5th neighbour."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=float)
    if len(coords) < 2:
        return 1.0
    k = min(6, len(coords))
    dist, _ = cKDTree(coords).query(coords, k=k)
    nearest = float(np.median(dist[:, 1]))
    pixel = float(np.median(dist[:, -1]))
    if pixel <= 0:
        return nearest if nearest > 0 else 1.0
    occupied = len(np.unique(np.floor(coords / pixel).astype(np.int64), axis=0))
    per_spot = float(np.sqrt(occupied * pixel**2 / len(coords)))
    d = max(nearest, per_spot)
    return d if d > 0 else 1.0


def _names(values) -> list[str]:
    return sorted({str(a) for a in values if pd.notna(a)})


def annotation_palette(annotation) -> dict[str, tuple]:
    """A fixed colour per annotated domain (sorted names): tab10 (distinct hues) up to 10, else tab20."""
    names = _names(pd.Series(annotation, dtype="object"))
    cmap, size = (colormap("tab10"), 10) if len(names) <= 10 else (colormap("tab20"), 20)
    return {name: cmap(i % size) for i, name in enumerate(names)}


def match_to_annotation(labels, annotation) -> dict:
    """Cluster -> annotated domain it overlaps most under a one-to-one (Hungarian) matching.

    For colouring only: a matched cluster is drawn in its domain's colour; unmatched clusters are not
    in the returned dict.
    """
    from scipy.optimize import linear_sum_assignment

    ann = pd.Series(annotation, dtype="object")
    keep = ann.notna().to_numpy()
    if not keep.any():
        return {}
    t = ann[keep].astype(str).to_numpy()
    p = np.asarray(labels)[keep]
    truths, ti = np.unique(t, return_inverse=True)
    preds, pi = np.unique(p, return_inverse=True)
    overlap = np.zeros((len(preds), len(truths)), dtype=np.int64)
    np.add.at(overlap, (pi, ti), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return {preds[r].item() if hasattr(preds[r], "item") else preds[r]: truths[c] for r, c in zip(rows, cols)}


def domain_colours(labels, annotation=None) -> dict:
    """Colour of each domain label: its matched annotated domain's colour, else a distinct extra one."""
    uniq = sorted(np.unique(np.asarray(labels)).tolist(), key=lambda v: (str(type(v)), v))
    palette = annotation_palette(annotation) if annotation is not None else {}
    mapping = match_to_annotation(labels, annotation) if palette else {}
    colours = {lab: palette[name] for lab, name in mapping.items()}
    unmatched = [lab for lab in uniq if lab not in colours]
    used = len(palette)
    cmap = colormap("tab20") if used + len(unmatched) > 10 else colormap("tab10")
    size = 20 if cmap.name == "tab20" else 10
    free = [cmap(i) for i in range(size) if cmap(i) not in colours.values()] or [cmap(0)]
    extra = colormap("Dark2")
    for j, lab in enumerate(unmatched):
        colours[lab] = free[j] if j < len(free) else extra(j % 8)
    return colours


def draw_spots(ax, coords, colours, diameter: float, title: str = "") -> None:
    """Discs of ``diameter`` data units at ``coords``, the axes cut to the tissue, y pointing down."""
    from matplotlib.collections import EllipseCollection

    coords = np.asarray(coords, dtype=float)
    discs = EllipseCollection(widths=diameter, heights=diameter, angles=0.0, units="xy", offsets=coords,
                              offset_transform=ax.transData, facecolors=colours, linewidths=0)
    ax.add_collection(discs)
    pad = diameter
    ax.set_xlim(coords[:, 0].min() - pad, coords[:, 0].max() + pad)
    ax.set_ylim(coords[:, 1].max() + pad, coords[:, 1].min() - pad)  # image coordinates: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)


def _legend(ax, entries: list[tuple[str, tuple]], title: str) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", markersize=6, color=c, label=name) for name, c in entries]
    if handles:
        ax.legend(handles=handles, title=title, fontsize=7, title_fontsize=8, frameon=False,
                  loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 if len(handles) <= 14 else 2)


def has_annotation(annotation) -> bool:
    """Whether ``annotation`` (one value per spot, None or NaN where unknown) names any spot's domain."""
    return annotation is not None and bool(pd.Series(annotation, dtype="object").notna().any())


def draw_annotation(ax, coords, annotation, diameter: float | None = None, title: str = "annotation",
                    legend_title: str = "annotated") -> None:
    """The annotated domains on the tissue, one colour per name (:func:`annotation_palette`), unknown grey."""
    coords = np.asarray(coords, dtype=float)
    ann = pd.Series(annotation, dtype="object")
    palette = annotation_palette(ann)
    colours = [palette.get(str(a), GREY) if pd.notna(a) else GREY for a in ann]
    draw_spots(ax, coords, colours, spot_diameter(coords) if diameter is None else diameter, title)
    _legend(ax, list(palette.items()), legend_title)


def draw_domains(ax, coords, labels, annotation=None, diameter: float | None = None, title: str = "") -> None:
    """Domains on the tissue, each in the colour of the annotated domain it matches (:func:`domain_colours`)
    when ``annotation`` names any spot's domain, else in distinct colours."""
    coords = np.asarray(coords, dtype=float)
    ann = pd.Series(annotation, dtype="object") if has_annotation(annotation) else None
    colour = domain_colours(labels, ann)
    draw_spots(ax, coords, [colour[lab] for lab in np.asarray(labels).tolist()],
               spot_diameter(coords) if diameter is None else diameter, title)
    _legend(ax, [(str(lab), c) for lab, c in sorted(colour.items(), key=lambda kv: (str(type(kv[0])), kv[0]))],
            "domain")


def draw_no_result(ax, title: str = "") -> None:
    """An empty panel saying a method gave no result."""
    ax.text(0.5, 0.5, "no result", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


MAP_WIDTH = 4.2  # inches per domain map


def map_size(coords, diameter: float) -> tuple[float, float]:
    """(width, height) in inches of one domain map: the tissue's aspect ratio, at least 2 inches high."""
    span = np.ptp(np.asarray(coords, dtype=float), axis=0) + 2 * diameter
    aspect = float(span[1] / span[0]) if span[0] > 0 else 1.0
    return MAP_WIDTH, max(2.0, MAP_WIDTH * 0.8 * aspect)


def plot_domain_maps(path, coords, annotation, panels: list[tuple[str, np.ndarray | None]], title: str = "",
                     max_columns: int = 4) -> Path:
    """The annotation (if any) beside each panel's domains, colours matched to the annotation."""
    coords = np.asarray(coords, dtype=float)
    ann = pd.Series(annotation, dtype="object") if annotation is not None else None
    has_truth = has_annotation(ann)
    diameter = spot_diameter(coords)
    items: list[tuple[str, np.ndarray | None, bool]] = ([("annotation", None, True)] if has_truth else [])
    items += [(t, lab, False) for t, lab in panels]
    n = len(items)
    cols = min(n, max_columns)
    rows = int(np.ceil(n / cols))
    width, height = map_size(coords, diameter)
    fig = new_figure((width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, (panel_title, labels, is_truth) in enumerate(items):
        ax = axes[i // cols, i % cols]
        if is_truth:
            draw_annotation(ax, coords, ann, diameter, panel_title)
        elif labels is None:
            draw_no_result(ax, panel_title)
        else:
            draw_domains(ax, coords, labels, ann if has_truth else None, diameter, panel_title)
    for j in range(n, rows * cols):
        axes[j // cols, j % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)


def loss_terms(histories: dict) -> list[str]:
    """Every loss term recorded for any seed, the total first, then by name."""
    return sorted({k for h in histories.values() for k in h}, key=lambda k: (k != "total", k))


def draw_loss(ax, histories: dict, term: str, legend: bool = False) -> None:
    """One loss term against the epoch, one line per seed (``histories``: seed -> term -> per-epoch values)."""
    for seed, h in histories.items():
        if term in h:
            ax.plot(np.arange(1, len(h[term]) + 1), h[term], lw=1, label=f"seed {seed}")
    ax.set_title(term, fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=6)


LOSS_PANEL_SIZE = (3.2, 3.0)  # inches per loss term


def plot_losses(histories: dict, path, title: str = "") -> Path:
    """One panel per loss term (total first), one line per seed."""
    keys = loss_terms(histories)
    n = max(len(keys), 1)
    fig = new_figure((LOSS_PANEL_SIZE[0] * n, LOSS_PANEL_SIZE[1]), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)
    for i, (ax, key) in enumerate(zip(axes[0], keys)):
        draw_loss(ax, histories, key, legend=i == 0)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path, dpi=110)
