"""Label-free domains: the number of domains by stability, consensus over seeds, spatial refinement."""
from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_blobs

from semst.cluster.autok import choose_k, stability_curve
from semst.cluster.domains import align_labels, consensus_labels, refine_labels
from semst.cluster.seeds import load_slide, run_seeds
from semst.shared.config import load_cluster_config


def quiet(*a, **k):
    pass


# -- the stability score ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k_true", [3, 5, 8])
def test_stability_picks_the_number_of_blobs(k_true):
    X, _ = make_blobs(600, centers=k_true, n_features=10, cluster_std=1.0, center_box=(-10, 10), random_state=1)
    assert stability_curve([X], 3, 12, runs=10).chosen == k_true


def two_groups_of_three_blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    axis = 25 * np.eye(10)[0]
    centres = np.concatenate([rng.normal(0, 3, (3, 10)) + axis, rng.normal(0, 3, (3, 10)) - axis])
    return make_blobs(600, centers=centres, cluster_std=1.0, random_state=0)[0]


def test_two_groups_of_three_blobs_give_six_not_the_always_stable_two():
    curve = stability_curve([two_groups_of_three_blobs()], 2, 10, runs=10)
    most_stable = max(range(2, 11), key=lambda k: (curve.mean[k], -k))
    assert most_stable == 2  # raw stability: two clusters are as stable as it gets
    assert curve.chosen == 6  # scored against its neighbours, 2 does not beat k = 1


def test_a_k_must_stand_out_from_its_neighbours_and_the_most_stable_peak_wins():
    mean = {2: 0.9, 3: 0.8, 4: 0.85, 5: 0.7, 6: 0.75, 7: 0.72, 8: 0.6}
    assert choose_k(mean, 3, 7) == (4, [4, 6])


def test_a_bump_smaller_than_its_standard_error_is_no_peak():
    mean = {2: 0.9, 3: 0.8, 4: 0.85, 5: 0.7, 6: 0.75, 7: 0.72, 8: 0.6}
    assert choose_k(mean, 3, 7, se={4: 0.01, 6: 0.04}) == (4, [4])  # 6 rises 0.03 above 7: within its noise
    assert choose_k(mean, 3, 7, se={4: 0.06, 6: 0.04}) == (4, [])  # no peak left: the most stable k


def test_a_curve_without_a_peak_takes_the_most_stable_k_of_the_range():
    mean = {2: 0.95, 3: 0.9, 4: 0.8, 5: 0.7, 6: 0.6}
    assert choose_k(mean, 3, 5) == (3, [])


def test_the_stability_curve_is_deterministic_and_covers_the_range_plus_one_each_side():
    X = make_blobs(300, centers=4, n_features=5, random_state=2)[0]
    a, b = stability_curve([X, X + 0.1], 3, 6, runs=4), stability_curve([X, X + 0.1], 3, 6, runs=4)
    assert a.ks == [2, 3, 4, 5, 6, 7] and a.mean == b.mean and a.sd == b.sd and a.chosen == b.chosen
    table = a.table()
    assert list(table["k"]) == a.ks and table["chosen"].sum() == 1 and table["in_range"].sum() == 4


# -- never the annotation --------------------------------------------------------------------------------

@dataclass
class FixedFit:
    latent: np.ndarray
    history: dict = field(default_factory=dict)


def blob_slide(truth) -> ad.AnnData:
    X, _ = make_blobs(200, centers=4, n_features=6, cluster_std=1.0, center_box=(-10, 10), random_state=0)
    a = ad.AnnData(X=np.ones((200, 3), dtype=np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(200)]))
    a.obsm["spatial"] = np.random.default_rng(0).uniform(0, 20, (200, 2))
    a.obsm["latent"] = X
    if truth is not None:
        a.obs["ground_truth"] = truth
    return a


def auto_run(adata, **overrides):
    cfg = load_cluster_config("toy", {"spatial_k": 4, "n_domains": "auto:2-8", "seeds": [0, 1, 2], **overrides})
    slide = load_slide(cfg, adata)
    rng = np.random.default_rng(5)
    latents = {s: adata.obsm["latent"] + rng.normal(0, 0.3, adata.obsm["latent"].shape) for s in cfg.seeds}
    return run_seeds(slide, lambda seed: FixedFit(latents[seed]), log=quiet)


def test_auto_k_never_reads_the_annotation():
    truth = np.array(list("abcd") * 50, dtype=object)
    runs = [auto_run(blob_slide(truth)),
            auto_run(blob_slide(np.random.default_rng(1).permutation(truth))),
            auto_run(blob_slide(None))]
    assert [r.n_domains for r in runs] == [4, 4, 4]
    for r in runs[1:]:
        assert r.auto.mean == runs[0].auto.mean
        for seed in (0, 1, 2):
            np.testing.assert_array_equal(r.labels[seed], runs[0].labels[seed])
        np.testing.assert_array_equal(r.consensus, runs[0].consensus)
    assert runs[0].summary and runs[2].summary == {} and runs[2].auto_comparison == {}


def test_with_an_annotation_auto_reports_the_ari_at_the_chosen_and_the_annotated_k():
    truth = np.array(list("abc") * 66 + ["a", "b"], dtype=object)  # 3 annotated domains, 4 blobs found
    report = auto_run(blob_slide(truth))
    c = report.auto_comparison
    assert (c["annotated_k"], c["chosen_k"]) == (3, 4)
    assert c["stability_annotated"] == report.auto.mean[3] and c["ARI_annotated"]["n"] == 3
    assert c["ARI_chosen"]["mean"] == pytest.approx(report.summary["ARI"]["mean"])
    assert c["ARI_chosen"]["consensus"] == pytest.approx(report.consensus_metrics["ARI"])


# -- consensus over seeds --------------------------------------------------------------------------------

def test_consensus_of_identical_runs_equals_each_run():
    labels = np.random.default_rng(0).integers(0, 5, 300)
    np.testing.assert_array_equal(consensus_labels([labels, labels.copy(), labels.copy()]), labels)


def test_consensus_of_the_same_partition_under_other_label_numbers_keeps_the_first_runs_numbers():
    labels = np.random.default_rng(1).integers(0, 4, 200)
    renamed = np.array([3, 0, 1, 2])[labels]
    np.testing.assert_array_equal(consensus_labels([labels, renamed, (labels + 2) % 4]), labels)


def test_consensus_takes_the_majority_of_aligned_runs():
    base = np.repeat([0, 1, 2], 10)
    odd = base.copy()
    odd[:3] = 2  # one run disagrees on three spots
    renamed = np.array([1, 2, 0])[base]  # the majority, under other numbers
    np.testing.assert_array_equal(consensus_labels([odd, renamed, base]), base)


def test_align_labels_maps_by_overlap_and_numbers_the_unmatched_after_the_reference():
    ref = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(align_labels(np.array([5, 5, 7, 9]), ref), [0, 0, 1, 2])


# -- spatial refinement ----------------------------------------------------------------------------------

def test_refine_gives_a_spot_the_label_most_of_its_neighbours_have():
    # a path 0-1-2-3-4: spot 2 is surrounded by label 0, spot 4 ties (0 vs its own 1) and keeps its own
    labels = np.array([0, 0, 1, 0, 1])
    src = np.array([0, 1, 1, 2, 2, 3, 3, 4])
    dst = np.array([1, 0, 2, 1, 3, 2, 4, 3])
    np.testing.assert_array_equal(refine_labels(labels, src, dst), [0, 0, 0, 1, 0])


def test_refine_is_off_by_default_and_a_config_switch():
    assert load_cluster_config("mob").refine is False
    truth = np.array(list("abcd") * 50, dtype=object)
    plain, refined = auto_run(blob_slide(truth), n_domains=4), auto_run(blob_slide(truth), n_domains=4, refine=True)
    assert not np.array_equal(plain.labels[0], refined.labels[0])  # random coordinates: the vote changes spots
