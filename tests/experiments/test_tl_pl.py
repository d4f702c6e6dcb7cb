"""semst.tl / semst.pl: the scverse-shaped API (tools write into AnnData, plots draw into any Axes)."""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from toy_slides import two_domain_slide

import semst
from semst.cluster.autok import StabilityCurve
from semst.cluster.plots import annotation_palette
from semst.shared.config import ConfigError

SMALL = {"epochs": 3, "hidden1": 16, "hidden2": 8, "expr_k": 5}
ROOT = Path(semst.__file__).resolve().parent


def quiet(*a, **k):
    pass


def axes() -> matplotlib.axes.Axes:
    """An Axes of a figure outside pyplot: the tests' own drawing chooses no backend either."""
    return Figure().subplots()


@pytest.fixture(scope="module")
def slide():
    """The toy slide after stage 2 without the LLM, k chosen by stability in 2-4, two seeds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEMST_DATA_PATH", "/nonexistent")
        a = two_domain_slide()
        out = semst.tl.domains(a, fusion="none", n_domains="auto:2-4", seeds=[0, 1], progress=False, log=quiet,
                               auto_runs=4, **SMALL)
    return a, out


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join([str(ROOT.parent), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": pythonpath, **env}, cwd=ROOT, timeout=600)


# -- the namespaces --------------------------------------------------------------------------------------

def test_tl_and_pl_are_reachable_from_import_semst_and_encode_domains_are_the_tl_functions():
    assert [name for ns, name in PUBLIC] == ["encode", "domains", "auto_k", "domains", "stability", "losses"]
    assert callable(semst.tl.encode) and callable(semst.tl.domains) and callable(semst.tl.auto_k)
    assert callable(semst.pl.domains) and callable(semst.pl.stability) and callable(semst.pl.losses)
    assert semst.encode is semst.tl.encode and semst.domains is semst.tl.domains
    assert {"tl", "pl", "encode", "domains"} <= set(dir(semst))
    from semst import pl, tl  # noqa: F401  (the scanpy idiom)


def test_import_semst_and_its_namespaces_load_neither_torch_dgl_vllm_nor_matplotlib():
    done = run_python("""
        import sys, semst
        semst.tl, semst.pl, semst.encode, semst.domains
        print(sorted(m for m in ("torch", "dgl", "vllm", "transformers", "matplotlib") if m in sys.modules))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- tl.domains stores what pl draws ---------------------------------------------------------------------

def test_domains_stores_the_losses_and_the_stability_curve_in_uns(slide):
    a, out = slide
    losses = json.loads(a.uns["semst"]["losses"])
    assert sorted(losses) == ["0", "1"] and len(losses["0"]["total"]) == SMALL["epochs"]
    assert json.loads(a.uns["semst"]["stability"]) == out["auto_k"]


def test_domains_with_a_fixed_k_stores_no_stability_curve_and_pl_says_how_to_get_one():
    a = two_domain_slide()
    semst.tl.domains(a, fusion="none", n_domains=2, progress=False, log=quiet, **SMALL)
    assert "stability" not in a.uns["semst"] and "losses" in a.uns["semst"]
    with pytest.raises(ConfigError, match=r"adata.uns\['semst'\] has no 'stability': run semst.tl.domains\(adata, "
                                          r"n_domains='auto'\) or semst.tl.auto_k\(adata\) first"):
        semst.pl.stability(a, ax=axes())


# -- tl.auto_k -------------------------------------------------------------------------------------------

def test_auto_k_on_stage_2s_embedding_chooses_the_k_stage_2_chose():
    a = two_domain_slide()
    out = semst.tl.domains(a, fusion="none", n_domains="auto:2-5", seeds=[0], progress=False, log=quiet,
                           auto_runs=6, **SMALL)
    curve = semst.tl.auto_k(a, use_rep="X_semst", k_range=(2, 5), runs=6)
    assert curve.chosen == out["n_domains"]
    assert curve.summary()["stability"] == out["auto_k"]["stability"]  # the same curve, not only the same k
    # the chosen k clustered as stage 2 clusters the seed: the same domains
    assert list(a.obs["semst_auto_domain"]) == list(a.obs["semst_domain"])


def test_auto_k_writes_the_labels_and_the_curve_under_key_added():
    a = two_domain_slide()
    a.obsm["emb"] = np.where(a.obs["ground_truth"].to_numpy()[:, None] == "left", 0.0, 5.0) + \
        np.random.default_rng(0).normal(0, 0.1, (a.n_obs, 3))
    curve = semst.tl.auto_k(a, use_rep="emb", k_range="auto:2-4", runs=4, key_added="k")
    assert isinstance(curve, StabilityCurve) and curve.chosen == 2 and curve.ks == [1, 2, 3, 4, 5]
    assert a.obs["k"].dtype == "category" and a.obs["k"].nunique() == 2
    assert json.loads(a.uns["k"]["stability"]) == curve.summary()
    assert a.uns["k"]["params"] == {"use_rep": "emb", "k_range": [2, 4], "runs": 4, "random_state": 0}


def no_embedding(a):
    pass


def nan_embedding(a):
    a.obsm["X_semst"][3, 0] = np.nan


def text_embedding(a):
    a.obsm["X_semst"] = np.array([["x"] * 2] * a.n_obs, dtype=object)


@pytest.mark.parametrize("spoil, options, message", [
    (no_embedding, {}, r"adata.obsm has no 'X_semst' \(it has 'spatial', 'emb'\): run semst.tl.domains\(adata\) "
                       r"first"),
    (nan_embedding, {}, r"adata.obsm\['X_semst'\] has NaN or infinite values in 1 of 80 rows"),
    (text_embedding, {}, r"adata.obsm\['X_semst'\] is not a numeric matrix"),
    (None, {"k_range": (1, 4)}, r"k_range \(1, 4\): the smallest number of domains must be >= 2, got 1"),
    (None, {"k_range": (5, 3)}, r"k_range \(5, 3\): the range is empty, 5 > 3; write the smaller bound first"),
    (None, {"k_range": (2, 80)}, r"k_range \(2, 80\): .* adata has 80 spots, so the upper bound must be at most 79"),
    (None, {"k_range": 4}, r"k_range must be a pair of integers \(lo, hi\)"),
    (None, {"k_range": "auto:3"}, r"k_range must be a pair of integers \(lo, hi\), e.g. \(3, 15\), or 'auto:LO-HI', "
                                  r"got 'auto:3'"),
    (None, {"k_range": "5"}, r"k_range must be a pair of integers .* got '5'"),
    (None, {"k_range": "auto:1-4"}, r"k_range 'auto:1-4': the smallest number of domains must be >= 2, got 1"),
    (None, {"runs": 1}, r"runs must be an integer >= 2 \(stability compares runs\), got 1"),
    (None, {"random_state": -1}, r"random_state must be an integer >= 0, got -1"),
    (None, {"key_added": ""}, r"key_added must be a non-empty string"),
])
def test_auto_k_refuses_bad_input_before_any_work_and_leaves_adata_untouched(spoil, options, message):
    a = two_domain_slide()
    a.obsm["emb"] = np.zeros((a.n_obs, 2))
    if spoil is not no_embedding:
        a.obsm["X_semst"] = np.random.default_rng(0).normal(size=(a.n_obs, 4))
    if spoil is not None:
        spoil(a)
    before = (list(a.obs.columns), dict(a.uns))
    with pytest.raises(ConfigError, match=message):
        semst.tl.auto_k(a, **options)
    assert (list(a.obs.columns), dict(a.uns)) == before


# -- pl: draw into the given Axes and return it ----------------------------------------------------------

def test_pl_domains_draws_every_spot_into_the_given_axes_and_returns_it(slide):
    a, _ = slide
    ax = axes()
    assert semst.pl.domains(a, ax=ax) is ax
    (discs,) = ax.collections
    assert len(discs.get_offsets()) == a.n_obs and ax.get_title() == "semst_domain"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(a.obs["semst_domain"].astype(str))


def test_pl_domains_colours_each_domain_as_the_annotated_domain_it_matches():
    a = two_domain_slide()
    a.obs["mine"] = pd.Categorical(np.where(a.obs["ground_truth"] == "left", "1", "0"))  # swapped numbers
    ax = semst.pl.domains(a, key="mine", ax=axes())
    palette = annotation_palette(a.obs["ground_truth"])
    expected = [palette[name] for name in a.obs["ground_truth"]]
    np.testing.assert_allclose(ax.collections[0].get_facecolors(), expected)


def test_pl_domains_draws_the_annotation_itself_with_unknown_spots_grey():
    a = two_domain_slide()
    a.obs["ground_truth"] = a.obs["ground_truth"].where(np.arange(a.n_obs) % 10 != 0)
    ax = semst.pl.domains(a, key="ground_truth", ax=axes())
    colours = ax.collections[0].get_facecolors()
    assert np.allclose(colours[0], (0.85, 0.85, 0.85, 1.0))
    assert ax.get_legend().get_title().get_text() == "annotated"


def test_pl_stability_draws_the_curve_from_adata_or_the_curve_into_the_given_axes(slide):
    a, out = slide
    ax, ax2 = axes(), axes()
    assert semst.pl.stability(a, ax=ax) is ax
    assert semst.pl.stability(StabilityCurve.from_summary(out["auto_k"]), ax=ax2, annotated_k=2) is ax2
    line = next(ln for ln in ax.lines if ln.get_marker() == "o" and len(ln.get_xdata()) > 1)
    assert list(line.get_xdata()) == [1, 2, 3, 4, 5]
    assert any(f"chosen k = {out['n_domains']}" == t.get_text() for t in ax.get_legend().get_texts())


def test_pl_losses_draws_the_total_into_one_axes_one_line_per_seed(slide):
    a, _ = slide
    ax = axes()
    assert semst.pl.losses(a, ax=ax) is ax
    assert ax.get_title() == "total" and [ln.get_label() for ln in ax.lines] == ["seed 0", "seed 1"]


def test_pl_losses_draws_one_term_per_axes_of_a_sequence_and_refuses_a_mismatch():
    histories = {0: {"total": [3, 2, 1], "zinb": [2, 1, 0.5]}}
    fig = Figure()
    pair = list(fig.subplots(1, 2))
    assert semst.pl.losses(histories, ax=pair) == pair
    assert [p.get_title() for p in pair] == ["total", "zinb"]
    with pytest.raises(ConfigError, match=r"2 loss terms \(total, zinb\) need as many Axes, got 3"):
        semst.pl.losses(histories, ax=list(Figure().subplots(1, 3)))
    with pytest.raises(ConfigError, match=r"no loss term 'kl': the recorded terms are total, zinb"):
        semst.pl.losses(histories, terms="kl", ax=axes())


def test_pl_refuses_an_adata_without_what_it_draws():
    a = two_domain_slide()
    with pytest.raises(ConfigError, match=r"adata.obs has no 'semst_domain': run semst.tl.domains\(adata\) first"):
        semst.pl.domains(a, ax=axes())
    with pytest.raises(ConfigError, match=r"adata.uns\['semst'\] has no 'losses': run semst.tl.domains\(adata\)"):
        semst.pl.losses(a, ax=axes())


def test_what_tl_writes_survives_h5ad_and_pl_draws_it_from_the_file(slide, tmp_path):
    a, _ = slide
    semst.tl.auto_k(a, k_range=(2, 4), runs=3)
    a.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for draw, key in ((semst.pl.stability, "semst"), (semst.pl.stability, "semst_auto_domain"),
                      (semst.pl.losses, "semst")):
        ax = axes()
        assert draw(back, key=key, ax=ax) is ax
    assert semst.pl.domains(back, key="semst_auto_domain", ax=axes()).collections


# -- the backend ----------------------------------------------------------------------------------------

def test_neither_semst_pl_nor_the_run_folder_figures_switch_the_users_backend(tmp_path):
    done = run_python(f"""
        import json, sys
        import matplotlib
        import numpy as np
        import semst
        from toy_slides import two_domain_slide
        from semst.cluster.autok import plot_stability, stability_curve
        from semst.cluster.plots import plot_domain_maps, plot_losses

        assert matplotlib.get_backend() == "svg"
        a = two_domain_slide()
        a.obs["semst_domain"] = a.obs["ground_truth"].map({{"left": "0", "right": "1"}}).astype("category")
        curve = stability_curve([np.asarray(a.obsm["spatial"])], 2, 3, runs=2)
        a.uns["semst"] = {{"losses": json.dumps({{0: {{"total": [2.0, 1.0]}}}}), "stability": json.dumps(curve.summary())}}
        out = {str(tmp_path)!r}
        plot_domain_maps(out + "/d.png", a.obsm["spatial"], a.obs["ground_truth"], [("x", np.arange(80) % 2)])
        plot_losses({{0: {{"total": [2.0, 1.0]}}}}, out + "/l.png")
        plot_stability(curve, out + "/s.png")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
        for draw in (semst.pl.domains, semst.pl.losses, semst.pl.stability):
            draw(a)  # ax=None: a new pyplot figure, in the user's backend
        print(matplotlib.get_backend())
    """, MPLBACKEND="svg")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False", "svg"]  # files written outside pyplot; backend kept


# -- docstrings -----------------------------------------------------------------------------------------

PUBLIC = [(namespace, name) for namespace in ("tl", "pl") for name in getattr(semst, namespace).__all__
          if callable(getattr(getattr(semst, namespace), name))]


@pytest.mark.parametrize("namespace, name", PUBLIC, ids=[f"{ns}.{name}" for ns, name in PUBLIC])
def test_every_public_function_has_a_numpydoc_docstring_naming_each_parameter_and_what_it_writes(namespace, name):
    function = getattr(getattr(semst, namespace), name)
    doc = inspect.getdoc(function)
    assert "\nParameters\n----------\n" in doc and "\nReturns\n-------\n" in doc
    documented = set(re.findall(r"^(?:\*\*)?(\w+)$", doc.split("\nParameters\n")[1].split("\nReturns\n")[0], re.M))
    assert documented == set(inspect.signature(function).parameters)
    returns = doc.split("\nReturns\n-------\n")[1]
    if namespace == "tl":
        assert "Sets, only once the whole call has succeeded:" in returns
        assert re.search(r"``adata\.(obs|obsm|uns)\[", returns)
    else:
        assert "``adata`` is not changed" in returns
