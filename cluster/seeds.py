"""The one per-seed loop every stage-2 method (:mod:`semst.cluster.methods`) plugs into.

A method is a function ``fit(seed) -> result`` whose result has ``latent`` (spots x d, what k-means
clusters) and ``history`` (per-epoch losses; empty for methods that do not train); a method that
clusters itself (another tool, :mod:`semst.experiments.peers.adapter`) also gives ``labels``, which
are then the seed's domains as they are (no k-means, no refinement of ours). Everything else
is shared and written once: loading and checking the slide, the annotation, the number of domains,
preprocessing, the spatial graph, k-means per seed, metrics on labelled spots, mean +- sd.

Nothing here looks at the annotation except to *report* metrics: the latent is the method's last
word, k-means runs with a fixed number of domains or one chosen from the latents alone ("auto"),
and every seed's result is kept.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from semst.cluster.domains import consensus_labels
from semst.shared.config import AutoDomains, ClusterConfig, parse_n_domains
from semst.shared.errors import SemstError

if TYPE_CHECKING:  # imported where used: the graph modules load DGL
    from semst.cluster.spatial import SpatialRule

METRICS = ("ARI", "NMI", "ACC", "F1_macro", "F1_weighted")


class ClusterError(SemstError, RuntimeError):
    """Stage 2 cannot run as asked; the message says why and what to do."""


@dataclass
class ClusterReport:
    dataset: str
    run_dir: Path | None
    n_spots: int
    n_domains: int  # the number of domains used (the chosen one with "auto")
    per_seed: list[dict] = field(default_factory=list)  # seed, seconds, metrics (if annotated)
    summary: dict = field(default_factory=dict)  # metric -> {"mean", "sd", "n"}
    labels: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> domain per spot
    latents: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> what k-means clustered
    histories: dict[int, dict] = field(default_factory=dict)  # seed -> per-epoch losses
    consensus: np.ndarray | None = None  # one labelling from all seeds (several seeds only)
    consensus_metrics: dict = field(default_factory=dict)  # its metrics (if annotated)
    auto: Any = None  # cluster.autok.StabilityCurve when n_domains = "auto..."
    auto_comparison: dict = field(default_factory=dict)  # annotated vs chosen k, ARI at both (if annotated)

    @property
    def main_labels(self) -> np.ndarray:
        """The run's answer: the consensus with several seeds, else the one seed's domains."""
        return self.consensus if self.consensus is not None else next(iter(self.labels.values()))


def annotation(adata) -> pd.Series:
    """The slide's ground truth per spot (all NaN where the slide has no annotation)."""
    if "ground_truth" in adata.obs:
        return adata.obs["ground_truth"]
    return pd.Series([np.nan] * adata.n_obs, index=adata.obs_names)


def resolve_n_domains(cfg: ClusterConfig, ground_truth: pd.Series) -> int | AutoDomains:
    """The number of domains for this slide: the config's k, its "auto" range (checked against the
    number of spots, before anything is trained), or the number of annotated domains."""
    n_spots = len(ground_truth)
    n = cfg.clustering.n_domains
    if not (isinstance(n, int) and not isinstance(n, bool)):
        n = parse_n_domains(n)
    if isinstance(n, AutoDomains):
        if n.hi + 1 > n_spots:
            raise ClusterError(f"n_domains {n}: k above the number of spots; scoring k up to {n.hi} clusters "
                               f"up to {n.hi + 1} domains, but {cfg.dataset} has {n_spots} spots, so the upper "
                               f"bound must be at most {n_spots - 1}")
        return n
    if n is None:
        n = int(ground_truth.dropna().nunique())
        if n < 2:
            raise ClusterError(f"{cfg.dataset} has no usable annotation ({n} annotated domains): "
                               f"pass --n-domains K, or --n-domains auto to choose it from the data")
    if n < 2 or n > n_spots:
        raise ClusterError(f"n-domains must be between 2 and the number of spots ({n_spots}), got {n}")
    return n


@dataclass
class Slide:
    """One slide, checked, with what every method reads; preprocessing and graphs are computed on
    first use and then shared by every seed."""

    cfg: ClusterConfig
    adata: Any
    coords: np.ndarray
    truth: pd.Series
    n_domains: int | AutoDomains  # AutoDomains: chosen after training (run_seeds)
    threads: int  # the thread budget every pool runs with (semst.shared.threads)
    spatial: SpatialRule  # the spatial-graph rule (the config's, or a graph given by the caller)

    @functools.cached_property
    def prep(self):
        from semst.shared.preprocess import preprocess

        return preprocess(self.adata, self.cfg.preprocess)

    @functools.cached_property
    def spatial_graph(self):
        return self.spatial.build(self.coords)

    @property
    def spot_ids(self) -> list[str]:
        return list(self.adata.obs_names)

    @property
    def annotated(self) -> bool:
        return bool(self.truth.notna().any())


def load_slide(cfg: ClusterConfig, adata=None, spatial: SpatialRule | None = None) -> Slide:
    """The dataset of ``cfg`` (or ``adata``), checked (:func:`semst.shared.datasets.check_slide`) and
    its number of domains fixed, with every thread pool bounded by ``cfg.train.threads`` first; the fusion must be
    a registered one (an UnknownFusionError, a ConfigError, names the known ones). Its spatial
    graph is built by ``spatial`` (e.g. a :class:`semst.cluster.spatial.GivenGraph`), else by the
    config's rule (:func:`semst.cluster.spatial.spatial_rule`, checked first)."""
    from semst.cluster.fusion import fusion_class
    from semst.cluster.spatial import spatial_rule
    from semst.shared.datasets import check_slide, load_dataset
    from semst.shared.threads import apply_thread_budget

    fusion_class(cfg.model.fusion)  # the registry's names (shared, below it, cannot check them): before any work
    spatial = spatial or spatial_rule(cfg)
    threads = apply_thread_budget(cfg.train.threads)
    if adata is None:
        adata = load_dataset(cfg.dataset)
    coords = check_slide(adata, cfg.dataset, cfg.preprocess)
    truth = annotation(adata)
    return Slide(cfg, adata, coords, truth, resolve_n_domains(cfg, truth), threads, spatial)


def check_neighbour_counts(slide: Slide) -> None:
    """SemST's k-neighbour graphs need more spots than their k: refused before preprocessing (the
    baselines, which build neither graph, do not call this)."""
    from semst.cluster.graphs import GraphError

    cfg, n_spots = slide.cfg, slide.adata.n_obs
    try:
        slide.spatial.check_spots(n_spots)
    except GraphError as exc:
        raise ClusterError(f"{cfg.dataset}: {exc} in a --config file (or spatial={{...}} in semst.domains)") from None
    if cfg.graph.expr_k >= n_spots:
        raise ClusterError(f"{cfg.dataset} has {n_spots} spots, too few for expr_k = {cfg.graph.expr_k} neighbours "
                           f"per spot "
                           f"(at most {n_spots - 1}): set a smaller expr_k in [cluster] of a --config file "
                           f"(or expr_k=... in semst.domains)")


def run_seeds(slide: Slide, fit: Callable[[int], Any], run_dir: Path | None = None, log=print,
              fixed_seconds: float = 0.0) -> ClusterReport:
    """``fit(seed)`` for every seed of the slide's config, then k-means and metrics; a report.

    With ``n_domains = "auto:LO-HI"`` every seed is fitted first, the number of domains is chosen from
    their embeddings alone (:mod:`semst.cluster.autok`), and then every seed is clustered with it.
    With ``refine`` each seed's domains are smoothed over the spatial graph
    (:func:`semst.cluster.domains.refine_labels`). With several seeds, one consensus labelling
    (:func:`semst.cluster.domains.consensus_labels`) is added, with its own metrics.

    ``fixed_seconds``: work shared by every seed (e.g. a baseline's PCA), added to each seed's time.
    """
    from semst.cluster.autok import stability_curve

    cfg = slide.cfg
    auto = slide.n_domains if isinstance(slide.n_domains, AutoDomains) else None
    report = ClusterReport(cfg.dataset, run_dir, slide.adata.n_obs, 0 if auto else slide.n_domains)
    if not slide.annotated:
        log(f"{cfg.dataset}: no annotation (obs['ground_truth']), so no metrics")
    pending: dict[int, float] = {}
    extras: dict[int, dict] = {}
    given: dict[int, np.ndarray] = {}  # domains a method chose itself (another tool's clustering)
    for seed in cfg.clustering.seeds:
        t0 = time.perf_counter()
        result = fit(seed)
        report.latents[seed] = result.latent
        extras[seed] = getattr(result, "report", None) or {}  # e.g. the FiLM gate (fsm_mode "gated")
        report.histories[seed] = getattr(result, "history", {}) or {}
        if getattr(result, "labels", None) is not None:
            given[seed] = np.asarray(result.labels)
        pending[seed] = time.perf_counter() - t0 + fixed_seconds
        if not auto:
            _label_seed(slide, report, seed, pending.pop(seed), log, extras[seed], given.get(seed))
    if auto:
        clustering = cfg.clustering
        curve = stability_curve([report.latents[s] for s in clustering.seeds], auto.lo, auto.hi, clustering.auto_runs)
        report.auto = curve
        report.n_domains = curve.chosen
        log(f"number of domains: {curve.chosen} chosen in {auto} by stability over {curve.runs} k-means runs "
            f"({curve.mean[curve.chosen]:.3f}; peaks at {', '.join(map(str, curve.peaks)) or 'none'}; "
            f"{curve.seconds:.1f} s)")
        for seed in cfg.clustering.seeds:
            _label_seed(slide, report, seed, pending.pop(seed), log, extras[seed], given.get(seed))
    report.summary = summarise(report.per_seed)
    if report.summary:
        log("mean +- sd over seeds " + ",".join(map(str, cfg.clustering.seeds)) + ": " + ", ".join(
            f"{k} {v['mean']:.2f} +- {v['sd']:.2f}" for k, v in report.summary.items()))
    if len(cfg.clustering.seeds) > 1:
        report.consensus = consensus_labels([report.labels[s] for s in cfg.clustering.seeds])
        if slide.annotated:
            report.consensus_metrics = _metrics(slide, report.consensus)
            log("consensus of seeds " + ",".join(map(str, cfg.clustering.seeds)) + ": " + ", ".join(
                f"{k} {report.consensus_metrics[k]:.2f}" for k in METRICS))
    if auto and slide.annotated:
        report.auto_comparison = _compare_with_annotation(slide, report)
        c = report.auto_comparison
        log(f"annotated number of domains {c['annotated_k']}, chosen {c['chosen_k']}: ARI "
            f"{_ari_text(c['ARI_chosen'])} at the chosen k, {_ari_text(c['ARI_annotated'])} at the annotated k")
    return report


def _metrics(slide: Slide, labels: np.ndarray) -> dict:
    from semst.cluster.metrics import cluster_metrics

    return cluster_metrics(slide.truth.to_numpy(), labels)


def _domains(slide: Slide, latent: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means of one seed's latent (and the spatial refinement if the config asks for it)."""
    from semst.cluster.domains import kmeans_domains, refine_labels
    from semst.cluster.graphs import neighbour_pairs

    labels = kmeans_domains(latent, k, seed)
    if slide.cfg.clustering.refine:
        labels = refine_labels(labels, *neighbour_pairs(slide.spatial_graph))
    return labels


def _label_seed(slide: Slide, report: ClusterReport, seed: int, seconds: float, log, extra: dict,
                given: np.ndarray | None = None) -> None:
    """One seed's domains (k-means of its latent, or the ``given`` domains of a method that clusters
    itself), its row and its metrics."""
    t0 = time.perf_counter()
    labels = given if given is not None else _domains(slide, report.latents[seed], report.n_domains, seed)
    row: dict[str, Any] = {"seed": seed, "seconds": round(seconds + time.perf_counter() - t0, 2), **extra}
    if slide.annotated:
        row.update(_metrics(slide, labels))
    report.per_seed.append(row)
    report.labels[seed] = labels
    log("seed {}: {}".format(seed, ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items() if k != "seed")))


def _ari_text(entry: dict) -> str:
    text = f"{entry['mean']:.2f} +- {entry['sd']:.2f}"
    return text + (f" (consensus {entry['consensus']:.2f})" if entry.get("consensus") is not None else "")


def _compare_with_annotation(slide: Slide, report: ClusterReport) -> dict:
    """What not knowing the number of domains cost: ARI at the chosen and at the annotated k (the
    annotated k clustered here for this report only; the chosen k never depends on it)."""
    seeds = slide.cfg.clustering.seeds
    annotated_k = int(slide.truth.dropna().astype(str).nunique())
    curve = report.auto

    def ari(labels_per_seed: dict[int, np.ndarray]) -> dict:
        values = [_metrics(slide, labels_per_seed[s])["ARI"] for s in seeds]
        out = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
               "n": len(values), "consensus": None}
        if len(seeds) > 1:
            out["consensus"] = _metrics(slide, consensus_labels([labels_per_seed[s] for s in seeds]))["ARI"]
        return out

    at_chosen = ari(report.labels)
    if annotated_k == report.n_domains:
        at_annotated = dict(at_chosen)
    elif 2 <= annotated_k <= report.n_spots:
        at_annotated = ari({s: _domains(slide, report.latents[s], annotated_k, s) for s in seeds})
    else:
        at_annotated = {"mean": float("nan"), "sd": float("nan"), "n": 0, "consensus": None}
    return {"annotated_k": annotated_k, "chosen_k": report.n_domains,
            "stability_chosen": curve.mean[curve.chosen], "stability_annotated": curve.mean.get(annotated_k),
            "ARI_chosen": at_chosen, "ARI_annotated": at_annotated}


def summarise(per_seed: list[dict]) -> dict:
    """Mean and sample sd (ddof=1; 0 for a single seed) of each metric over seeds."""
    out = {}
    for m in METRICS:
        values = [r[m] for r in per_seed if m in r]
        if values:
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[m] = {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}
    return out
