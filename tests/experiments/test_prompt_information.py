"""semst prompt-info: how much domain information the prompts' gene lists hold (issue 9, item 5)."""
from __future__ import annotations

import numpy as np
import pytest
from toy_slides import two_domain_slide

from semst.experiments.prompt_information import (
    PromptInformationError,
    gene_list_features,
    kmeans_ari,
    prompt_information,
)


def test_gene_lists_that_name_the_domain_score_100_and_lists_that_do_not_score_about_0():
    left, right = ["GFAP", "AQP4", "MT3"], ["SNAP25", "NRGN", "CALM2"]
    labels = np.array(["a"] * 20 + ["b"] * 20)
    telling = [left] * 20 + [right] * 20
    assert kmeans_ari(gene_list_features(telling, n_components=2), labels) == (100.0, 0.0)
    rng = np.random.default_rng(0)
    silent = [list(rng.permutation(left + right)[:3]) for _ in range(40)]
    assert kmeans_ari(gene_list_features(silent, n_components=2), labels)[0] < 20


def test_unannotated_spots_are_left_out_of_the_score():
    lists = [["GFAP", "AQP4"]] * 10 + [["SNAP25", "NRGN"]] * 10
    labels = np.array(["a"] * 10 + [None] * 5 + ["b"] * 5, dtype=object)  # spots 10-14 unannotated
    assert kmeans_ari(gene_list_features(lists, n_components=1), labels) == (100.0, 0.0)


def test_a_slide_without_annotation_is_refused():
    with pytest.raises(PromptInformationError, match="no annotation"):
        kmeans_ari(np.zeros((4, 2)), [None] * 4)


def test_a_toy_slide_reports_every_setting_and_says_which_embeddings_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    slide = two_domain_slide()
    left = (slide.obs["ground_truth"] == "left").to_numpy()
    slide.X[left, :3] += 50  # each half's three top genes are its own
    slide.X[~left, 3:6] += 50
    rows = prompt_information("toy", recipes=["semst"], rankings=["counts", "scaled"], k_values=[3, 5],
                              cache=tmp_path / "empty.zarr", adata=slide, log=lambda *a: None)
    assert [(r.gene_ranking, r.k_genes) for r in rows] == [("counts", 3), ("counts", 5), ("scaled", 3), ("scaled", 5)]
    assert all(np.isnan(r.embedding[0]) for r in rows)  # nothing was embedded into this cache
    assert rows[0].lists == (100.0, 0.0)  # the top-3 genes by count name the half
    assert rows[0].expression == rows[3].expression  # one expression reference per recipe
