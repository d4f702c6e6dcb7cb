"""semst.encode / semst.domains: the Python API on an in-memory AnnData that is not a registered dataset."""
from __future__ import annotations

import numpy as np
import pytest
from tiny_model import HIDDEN, build_tiny_model
from toy_slides import SYMBOLS, two_domain_slide

import semst
from semst.shared.config import ConfigError
from semst.shared.datasets import DatasetError

EMBED = {"backend": "transformers", "k_genes": 5, "batch_size": 8, "genes_from": "all"}
SMALL = {"epochs": 3, "hidden1": 16, "hidden2": 8, "expr_k": 5}


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama"))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty semst home: the API must not need a checkout, a registered dataset or a data folder."""
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    monkeypatch.setenv("SEMST_DATA_PATH", str(tmp_path / "no-data"))
    return tmp_path


def test_encode_returns_one_llm_vector_per_spot_and_stores_it_in_obsm(home, tiny_model):
    a = two_domain_slide()
    vectors = semst.encode(a, model=tiny_model, progress=False, log=quiet, **EMBED)
    assert vectors.shape == (80, HIDDEN)
    np.testing.assert_array_equal(a.obsm["X_semst_llm"], vectors)
    assert (home / "data" / "cache" / "embeddings.zarr").is_dir()  # the default cache, under SEMST_HOME


def test_encode_twice_computes_nothing_the_second_time(home, tiny_model):
    lines = []
    first = semst.encode(two_domain_slide(), model=tiny_model, progress=False, log=quiet, **EMBED)
    again = semst.encode(two_domain_slide(), model=tiny_model, progress=False, log=lines.append, **EMBED)
    np.testing.assert_array_equal(first, again)
    assert " 0 computed" in lines[-1]


def test_domains_writes_domains_and_the_latent_and_returns_the_summary(home, tiny_model):
    a = two_domain_slide()
    semst.encode(a, model=tiny_model, progress=False, log=quiet, **EMBED)
    out = semst.domains(a, seeds=[0, 1], progress=False, log=quiet, **SMALL)
    assert a.obs["semst_domain"].nunique() == 2 and len(a.obs["semst_domain"]) == 80
    assert a.obsm["X_semst"].shape == (80, 8)
    assert out["n_domains"] == 2 and out["summary"]["ARI"]["n"] == 2
    assert [r["seed"] for r in out["per_seed"]] == [0, 1] and out["run_dir"] is None


def test_domains_without_the_llm_needs_no_encode_and_takes_n_domains(home):
    a = two_domain_slide()
    del a.obs["ground_truth"]
    out = semst.domains(a, fusion="none", n_domains=3, progress=False, log=quiet, **SMALL)
    assert a.obs["semst_domain"].nunique() <= 3 and out["n_domains"] == 3
    assert out["summary"] == {}  # no annotation, no metrics


def test_domains_with_auto_chooses_k_and_writes_the_consensus_of_the_seeds(home):
    a = two_domain_slide()
    del a.obs["ground_truth"]
    out = semst.domains(a, fusion="none", n_domains="auto:2-4", seeds=[0, 1, 2], progress=False, log=quiet, **SMALL)
    assert out["auto_k"]["chosen"] == out["n_domains"] and out["auto_k"]["range"] == "auto:2-4"
    assert a.obs["semst_domain"].nunique() <= out["n_domains"] and out["consensus"] == {}


def test_domains_with_out_dir_writes_the_run_folder_of_semst_cluster(home, tmp_path):
    out = semst.domains(two_domain_slide(), fusion="none", out_dir=tmp_path / "results", progress=False,
                        log=quiet, **SMALL)
    names = sorted(p.name for p in (tmp_path / "results").glob("*/*/*"))
    assert out["run_dir"] and names == [".semst-run.json", "config.toml", "domains.parquet", "domains.png",
                                        "embedding.npz", "loss.png", "metrics.json", "semst.h5ad"]


def test_domains_with_the_llm_but_no_encode_says_to_run_encode(home):
    a = two_domain_slide()
    with pytest.raises(ConfigError, match=r"run semst.encode\(adata\) first"):
        semst.domains(a, progress=False, log=quiet, **SMALL)
    assert "semst_domain" not in a.obs


def without_coordinates(a):
    del a.obsm["spatial"]


def normalised(a):
    a.X = a.X / a.X.sum(1, keepdims=True)


def duplicate_genes(a):
    a.var_names = ["SNAP25"] * 2 + SYMBOLS[2:]


def nan_coordinates(a):
    a.obsm["spatial"][5] = np.nan


def one_coordinate_column(a):
    a.obsm["spatial"] = a.obsm["spatial"][:, :1]


def three_coordinate_columns(a):
    a.obsm["spatial"] = np.column_stack([a.obsm["spatial"], np.ones(a.n_obs)])


def duplicate_spots(a):
    a.obs_names = ["c0"] * 2 + list(a.obs_names[2:])


@pytest.mark.parametrize("spoil, message", [
    (without_coordinates, r"no spot coordinates \(obsm\['spatial'\] is missing\)"),
    (nan_coordinates, r"1 spots have NaN or infinite coordinates"),
    (one_coordinate_column, r"obsm\['spatial'\] must have 2 columns \(x, y\), got 1"),
    (three_coordinate_columns, r"obsm\['spatial'\] has 3 columns, but semst's spatial graph is 2-D"),
    (duplicate_spots, r"1 spot names occur more than once \(e.g. c0\)"),
    (normalised, "the ZINB model needs raw integer counts"),
    (duplicate_genes, "gene names occur more than once"),
])
@pytest.mark.parametrize("call", ["encode", "domains"])
def test_bad_input_is_refused_with_the_cli_message_and_adata_is_untouched(home, tiny_model, spoil, message, call):
    a = two_domain_slide()
    spoil(a)
    before = (set(a.obs.columns), set(a.obsm.keys()), a.X.copy())
    with pytest.raises(DatasetError, match=message):
        if call == "encode":
            semst.encode(a, model=tiny_model, progress=False, log=quiet, **EMBED)
        else:
            semst.domains(a, fusion="none", progress=False, log=quiet, **SMALL)
    assert (set(a.obs.columns), set(a.obsm.keys())) == before[:2]
    np.testing.assert_array_equal(a.X, before[2])
    assert not (home / "data" / "cache").exists()  # nothing written anywhere


@pytest.mark.parametrize("options, message", [
    ({"seeds": (0, 0)}, "seeds repeat 0: each seed is one run"),
    ({"seeds": (-1,)}, "seeds must be >= 0, got -1"),
    ({"epochs": "five"}, r'\[cluster\] epochs must be an integer, got "five" \(str\)'),
])
def test_bad_options_are_refused_before_training_and_adata_is_untouched(home, options, message):
    a = two_domain_slide()
    with pytest.raises(ConfigError, match=message):
        semst.domains(a, fusion="none", progress=False, log=quiet, **{**SMALL, **options})
    assert "semst_domain" not in a.obs and "X_semst" not in a.obsm


def test_numpy_integer_seeds_are_taken_as_seeds(home):
    a = two_domain_slide()
    out = semst.domains(a, fusion="none", n_domains=2, seeds=np.arange(2), progress=False, log=quiet, **SMALL)
    assert [row["seed"] for row in out["per_seed"]] == [0, 1]
