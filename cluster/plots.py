"""Figures of a stage-2 run: domain maps on the tissue and loss curves.

Domain maps draw every spot as a disc whose diameter is the slide's median nearest-neighbour
distance, in data units (a matplotlib ``EllipseCollection`` with ``units="xy"``), so spots fill the
tissue as in scanpy's ``pl.spatial`` whatever the figure size or the number of spots; scanpy's own
``pl.spatial`` needs a Visium image and scale factors, and ``pl.embedding`` sizes dots in points,
which does not. Axes are cut to the tissue. Where an annotation exists, it is drawn beside the
domains and each domain takes the colour of the annotated domain it is matched to one-to-one
(Hungarian matching on overlap), so equal colours mean "the same region". One legend per panel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from semst.shared.io import atomic_write

GREY = (0.85, 0.85, 0.85, 1.0)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write the figure as PNG under a temporary name and rename it (never half a file)."""
    plt = pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


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
    plt = pyplot()
    names = _names(pd.Series(annotation, dtype="object"))
    cmap, size = (plt.get_cmap("tab10"), 10) if len(names) <= 10 else (plt.get_cmap("tab20"), 20)
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
    plt = pyplot()
    uniq = sorted(np.unique(np.asarray(labels)).tolist(), key=lambda v: (str(type(v)), v))
    palette = annotation_palette(annotation) if annotation is not None else {}
    mapping = match_to_annotation(labels, annotation) if palette else {}
    colours = {lab: palette[name] for lab, name in mapping.items()}
    unmatched = [lab for lab in uniq if lab not in colours]
    used = len(palette)
    cmap = plt.get_cmap("tab20") if used + len(unmatched) > 10 else plt.get_cmap("tab10")
    size = 20 if cmap.name == "tab20" else 10
    free = [cmap(i) for i in range(size) if cmap(i) not in colours.values()] or [cmap(0)]
    extra = plt.get_cmap("Dark2")
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
    plt = pyplot()
    handles = [plt.Line2D([], [], marker="o", ls="", markersize=6, color=c, label=name) for name, c in entries]
    if handles:
        ax.legend(handles=handles, title=title, fontsize=7, title_fontsize=8, frameon=False,
                  loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 if len(handles) <= 14 else 2)


def plot_domain_maps(path, coords, annotation, panels: list[tuple[str, np.ndarray | None]], title: str = "",
                     max_columns: int = 4) -> Path:
    """The annotation (if any) beside each panel's domains, colours matched to the annotation."""
    plt = pyplot()
    coords = np.asarray(coords, dtype=float)
    ann = pd.Series(annotation, dtype="object") if annotation is not None else None
    has_truth = ann is not None and ann.notna().any()
    diameter = spot_diameter(coords)
    items: list[tuple[str, np.ndarray | None, bool]] = ([("annotation", None, True)] if has_truth else [])
    items += [(t, lab, False) for t, lab in panels]
    n = len(items)
    cols = min(n, max_columns)
    rows = int(np.ceil(n / cols))
    span = np.ptp(coords, axis=0) + 2 * diameter
    aspect = float(span[1] / span[0]) if span[0] > 0 else 1.0
    width = 4.2
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, max(2.0, width * 0.8 * aspect) * rows),
                             squeeze=False, layout="constrained")
    palette = annotation_palette(ann) if has_truth else {}
    for i, (panel_title, labels, is_truth) in enumerate(items):
        ax = axes[i // cols, i % cols]
        if is_truth:
            colours = [palette.get(str(a), GREY) if pd.notna(a) else GREY for a in ann]
            draw_spots(ax, coords, colours, diameter, panel_title)
            _legend(ax, list(palette.items()), "annotated")
            continue
        if labels is None:
            ax.text(0.5, 0.5, "no result", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(panel_title, fontsize=10)
            ax.axis("off")
            continue
        colour = domain_colours(labels, ann if has_truth else None)
        draw_spots(ax, coords, [colour[lab] for lab in np.asarray(labels).tolist()], diameter, panel_title)
        _legend(ax, [(str(lab), c) for lab, c in sorted(colour.items(), key=lambda kv: (str(type(kv[0])), kv[0]))],
                "domain")
    for j in range(n, rows * cols):
        axes[j // cols, j % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)


def plot_losses(histories: dict, path, title: str = "") -> Path:
    """One panel per loss term (total first), one line per seed."""
    plt = pyplot()
    keys = sorted({k for h in histories.values() for k in h}, key=lambda k: (k != "total", k))
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 3), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes[0], keys):
        for seed, h in histories.items():
            if key in h:
                ax.plot(np.arange(1, len(h[key]) + 1), h[key], lw=1, label=f"seed {seed}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    if keys:
        axes[0, 0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path, dpi=110)
