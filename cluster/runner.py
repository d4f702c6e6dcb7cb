"""The one per-seed loop every stage-2 method plugs into: SemST, STAGATE and the k-means baselines.

A method is a function ``fit(seed) -> result`` whose result has ``latent`` (spots x d, what k-means
clusters) and ``history`` (per-epoch losses; empty for methods that do not train). Everything else
is shared and written once: loading and checking the slide, the annotation, the number of domains,
preprocessing, the spatial graph, k-means per seed, metrics on labelled spots, mean +- sd.

Nothing here looks at the annotation except to *report* metrics: the latent is the method's last
word, k-means runs with a fixed number of domains, and every seed's result is kept.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semst.shared.config import ClusterConfig

METRICS = ("ARI", "NMI", "ACC", "F1_macro", "F1_weighted")


class ClusterError(RuntimeError):
    """Stage 2 cannot run as asked; the message says why and what to do."""


@dataclass
class ClusterReport:
    dataset: str
    run_dir: Path | None
    n_spots: int
    n_domains: int
    per_seed: list[dict] = field(default_factory=list)  # seed, seconds, metrics (if annotated)
    summary: dict = field(default_factory=dict)  # metric -> {"mean", "sd", "n"}
    labels: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> domain per spot
    latents: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> what k-means clustered
    histories: dict[int, dict] = field(default_factory=dict)  # seed -> per-epoch losses


def annotation(adata) -> pd.Series:
    """The slide's ground truth per spot (all NaN where the slide has no annotation)."""
    if "ground_truth" in adata.obs:
        return adata.obs["ground_truth"]
    return pd.Series([np.nan] * adata.n_obs, index=adata.obs_names)


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


def slide_spatial_graph(cfg: ClusterConfig, coords):
    """The spatial graph the config asks for: ``spatial_k`` nearest spots if set, else ``radius``
    (or the paper recipe's unit-free rules, see cluster.graphs.spatial_graph_rule)."""
    from semst.cluster.graphs import spatial_graph, spatial_graph_rule

    if (getattr(cfg, "radius_spacings", None) is not None or getattr(cfg, "spatial_adaptive_k", None) is not None
            or getattr(cfg, "spatial_self_loops", 1) > 1):
        return spatial_graph_rule(coords, cfg.radius, cfg.spatial_k, cfg.radius_spacings, cfg.spatial_adaptive_k,
                                  cfg.adaptive_step_spacings, cfg.spatial_self_loops)[0]
    return spatial_graph(coords, radius=cfg.radius if cfg.spatial_k is None else None, k=cfg.spatial_k)


@dataclass
class Slide:
    """One slide, checked, with what every method reads; preprocessing and graphs are computed on
    first use and then shared by every seed."""

    cfg: ClusterConfig
    adata: Any
    coords: np.ndarray
    truth: pd.Series
    n_domains: int
    threads: int  # the thread budget every pool runs with (semst.shared.threads)

    @functools.cached_property
    def prep(self):
        from semst.shared.preprocess import preprocess

        return preprocess(self.adata, self.cfg.preprocess)

    @functools.cached_property
    def spatial_graph(self):
        return slide_spatial_graph(self.cfg, self.coords)

    @property
    def spot_ids(self) -> list[str]:
        return list(self.adata.obs_names)

    @property
    def annotated(self) -> bool:
        return bool(self.truth.notna().any())


def load_slide(cfg: ClusterConfig, adata=None) -> Slide:
    """The dataset of ``cfg`` (or ``adata``), its coordinates checked and its number of domains fixed,
    with every thread pool bounded by ``cfg.threads`` first."""
    from semst.shared.datasets import check_coordinates, load_dataset
    from semst.shared.threads import apply_thread_budget

    threads = apply_thread_budget(cfg.threads)
    if adata is None:
        adata = load_dataset(cfg.dataset)
    coords = np.asarray(check_coordinates(adata), dtype=np.float64)
    truth = annotation(adata)
    return Slide(cfg, adata, coords, truth, resolve_n_domains(cfg, truth), threads)


def run_seeds(slide: Slide, fit: Callable[[int], Any], run_dir: Path | None = None, log=print,
              fixed_seconds: float = 0.0) -> ClusterReport:
    """``fit(seed)`` for every seed of the slide's config, then k-means and metrics; a report.

    ``fixed_seconds``: work shared by every seed (e.g. a baseline's PCA), added to each seed's time.
    """
    from semst.cluster.domains import kmeans_domains
    from semst.cluster.metrics import cluster_metrics

    cfg = slide.cfg
    report = ClusterReport(cfg.dataset, run_dir, slide.adata.n_obs, slide.n_domains)
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        result = fit(seed)
        labels = kmeans_domains(result.latent, slide.n_domains, seed)
        row: dict[str, Any] = {"seed": seed, "seconds": round(time.perf_counter() - t0 + fixed_seconds, 2)}
        row.update(getattr(result, "report", None) or {})  # e.g. the FiLM gate (fsm_mode "gated")
        if slide.annotated:
            row.update(cluster_metrics(slide.truth.to_numpy(), labels))
        report.per_seed.append(row)
        report.labels[seed] = labels
        report.latents[seed] = result.latent
        report.histories[seed] = getattr(result, "history", {}) or {}
        log("seed {}: {}".format(seed, ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.items() if k != "seed")))
    report.summary = summarise(report.per_seed)
    if report.summary:
        log("mean +- sd over seeds " + ",".join(map(str, cfg.seeds)) + ": " + ", ".join(
            f"{k} {v['mean']:.2f} +- {v['sd']:.2f}" for k, v in report.summary.items()))
    return report


def summarise(per_seed: list[dict]) -> dict:
    """Mean and sample sd (ddof=1; 0 for a single seed) of each metric over seeds."""
    out = {}
    for m in METRICS:
        values = [r[m] for r in per_seed if m in r]
        if values:
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[m] = {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}
    return out
