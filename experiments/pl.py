"""Plots on AnnData, as in scanpy's ``pl``: ``semst.pl.domains``, ``semst.pl.stability``, ``semst.pl.losses``.

Each draws into the Axes passed as ``ax`` (a new pyplot figure when None, in the user's backend)
with the same drawing code as the run folder's ``domains.png``, ``stability.png`` and ``loss.png``
(:mod:`semst.cluster.plots`, :func:`semst.cluster.autok.draw_stability`), and returns the Axes.
Nothing here chooses or switches the matplotlib backend, and matplotlib is imported only when a
plot is drawn.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from semst.experiments.api import DOMAIN_KEY

ANNOTATION_KEY = "ground_truth"  # obs column of the annotated domains (as in the datasets semst loads)
UNS_KEY = "semst"  # adata.uns key that semst.tl.domains writes

__all__ = ["domains", "stability", "losses"]


def _new_axes(figsize: tuple[float, float], ncols: int = 1) -> list:
    """Axes of a new pyplot figure in the current backend (shown by a notebook like any other)."""
    import matplotlib.pyplot as plt

    _, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False, layout="constrained")
    return list(axes[0])


def _is_axes(ax) -> bool:
    from matplotlib.axes import Axes

    return isinstance(ax, Axes)


def _config_error(message: str):
    from semst.shared.config import ConfigError

    return ConfigError(message)


def _from_uns(adata, key: str, entry: str, fix: str):
    """``adata.uns[key][entry]``, decoded if it is JSON text, or a ConfigError ending in ``fix``."""
    block = adata.uns.get(key)
    if not isinstance(block, dict) or entry not in block:
        raise _config_error(f"adata.uns[{key!r}] has no {entry!r}: {fix}")
    value = block[entry]
    return json.loads(value) if isinstance(value, str) else value


def _domain_labels(column: pd.Series) -> np.ndarray:
    """The labels of an obs column; integer labels stored as text (as semst stores them) back as
    integers, so legend order and colours are those of ``domains.png``."""
    values = np.asarray(column.astype(str))
    if len(values) and all(v.lstrip("-").isdigit() for v in values):
        return values.astype(np.int64)
    return values


def domains(adata, key: str = DOMAIN_KEY, *, annotation: str | None = ANNOTATION_KEY, basis: str = "spatial",
            title: str | None = None, ax=None):
    """Domains on the tissue, drawn as in the run folder's ``domains.png``.

    Every spot is a disc as wide as the spot spacing, the axes cut to the tissue (y pointing down).
    Where ``adata.obs[annotation]`` names any spot's domain, each domain takes the colour of the
    annotated domain it matches one-to-one (equal colours mean "the same region"). A column with
    missing values, or ``key == annotation``, is drawn as the annotation panel of ``domains.png``
    (one colour per name, missing spots grey).

    Parameters
    ----------
    adata
        An AnnData with the labels in ``obs[key]`` and coordinates in ``obsm[basis]``.
    key
        The ``adata.obs`` column to draw (default what :func:`semst.tl.domains` writes).
    annotation
        The ``adata.obs`` column of annotated domains to match colours to; None or absent: no matching.
    basis
        The ``adata.obsm`` key of the (spots x 2) coordinates.
    title
        The panel's title (default ``key``).
    ax
        The matplotlib Axes to draw into; None: a new figure sized to the tissue.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into. ``adata`` is not changed.
    """
    from semst.cluster.plots import draw_annotation, draw_domains, map_size, spot_diameter

    if key not in adata.obs:
        raise _config_error(f"adata.obs has no {key!r}: run semst.tl.domains(adata) first, or pass key= an obs column")
    if basis not in adata.obsm:
        raise _config_error(f"adata.obsm has no {basis!r} coordinates: pass basis= the key of (spots x 2) coordinates")
    coords = np.asarray(adata.obsm[basis], dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise _config_error(f"adata.obsm[{basis!r}] must have 2 columns (x, y), got shape {coords.shape}")
    diameter = spot_diameter(coords)
    if ax is None:
        ax = _new_axes(map_size(coords, diameter))[0]
    column = adata.obs[key]
    title = key if title is None else title
    if key == annotation or column.isna().any():
        draw_annotation(ax, coords, column, diameter, title,
                        legend_title="annotated" if key == annotation else key)
        return ax
    truth = adata.obs[annotation] if annotation is not None and annotation in adata.obs else None
    draw_domains(ax, coords, _domain_labels(column), truth, diameter, title)
    return ax


def _stability_curve(data, key: str):
    from semst.cluster.autok import StabilityCurve

    if isinstance(data, StabilityCurve):
        return data
    if hasattr(data, "uns"):  # an AnnData
        data = _from_uns(data, key, "stability",
                         "run semst.tl.domains(adata, n_domains='auto') or semst.tl.auto_k(adata) first "
                         "(auto_k writes uns['semst_auto_domain']: pass key='semst_auto_domain'), or pass the curve")
    elif isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict):
        raise _config_error(f"stability draws an AnnData, a StabilityCurve or its summary(), got {type(data).__name__}")
    return StabilityCurve.from_summary(data)


def stability(data, *, key: str = UNS_KEY, annotated_k: int | None = None, title: str = "", ax=None):
    """The stability curve of the number of domains, drawn as in the run folder's ``stability.png``.

    k against its stability (mean +- sd of the Fowlkes-Mallows index over pairs of k-means runs),
    the searched range shaded, the chosen k circled.

    Parameters
    ----------
    data
        An AnnData (the curve in ``uns[key]["stability"]``), the
        :class:`~semst.cluster.autok.StabilityCurve` that :func:`semst.tl.auto_k` returns, or its
        ``summary()`` (e.g. ``metrics.json``'s ``"auto_k"``).
    key
        The ``adata.uns`` key holding the curve: ``"semst"`` after
        ``semst.tl.domains(adata, n_domains="auto")``, ``key_added`` (``"semst_auto_domain"``) after
        :func:`semst.tl.auto_k`.
    annotated_k
        Also mark this k (e.g. the number of annotated domains) with a dashed line.
    title
        The panel's title.
    ax
        The matplotlib Axes to draw into; None: a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn into. ``adata`` is not changed.
    """
    from semst.cluster.autok import STABILITY_FIGSIZE, draw_stability

    curve = _stability_curve(data, key)
    if ax is None:
        ax = _new_axes(STABILITY_FIGSIZE)[0]
    draw_stability(ax, curve, annotated_k, title)
    return ax


def _histories(data, key: str) -> dict:
    if hasattr(data, "uns"):  # an AnnData
        data = _from_uns(data, key, "losses", "run semst.tl.domains(adata) first, or pass the histories")
    elif isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict) or not all(isinstance(h, dict) for h in data.values()):
        raise _config_error("losses draws an AnnData or a dict seed -> {loss term -> per-epoch values}, "
                            f"got {type(data).__name__}")
    return data


def _loss_axes(ax, terms: list[str]) -> list:
    from semst.cluster.plots import LOSS_PANEL_SIZE

    if ax is None:
        return _new_axes((LOSS_PANEL_SIZE[0] * len(terms), LOSS_PANEL_SIZE[1]), ncols=len(terms))
    axes = [ax] if _is_axes(ax) else list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) != len(terms):
        raise _config_error(f"{len(terms)} loss terms ({', '.join(terms)}) need as many Axes, got {len(axes)}: "
                            f"pass terms= as many as the Axes given")
    return axes


def losses(data, *, key: str = UNS_KEY, terms: str | list[str] | None = None, ax=None):
    """Training losses against the epoch, one line per seed, drawn as in the run folder's ``loss.png``.

    Parameters
    ----------
    data
        An AnnData (the losses in ``uns[key]["losses"]``, written by :func:`semst.tl.domains`) or
        the histories themselves, a dict seed -> loss term -> per-epoch values.
    key
        The ``adata.uns`` key holding the losses.
    terms
        The loss term(s) to draw, one panel each. Default: every term, the total first, except when
        ``ax`` is a single Axes: then the total only.
    ax
        None (a new figure, one panel per term), one Axes (one term), or a sequence of Axes (one per
        term).

    Returns
    -------
    matplotlib.axes.Axes or list of matplotlib.axes.Axes
        The Axes drawn into: one Axes when one term is drawn, else a list in the order of the terms.
        ``adata`` is not changed.
    """
    from semst.cluster.plots import draw_loss, loss_terms

    histories = _histories(data, key)
    recorded = loss_terms(histories)
    if not recorded:
        raise _config_error("no losses recorded (a method that does not train has none)")
    if terms is None:
        terms = recorded[:1] if ax is not None and _is_axes(ax) else recorded
    terms = [terms] if isinstance(terms, str) else list(terms)
    unknown = [t for t in terms if t not in recorded]
    if unknown or not terms:
        raise _config_error(f"no loss term {', '.join(map(repr, unknown)) or '(none given)'}: the recorded terms "
                            f"are {', '.join(recorded)}")
    axes = _loss_axes(ax, terms)
    for i, (panel, term) in enumerate(zip(axes, terms)):
        draw_loss(panel, histories, term, legend=i == 0)
    return axes[0] if len(axes) == 1 else axes
