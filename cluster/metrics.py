"""Clustering metrics on labelled spots, x100 like the paper."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score


def _labelled(y_true) -> np.ndarray:
    s = pd.Series(np.asarray(y_true, dtype=object))
    return (s.notna() & (s.astype(str) != "nan")).to_numpy()


def match_clusters(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Map each predicted cluster to a true domain by the Hungarian assignment maximising overlap.

    Works for any numbers of clusters and domains; clusters left without a partner (more clusters
    than domains) map to a label that matches no domain, so they count as errors.
    """
    truths, t_idx = np.unique(y_true.astype(str), return_inverse=True)
    preds, p_idx = np.unique(y_pred.astype(str), return_inverse=True)
    overlap = np.zeros((len(preds), len(truths)), dtype=np.int64)
    np.add.at(overlap, (p_idx, t_idx), 1)
    rows, cols = linear_sum_assignment(-overlap)
    mapping = {r: truths[c] for r, c in zip(rows, cols)}
    return np.array([mapping.get(i, "\x00unmatched") for i in p_idx], dtype=object)


def cluster_metrics(y_true, y_pred) -> dict:
    """ARI, NMI, ACC (Hungarian matching), macro and weighted F1 (after the same matching), x100.

    Spots without a label (NaN/None) are left out; ``n_labelled`` says how many were used.
    """
    y_true = np.asarray(y_true, dtype=object)
    y_pred = np.asarray(y_pred)
    keep = _labelled(y_true)
    if not keep.any():
        raise ValueError("no labelled spot: metrics need at least one annotated spot")
    t = y_true[keep].astype(str)
    p = y_pred[keep]
    mapped = match_clusters(t, p).astype(str)
    return {
        "ARI": 100.0 * adjusted_rand_score(t, p),
        "NMI": 100.0 * normalized_mutual_info_score(t, p),
        "ACC": 100.0 * float(np.mean(mapped == t)),
        "F1_macro": 100.0 * f1_score(t, mapped, labels=np.unique(t), average="macro", zero_division=0),
        "F1_weighted": 100.0 * f1_score(t, mapped, labels=np.unique(t), average="weighted", zero_division=0),
        "n_labelled": int(keep.sum()),
    }
