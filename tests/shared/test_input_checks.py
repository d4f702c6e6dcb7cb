"""Bad input is refused by every entry point with one clear line, before any model, training or cache.

The CLI cases run `semst embed` / `semst cluster` on small slides written to a temporary data path
(SEMST_DATA_PATH), with a cache path that must still not exist afterwards.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from toy_slides import two_domain_slide

from semst.experiments.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty semst home, a data folder on the search path and a cache path that does not exist."""
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    data.mkdir()
    monkeypatch.setenv("SEMST_HOME", str(home))
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    return {"home": home, "data": data, "cache": tmp_path / "cache.zarr", "tmp": tmp_path}


def run(env, *args: str):
    return CliRunner().invoke(main, [*args, "--cache", str(env["cache"])])


def assert_refused(env, result, message: str) -> None:
    """Exit 2, one line `error: ...` holding ``message`` on stderr, and no cache anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not env["cache"].exists()
    assert not (env["home"] / "data" / "cache").exists()


def config_file(env, text: str, name: str = "c.toml") -> str:
    path = env["tmp"] / name
    path.write_text(text)
    return str(path)


# -- slides that every entry point refuses ----------------------------------------------------------------

def no_coordinates(a):
    del a.obsm["spatial"]


def nan_coordinate(a):
    a.obsm["spatial"][3, 1] = np.nan


def inf_coordinate(a):
    a.obsm["spatial"][0, 0] = np.inf


def one_column(a):
    a.obsm["spatial"] = a.obsm["spatial"][:, :1]


def three_columns(a):
    a.obsm["spatial"] = np.column_stack([a.obsm["spatial"], np.zeros(a.n_obs)])


def text_coordinates(a):
    a.obsm["spatial"] = np.full((a.n_obs, 2), "x", dtype=object)


def duplicate_spot_names(a):
    a.obs_names = [f"c{i % 70}" for i in range(a.n_obs)]


def duplicate_gene_names(a):
    a.var_names = ["SNAP25"] * 2 + list(a.var_names[2:])


def normalised(a):
    a.X = a.X / a.X.sum(1, keepdims=True)


def nan_expression(a):
    a.X[0, 0] = np.nan


def all_zero_genes(a):
    a.X = np.zeros_like(a.X)


BAD_SLIDES = [
    (no_coordinates, "no spot coordinates (obsm['spatial'] is missing)"),
    (nan_coordinate, "1 spots have NaN or infinite coordinates (e.g. ['c3'])"),
    (inf_coordinate, "1 spots have NaN or infinite coordinates (e.g. ['c0'])"),
    (one_column, "obsm['spatial'] must have 2 columns (x, y), got 1"),
    (three_columns, "obsm['spatial'] has 3 columns, but semst's spatial graph is 2-D: keep the two in-plane "
                    "ones, e.g. adata.obsm['spatial'] = adata.obsm['spatial'][:, :2]"),
    (text_coordinates, "obsm['spatial'] holds values that are not numbers"),
    (duplicate_spot_names, "10 spot names occur more than once (e.g. c0, c1, c2, c3, c4); "
                           "adata.obs_names_make_unique()"),
    (duplicate_gene_names, "1 gene names occur more than once (e.g. SNAP25)"),
    (normalised, "100% of the non-zero values are not integers: these look normalised"),
    (nan_expression, "expression holds NaN or infinite values"),
    (all_zero_genes, "no gene is detected in at least min_cells=3 spots (80 spots, 20 genes)"),
]


@pytest.mark.parametrize("spoil, message", BAD_SLIDES, ids=[s.__name__ for s, _ in BAD_SLIDES])
@pytest.mark.parametrize("stage", ["embed", "cluster"])
def test_a_bad_slide_is_one_line_and_exit_2_from_both_stages_without_a_cache(env, stage, spoil, message):
    a = two_domain_slide()
    spoil(a)
    a.write_h5ad(env["data"] / "bad.h5ad")
    assert_refused(env, run(env, stage, "bad"), f"error: bad: {message}")


def test_an_empty_slide_is_refused(env):
    a = two_domain_slide()[:0].copy()
    a.write_h5ad(env["data"] / "empty.h5ad")
    assert_refused(env, run(env, "embed", "empty"), "empty dataset (0 spots x 20 genes)")


def test_normalised_seqfish_values_stay_refused_as_not_counts(env, shared_data_dir, monkeypatch):
    monkeypatch.setenv("SEMST_DATA_PATH", str(shared_data_dir))
    assert_refused(env, run(env, "embed", "seqfish-cortex"), "negative values (min -")


@pytest.mark.parametrize("stage", ["embed", "cluster"])
def test_an_unknown_name_says_unknown_dataset_and_where_it_looked(env, stage):
    result = run(env, stage, "nosuchdataset")
    assert_refused(env, result, "unknown dataset 'nosuchdataset'")
    assert str(env["data"] / "nosuchdataset.h5ad") in result.stderr


# -- slides too small for the preprocessing ---------------------------------------------------------------

def many_gene_slide(n_spots: int, n_genes: int = 3500, seed: int = 0) -> ad.AnnData:
    """Counts on more genes than n_top_genes (3000), so seurat_v3's HVG selection runs."""
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_spots, n_genes)).astype(np.float32) + 1
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"s{i}" for i in range(n_spots)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))
    a.obsm["spatial"] = rng.uniform(0, 10, size=(n_spots, 2))
    return a


def test_a_one_spot_slide_is_refused_where_scanpy_segfaulted(env):
    """In a subprocess: before this check, seurat_v3's loess segfaulted (exit 139) on one spot."""
    many_gene_slide(1).write_h5ad(env["data"] / "one.h5ad")
    cfg = config_file(env, "[preprocess]\nmin_cells = 1\n")
    proc = subprocess.run([sys.executable, "-m", "semst.experiments.cli", "embed", "one", "--config", cfg,
                           "--cache", str(env["cache"])], capture_output=True, text=True, env=os.environ.copy(),
                          cwd=env["home"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: one: 1 spot; semst needs at least 2 (each gene is scaled "
                                                "by its spread over the spots)"]
    assert not env["cache"].exists()


@pytest.mark.parametrize("n_spots", [2, 3, 5])
@pytest.mark.parametrize("stage", ["embed", "cluster"])
def test_a_slide_too_small_for_the_hvg_selection_is_refused_with_what_to_change(env, shared_data_dir, stage,
                                                                                 n_spots):
    mob = ad.read_h5ad(shared_data_dir / "mob.h5ad")
    mob[:n_spots].copy().write_h5ad(env["data"] / "tiny.h5ad")
    cfg = config_file(env, "[preprocess]\nmin_cells = 1\n")
    result = run(env, stage, "tiny", "--config", cfg)
    assert_refused(env, result, f"tiny: seurat_v3 cannot choose 3000 highly variable genes on this slide "
                                f"({n_spots} spots, ")
    assert "its loess fit of gene variance on mean failed" in result.stderr
    assert "n_top_genes >= " in result.stderr  # what to change


def test_a_mob_cut_large_enough_for_the_hvg_selection_passes_the_check(shared_data_dir):
    from semst.shared.config import PreprocessConfig
    from semst.shared.datasets import check_slide

    mob = ad.read_h5ad(shared_data_dir / "mob.h5ad")
    coords = check_slide(mob[:40].copy(), "mob40", PreprocessConfig(min_cells=1))
    assert coords.shape == (40, 2)


@pytest.mark.parametrize("n_genes", [4, 13])
def test_fewer_varying_genes_than_the_loess_needs_are_refused_before_scanpy(n_genes):
    from semst.shared.config import PreprocessConfig
    from semst.shared.preprocess import PreprocessError, preprocess

    a = many_gene_slide(30, n_genes)
    with pytest.raises(PreprocessError, match=f"only {n_genes} genes vary over the spots, and its loess fit "
                                              f"needs at least 14"):
        preprocess(a, PreprocessConfig(min_cells=1, n_top_genes=2))


def test_a_one_gene_slide_is_refused_with_the_k_genes_to_use(env):
    a = two_domain_slide(genes=["SNAP25"])
    a.write_h5ad(env["data"] / "onegene.h5ad")
    assert_refused(env, run(env, "embed", "onegene"), "k_g=20 is larger than the 1 genes available; "
                                                      "use --k-genes 1 or fewer")


def test_a_slide_with_fewer_spots_than_the_expression_neighbours_is_refused_before_preprocessing(env):
    two_domain_slide(4, 3).write_h5ad(env["data"] / "twelve.h5ad")
    result = run(env, "cluster", "twelve", "--fusion", "none", "--n-domains", "2")
    assert_refused(env, result, "twelve has 12 spots, too few for expr_k = 14 neighbours per spot (at most 11)")


# -- a user's own slide runs, from the CLI as from the API ----------------------------------------------

def test_an_unregistered_slide_runs_from_the_cli_on_the_6_nearest_spots_like_the_api(env):
    import semst

    slide = two_domain_slide()
    slide.write_h5ad(env["data"] / "myslide.h5ad")
    out = env["tmp"] / "results"
    result = CliRunner().invoke(main, ["cluster", "myslide", "--fusion", "none", "--epochs", "2", "--n-domains", "2",
                                       "--out", str(out), "--run-name", "r", "--cache", str(env["cache"])])
    assert result.exit_code == 0, result.output
    cli_config = (out / "myslide" / "r" / "config.toml").read_text()
    assert '[cluster.spatial]\nrule = "knn"\nk = 6\n' in cli_config and "\nradius = " not in cli_config
    semst.domains(slide, fusion="none", n_domains=2, epochs=2, progress=False, log=lambda *a, **k: None)
    assert '[cluster.spatial]\nrule = "knn"\nk = 6\n' in slide.uns["semst"]["config"]


# -- the grid ----------------------------------------------------------------------------------------------

def test_the_grid_skips_a_slide_with_bad_coordinates_with_the_reason(env):
    from semst.experiments.grid import run_experiment

    a = two_domain_slide()
    one_column(a)
    a.write_h5ad(env["data"] / "flat.h5ad")
    (env["tmp"] / "flat.toml").write_text("[cluster]\nepochs = 2\n")
    grid = env["tmp"] / "grid.toml"
    grid.write_text('[grid]\ndatasets = ["flat"]\nseeds = [0]\nout = "r"\ndataset_configs = { flat = "flat.toml" }\n\n'
                    '[[variant]]\nname = "pca"\nbackbone = "pca-kmeans"\n')
    outcome = run_experiment(grid, cache=env["cache"], out_dir=env["tmp"] / "out", progress=False,
                             log=lambda *a, **k: None)
    assert outcome.cells == [] and "obsm['spatial'] must have 2 columns (x, y), got 1" in outcome.skipped["flat"]
    assert not env["cache"].exists()


# -- configs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["embed", "cluster"])
def test_a_malformed_config_file_names_the_file_and_the_line(env, stage):
    two_domain_slide().write_h5ad(env["data"] / "toy.h5ad")
    cfg = config_file(env, "[cluster]\nepochs = 5\nlr = = 0.1\n")
    assert_refused(env, run(env, stage, "toy", "--config", cfg),
                   f"config file {cfg} is not valid TOML: Invalid value (at line 3, column 6)")


@pytest.mark.parametrize("text, message", [
    ('[cluster]\nepochs = "five"\n', '[cluster] epochs must be an integer, got "five" (str)'),
    ("[cluster]\nepochs = 2.5\n", "[cluster] epochs must be an integer, got 2.5 (float)"),
    ("[cluster]\nrefine = 1\n", "[cluster] refine must be true or false, got 1 (int)"),
    ("[cluster]\nseeds = [0, \"1\"]\n", '[cluster] seeds must be a list of integers, got [0, "1"] (list)'),
    ("[cluster]\nn_domains = 2.5\n", "[cluster] n_domains must be an integer or a string, got 2.5 (float)"),
    ("[embed]\nk_genes = \"20\"\n", '[embed] k_genes must be an integer, got "20" (str)'),
    ("[preprocess]\nlog1p = \"no\"\n", '[preprocess] log1p must be true or false, got "no" (str)'),
    ("[cluster]\nepochz = 3\n", "unknown key(s) in [cluster]: epochz; known: "),
    ("[clustr]\nepochs = 3\n", "unknown section [clustr]; known: [preprocess], [embed], [cluster]"),
    ("epochs = 3\n", "epochs = 3 is outside any section; put it under [cluster]"),
])
def test_a_wrong_config_file_is_one_line_naming_the_file_and_field(env, text, message):
    two_domain_slide().write_h5ad(env["data"] / "toy.h5ad")
    cfg = config_file(env, text)
    assert_refused(env, run(env, "cluster", "toy", "--config", cfg), f"error: config file {cfg}: {message}")


@pytest.mark.parametrize("seeds, message", [
    ("-1", "--seeds must be >= 0, got -1"),
    ("0,-3", "--seeds must be >= 0, got -3"),
    ("0,0", "--seeds repeat 0: each seed is one run"),
    ("2,1,2", "--seeds repeat 2: each seed is one run"),
    ("0,x", "--seeds must be comma-separated integers, e.g. 0,1,2; got '0,x'"),
    ("1.5", "--seeds must be comma-separated integers, e.g. 0,1,2; got '1.5'"),
    (",", "--seeds must list at least one seed"),
])
def test_bad_seeds_are_one_line_and_exit_2(env, seeds, message):
    two_domain_slide().write_h5ad(env["data"] / "toy.h5ad")
    assert_refused(env, run(env, "cluster", "toy", "--seeds", seeds), f"error: {message}")
