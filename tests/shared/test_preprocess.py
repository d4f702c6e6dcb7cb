"""Preprocessing and each spot's top expressed genes."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from semst.shared.config import PreprocessConfig
from semst.shared.preprocess import PreprocessError, preprocess, top_k_genes


def toy(X, genes):
    return ad.AnnData(X=sp.csr_matrix(np.asarray(X, dtype=np.float32)),
                      obs=pd.DataFrame(index=[f"s{i}" for i in range(len(X))]), var=pd.DataFrame(index=genes))


def test_top_k_lists_genes_by_descending_count_ties_in_gene_order_and_never_zero():
    a = toy([[5, 0, 7, 5, 1],
             [0, 0, 0, 2, 0],
             [0, 0, 0, 0, 0]], ["A", "B", "C", "D", "E"])
    assert top_k_genes(a, 3) == [["C", "A", "D"], ["D"], []]


def test_top_k_reads_the_counts_layer_of_a_preprocessed_object():
    a = toy([[1, 9]], ["A", "B"])
    a.layers["counts"] = sp.csr_matrix(np.array([[9, 1]], dtype=np.float32))
    assert top_k_genes(a, 1) == [["A"]]


def test_k_larger_than_the_genes_is_refused():
    with pytest.raises(PreprocessError, match="k_g=6 is larger than the 5 genes"):
        top_k_genes(toy([[1, 2, 3, 4, 5]], list("ABCDE")), 6)


def test_preprocess_keeps_counts_and_size_factors_of_the_selected_genes_and_leaves_input_alone():
    rng = np.random.default_rng(0)
    X = rng.poisson(rng.uniform(0.5, 20, size=40), size=(60, 40)).astype(np.float32)
    X[:, 0] = 0  # detected nowhere: filtered out
    a = toy(X, [f"G{j}" for j in range(40)])
    before = a.X.toarray().copy()
    out = preprocess(a, PreprocessConfig(min_cells=1, n_top_genes=10))
    assert out.shape == (60, 10) and "G0" not in out.var_names
    cols = [int(g[1:]) for g in out.var_names]
    np.testing.assert_array_equal(out.layers["counts"].toarray(), X[:, cols])
    lib = X[:, 1:].sum(1)  # library size after the gene filter
    np.testing.assert_allclose(out.obs["size_factor"], lib / np.median(lib), rtol=1e-6)
    assert out.X.dtype == np.float32 and out.X.max() <= 10.0
    np.testing.assert_array_equal(a.X.toarray(), before)


def test_hvg_selection_is_capped_at_the_number_of_genes():
    X = np.random.default_rng(1).poisson(4, size=(30, 8)).astype(np.float32)
    out = preprocess(toy(X, list("ABCDEFGH")), PreprocessConfig(min_cells=1, n_top_genes=3000))
    assert out.n_vars == 8 and out.uns["preprocess"]["n_top_genes_capped"]
