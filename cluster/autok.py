"""The number of domains from the learned embeddings alone: clustering stability over runs.

``n_domains = "auto:LO-HI"`` (CLI ``--n-domains auto:3-15``). The idea is CellCharter's
``ClusterAutoK`` (Varrone et al., Nat Genet 2024): cluster the data many times for every k and keep
the k whose solutions agree most. Our version, on SemST's embeddings:

1. **Runs.** For every k from LO - 1 to HI + 1 (the range extended by one on each side, as CellCharter
   does, so that both ends of the range have two neighbours), ``auto_runs`` k-means fits with one
   initialisation each (k-means++ seeded with the run's number). Run ``r`` clusters the embedding of
   seed ``seeds[r % len(seeds)]``: with several seeds the runs see both sources of variation,
   training and k-means initialisation; with one seed, initialisation only. k = 1 is the trivial
   one-domain labelling (no fit).
2. **Stability of k:** the Fowlkes-Mallows index (scikit-learn's ``fowlkes_mallows_score``) between
   the solutions of every pair of runs at that k, averaged; its sd over the pairs is the spread
   drawn in ``stability.png``.
3. **Scored against its neighbours.** Raw stability favours small k (two clusters are almost always
   stable, and on a continuum stability simply falls with k). CellCharter compares every k with
   k - 1 and k + 1 (it averages the similarity of solutions at k with those at k +- 1); measured on
   synthetic blobs with that comparison and FMI (or ARI), its maximum sat one above the true number
   of clusters, so we compare the *stabilities* instead: a k is a candidate only when its stability
   is a peak that stands out of the noise, i.e. higher than at k - 1 and ``margin`` = stability(k) -
   max(stability(k - 1), stability(k + 1)) at least the standard error of stability(k) (its sd over
   pairs / sqrt(runs)): on a flat stretch of the curve, a bump smaller than the run-to-run noise is no
   evidence for k. The chosen k is the most stable candidate; if there is none (a monotone curve: no
   k stands out, e.g. a continuum of expression), the most stable k of the range, i.e. usually its
   lower bound. Ties go to the smaller k.

Nothing here reads the annotation: the input is the list of learned embeddings, the output a k.
Deterministic for the same embeddings (every fit is seeded). Cost: (HI - LO + 3) x ``auto_runs``
single-initialisation k-means fits plus the pairwise scores -- a few seconds on 5k spots x 128
dimensions for the default range and 10 runs, against minutes of training.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class StabilityCurve:
    """The stability of every k of the extended range and the k chosen from it."""

    lo: int
    hi: int
    runs: int
    chosen: int
    mean: dict[int, float] = field(default_factory=dict)  # k -> mean FMI over pairs of runs
    sd: dict[int, float] = field(default_factory=dict)  # k -> sd of the FMI over pairs of runs
    peaks: list[int] = field(default_factory=list)  # k in [lo, hi] whose stability is a local peak
    seconds: float = 0.0

    @property
    def ks(self) -> list[int]:
        return sorted(self.mean)

    def se(self, k: int) -> float:
        """Standard error of the stability at k: sd over pairs / sqrt(runs)."""
        return self.sd[k] / np.sqrt(self.runs)

    def margin(self, k: int) -> float:
        """Stability at k minus the higher of its two neighbours' (>= 0: k stands out)."""
        return self.mean[k] - max(self.mean[k - 1], self.mean[k + 1])

    def table(self) -> pd.DataFrame:
        rows = []
        for k in self.ks:
            inside = self.lo <= k <= self.hi
            rows.append({"k": k, "stability": self.mean[k], "sd": self.sd[k], "se": self.se(k), "in_range": inside,
                         "margin": self.margin(k) if inside else np.nan, "peak": k in self.peaks,
                         "chosen": k == self.chosen})
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        return {"range": f"auto:{self.lo}-{self.hi}", "chosen": self.chosen, "runs": self.runs,
                "stability": {str(k): round(self.mean[k], 4) for k in self.ks},
                "sd": {str(k): round(self.sd[k], 4) for k in self.ks},
                "peaks": list(self.peaks), "seconds": round(self.seconds, 2),
                "rule": "most stable peak of the k-means stability (mean pairwise Fowlkes-Mallows index over "
                        "runs) rising above both neighbours by at least its standard error; the most stable "
                        "k of the range if there is no such peak"}

    @classmethod
    def from_summary(cls, summary: dict) -> StabilityCurve:
        """The curve back from its :meth:`summary` (e.g. ``metrics.json``'s "auto_k"; values rounded there)."""
        lo, hi = (int(b) for b in str(summary["range"]).removeprefix("auto:").split("-"))
        return cls(lo, hi, int(summary["runs"]), int(summary["chosen"]),
                   {int(k): float(v) for k, v in summary["stability"].items()},
                   {int(k): float(v) for k, v in summary["sd"].items()},
                   [int(k) for k in summary["peaks"]], float(summary.get("seconds", 0.0)))


def run_labels(latents: Sequence[np.ndarray], k: int, runs: int) -> list[np.ndarray]:
    """The ``runs`` k-means solutions at ``k``: run r clusters latents[r % len(latents)], seed r."""
    from sklearn.cluster import KMeans

    n = len(latents[0])
    if k == 1:
        return [np.zeros(n, dtype=np.int64) for _ in range(runs)]
    out = []
    for r in range(runs):
        X = np.asarray(latents[r % len(latents)], dtype=np.float64)
        out.append(KMeans(n_clusters=k, n_init=1, random_state=r).fit_predict(X).astype(np.int64))
    return out


def pairwise_stability(solutions: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean and sd of the Fowlkes-Mallows index over every pair of solutions."""
    from sklearn.metrics import fowlkes_mallows_score

    scores = [fowlkes_mallows_score(a, b) for a, b in itertools.combinations(solutions, 2)]
    return float(np.mean(scores)), float(np.std(scores))


def choose_k(mean: dict[int, float], lo: int, hi: int, se: dict[int, float] | None = None) -> tuple[int, list[int]]:
    """(chosen k, peaks in [lo, hi]) from the stability of every k in [lo - 1, hi + 1] and its standard
    error (``se``; none = 0): a peak rises above k - 1 and stands out of both neighbours by >= se."""
    se = se or {}
    peaks = [k for k in range(lo, hi + 1)
             if mean[k] > mean[k - 1] and mean[k] - max(mean[k - 1], mean[k + 1]) >= se.get(k, 0.0)]
    candidates = peaks or list(range(lo, hi + 1))
    best = max(candidates, key=lambda k: (mean[k], -k))
    return best, peaks


def stability_curve(latents: Sequence[np.ndarray], lo: int, hi: int, runs: int = 10) -> StabilityCurve:
    """Cluster every k in [lo - 1, hi + 1] ``runs`` times and choose k (see the module docstring)."""
    latents = [np.asarray(z) for z in latents]
    if not latents:
        raise ValueError("stability needs at least one embedding")
    n = len(latents[0])
    if any(len(z) != n for z in latents):
        raise ValueError("every embedding must have one row per spot")
    if not 2 <= lo <= hi or hi + 1 > n:
        raise ValueError(f"the range {lo}-{hi} must satisfy 2 <= lo <= hi and hi + 1 <= the number of spots ({n})")
    if runs < 2:
        raise ValueError(f"stability compares runs: runs must be >= 2, got {runs}")
    t0 = time.perf_counter()
    mean, sd = {}, {}
    for k in range(lo - 1, hi + 2):
        mean[k], sd[k] = pairwise_stability(run_labels(latents, k, runs))
    chosen, peaks = choose_k(mean, lo, hi, {k: sd[k] / np.sqrt(runs) for k in sd})
    return StabilityCurve(lo, hi, runs, chosen, mean, sd, peaks, time.perf_counter() - t0)


STABILITY_FIGSIZE = (5.2, 3.4)  # inches


def draw_stability(ax, curve: StabilityCurve, annotated_k: int | None = None, title: str = "") -> None:
    """k vs stability (mean +- sd over pairs of runs), the range shaded, the chosen k marked."""
    ks = curve.ks
    m = np.array([curve.mean[k] for k in ks])
    s = np.array([curve.sd[k] for k in ks])
    ax.axvspan(curve.lo - 0.5, curve.hi + 0.5, color="0.93", zorder=0, label=f"range {curve.lo}-{curve.hi}")
    ax.fill_between(ks, m - s, m + s, color="tab:blue", alpha=0.2, lw=0)
    ax.plot(ks, m, "o-", color="tab:blue", ms=4, lw=1.2, label="stability (mean +- sd over run pairs)")
    ax.plot([curve.chosen], [curve.mean[curve.chosen]], "o", ms=10, mfc="none", mec="tab:red", mew=2,
            label=f"chosen k = {curve.chosen}")
    if annotated_k is not None:
        ax.axvline(annotated_k, color="0.3", ls="--", lw=1, label=f"annotated k = {annotated_k}")
    ax.set_xticks(ks)
    ax.set_xlabel("number of domains k", fontsize=9)
    ax.set_ylabel(f"Fowlkes-Mallows stability ({curve.runs} runs)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=10)


def plot_stability(curve: StabilityCurve, path: str | Path, annotated_k: int | None = None, title: str = "") -> Path:
    """``stability.png``: :func:`draw_stability` on a figure of its own."""
    from semst.cluster.plots import new_figure, save

    fig = new_figure(STABILITY_FIGSIZE, layout="constrained")
    draw_stability(fig.subplots(), curve, annotated_k, title)
    return save(fig, path)
