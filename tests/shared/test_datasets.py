"""Datasets: found on the search path, loaded with raw counts, bad input refused with a reason."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from semst.shared import datasets, paths
from semst.shared.datasets import DatasetError, check_coordinates, find_dataset, load_dataset


def toy(X, genes=None) -> ad.AnnData:
    X = np.asarray(X)
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"s{i}" for i in range(X.shape[0])]),
                   var=pd.DataFrame(index=genes or [f"G{j}" for j in range(X.shape[1])]))
    a.obsm["spatial"] = np.arange(2 * X.shape[0], dtype=float).reshape(-1, 2)
    a.obs["ground_truth"] = ["A"] * X.shape[0]
    return a


@pytest.fixture
def search_path(tmp_path, monkeypatch):
    """An empty data/raw and one SEMST_DATA_PATH folder, both in tmp_path."""
    raw, ext = tmp_path / "raw", tmp_path / "ext"
    raw.mkdir()
    ext.mkdir()
    monkeypatch.setattr(paths, "raw_dir", lambda: raw)
    monkeypatch.setenv("SEMST_DATA_PATH", str(ext))
    return raw, ext


def test_a_real_dataset_loads_with_counts_symbols_coordinates_and_labels(shared_data_dir):
    adata = load_dataset("mob")
    assert adata.shape == (262, 15928)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.data, np.round(adata.X.data))
    assert adata.obsm["spatial"].shape == (262, 2)
    assert adata.obs["ground_truth"].nunique() == 5 and adata.obs["ground_truth"].isna().sum() == 2
    assert "Snap25" in adata.var_names


def test_normalised_values_are_refused_as_not_counts(shared_data_dir):
    with pytest.raises(DatasetError, match="negative values.*raw integer counts"):
        load_dataset("seqfish-cortex")


def test_data_raw_is_searched_before_the_external_path(search_path):
    raw, ext = search_path
    toy([[1, 2]]).write_h5ad(ext / "mine.h5ad")
    assert find_dataset("mine") == ext / "mine.h5ad"
    toy([[3, 4]]).write_h5ad(raw / "mine.h5ad")
    assert find_dataset("mine") == raw / "mine.h5ad"
    assert load_dataset("mine").X.toarray().tolist() == [[3.0, 4.0]]


def test_an_unknown_name_lists_the_known_ones_and_where_it_looked(search_path):
    raw, ext = search_path
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*Known datasets: .*dlpfc-151673") as e:
        find_dataset("nope")
    assert str(raw / "nope.h5ad") in str(e.value) and str(ext / "nope.h5ad") in str(e.value)


def test_a_known_dataset_that_is_missing_says_how_to_get_it(search_path):
    with pytest.raises(DatasetError, match=r"'mba' is not available locally.*semst data mba"):
        load_dataset("mba")


def test_non_integer_values_are_refused(search_path):
    raw, _ = search_path
    toy([[1.5, 2.0], [0.0, 1.0]]).write_h5ad(raw / "frac.h5ad")
    with pytest.raises(DatasetError, match="not integers"):
        load_dataset("frac")


def test_non_numeric_values_are_refused(search_path):
    with pytest.raises(DatasetError, match="not numeric"):
        datasets._as_counts_anndata(toy(np.array([["a", "b"]], dtype=object)), "strings")


def test_duplicate_gene_names_are_refused_and_named(search_path):
    raw, _ = search_path
    a = toy([[1, 2, 3]], genes=["Gfap", "Mbp", "Gfap"])
    with pytest.raises(DatasetError, match="1 gene names occur more than once.*Gfap"):
        datasets.validate_dataset(a, "dup")


def test_coordinates_with_nan_are_refused_with_a_count():
    a = toy([[1], [2], [3]])
    a.obsm["spatial"][1, 0] = np.nan
    with pytest.raises(DatasetError, match="1 spots have NaN"):
        check_coordinates(a)
    del a.obsm["spatial"]
    with pytest.raises(DatasetError, match="no spot coordinates"):
        check_coordinates(a)
