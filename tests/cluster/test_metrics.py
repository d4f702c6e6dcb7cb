"""Metrics x100 on labelled spots, with Hungarian matching."""
import math

import numpy as np
import pytest

from semst.cluster.metrics import cluster_metrics


def test_a_relabelled_perfect_clustering_scores_100_everywhere():
    truth = ["a", "a", "b", "b", "c", "c"]
    m = cluster_metrics(truth, [2, 2, 0, 0, 1, 1])
    assert all(math.isclose(m[k], 100.0) for k in ("ARI", "NMI", "ACC", "F1_macro", "F1_weighted"))


def test_unlabelled_spots_are_left_out():
    m = cluster_metrics(["a", None, "b", np.nan, "a"], [0, 5, 1, 7, 0])
    assert m["n_labelled"] == 3 and math.isclose(m["ACC"], 100.0)


def test_accuracy_and_f1_after_matching_on_a_known_case():
    # clusters: 0 -> a (2 of 3 right), 1 -> b (2 of 2); one 'a' spot lands in cluster 1
    truth = ["a", "a", "a", "b", "b"]
    pred = [0, 0, 1, 1, 1]
    m = cluster_metrics(truth, pred)
    assert math.isclose(m["ACC"], 80.0)
    # a: precision 1, recall 2/3 -> F1 0.8; b: precision 2/3, recall 1 -> F1 0.8
    assert math.isclose(m["F1_macro"], 80.0)
    assert math.isclose(m["F1_weighted"], 80.0)


def test_more_clusters_than_domains_count_the_extra_cluster_as_errors():
    m = cluster_metrics(["a", "a", "b", "b"], [0, 2, 1, 1])
    assert math.isclose(m["ACC"], 75.0)


def test_no_labelled_spot_is_an_error():
    with pytest.raises(ValueError, match="no labelled spot"):
        cluster_metrics([None, np.nan], [0, 1])


def test_kmeans_above_the_fit_size_fits_a_seeded_sample_and_assigns_every_spot(monkeypatch):
    from semst.cluster import domains

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, size=(300, 2)), rng.normal(5, 0.1, size=(300, 2))])
    monkeypatch.setattr(domains, "KMEANS_FIT_MAX", 100)
    a, b = domains.kmeans_domains(x, 2, 3), domains.kmeans_domains(x, 2, 3)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 600 and len(set(a[:300])) == 1 and len(set(a[300:])) == 1 and a[0] != a[-1]
