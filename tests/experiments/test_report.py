"""The experiment report: exact table text from given cell results, sections, figures."""
from __future__ import annotations

import numpy as np

from semst.cluster.plots import match_to_annotation, plot_domain_maps
from semst.experiments.report import (
    NO_SELECTION_STATEMENT,
    CellResult,
    DatasetInfo,
    FigureInfo,
    ReportData,
    TableInfo,
    VariantInfo,
    format_mean_sd,
    plot_sweep,
    plot_umaps,
    render_models,
    render_report,
    render_table,
    render_wall_times,
    write_report,
)

WEIGHTS = "ab" * 32


def m(mean, sd, n=2):
    return {"mean": mean, "sd": sd, "n": n}


def ok_cell(dataset, variant, ari, nmi=50.0, seconds=10.0, computed=0, embedding=True, reused=False):
    return CellResult(
        dataset=dataset, variant=variant, n_spots=262, n_domains=5,
        summary={"ARI": m(ari, 1.234), "NMI": m(nmi, 0.5), "ACC": m(60.0, 2.0), "F1_macro": m(55.556, 0.0),
                 "F1_weighted": m(1.0, 1.0)},
        per_seed=[{"seed": 0, "seconds": 4.0}, {"seed": 1, "seconds": 6.0}], wall_seconds=seconds,
        embed_seconds=1.5, prompts_computed=computed, reused=reused, finished="2025-01-01T00:00:00+00:00",
        embedding={"source": "LLM, template semst, k_g 20", "model": "SmolLM2-135M-Instruct", "weights": WEIGHTS,
                   "pooling": "mean", "dim": 576} if embedding else None)


def report_data(cells=None, figures=()):
    return ReportData(
        title="Test grid", grid="experiments/test.toml", seeds=[0, 1],
        variants=[VariantInfo("semst", "SemST", "SemST network"), VariantInfo("wo-llm", "w/o LLM", "no LLM"),
                  VariantInfo("pca", "k-means | PCA", "baseline")],
        datasets=[DatasetInfo("mob", 262, 5), DatasetInfo("seqfish-cortex", skipped="holds normalised values"),
                  DatasetInfo("osmfish", 4839, 11)],
        tables=[TableInfo("Table 1: main", ["semst", "wo-llm", "pca"], caption="The main comparison.")],
        cells=cells if cells is not None else [
            ok_cell("mob", "semst", 45.0), ok_cell("mob", "wo-llm", 40.5, embedding=False),
            ok_cell("mob", "pca", 30.0, embedding=False),
            ok_cell("osmfish", "semst", 20.0, computed=4839),
            CellResult(dataset="osmfish", variant="wo-llm", status="failed", n_spots=4839, wall_seconds=2.0,
                       error="PreprocessError: k_g=50 is larger than the 33 genes available")],
        figures=list(figures), generated="2025-01-01T00:00:00+00:00")


def test_a_table_has_one_row_per_run_dataset_and_method_with_mean_and_sd():
    assert render_table(report_data().tables[0], report_data()) == "\n".join([
        "| dataset | spots | domains | method | seeds | ARI | NMI | ACC | F1 | s per run | peak GiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        "| mob | 262 | 5 | SemST | 2 | 45.00 ± 1.23 | 50.00 ± 0.50 | 60.00 ± 2.00 | 55.56 ± 0.00 | 5.0 | - |",
        "| mob | 262 | 5 | w/o LLM | 2 | 40.50 ± 1.23 | 50.00 ± 0.50 | 60.00 ± 2.00 | 55.56 ± 0.00 | 5.0 | - |",
        "| mob | 262 | 5 | k-means \\| PCA | 2 | 30.00 ± 1.23 | 50.00 ± 0.50 | 60.00 ± 2.00 | 55.56 ± 0.00 | 5.0 | - |",
        "| osmfish | 4839 | 11 | SemST | 2 | 20.00 ± 1.23 | 50.00 ± 0.50 | 60.00 ± 2.00 | 55.56 ± 0.00 | 5.0 | - |",
        "| osmfish | 4839 | 11 | w/o LLM | - | failed | failed | failed | failed | - | - |",
        "| osmfish | 4839 | 11 | k-means \\| PCA | - | not run | not run | not run | not run | - | - |",
    ])


def test_a_table_gives_seconds_per_run_and_the_largest_peak_memory_where_it_was_measured():
    peer = ok_cell("mob", "pca", 30.0)
    peer.per_seed = [{"seed": 0, "seconds": 30.0, "peak_gib": 1.25}, {"seed": 1, "seconds": 50.0, "peak_gib": 1.5}]
    data = report_data(cells=[ok_cell("mob", "semst", 45.0), peer])
    rows = render_table(data.tables[0], data).splitlines()
    assert rows[2].endswith("| 55.56 ± 0.00 | 5.0 | - |")  # in semst's process: no peak of its own
    assert rows[4].endswith("| 55.56 ± 0.00 | 40.0 | 1.50 |")


def test_a_metric_without_annotation_is_na_not_zero():
    assert format_mean_sd(None) == "n/a"
    assert format_mean_sd({}) == "n/a"
    assert format_mean_sd(m(12.345, 0.0)) == "12.35 ± 0.00"


def test_the_models_section_names_each_model_with_its_weights_fingerprint_and_users():
    assert render_models(report_data()) == "\n".join([
        "| source | model | weights (SHA-256 of the weight files) | pooling | dim | used by |",
        "|---|---|---|---|---:|---|",
        f"| LLM, template semst, k_g 20 | SmolLM2-135M-Instruct | `{WEIGHTS}` | mean | 576 | SemST |",
    ])


def test_without_semantic_embeddings_the_models_section_says_so():
    data = report_data(cells=[ok_cell("mob", "pca", 30.0, embedding=False)])
    assert render_models(data) == "No method in this grid used semantic embeddings."


def test_wall_times_list_every_cell_and_the_run_total():
    data = report_data(cells=[ok_cell("mob", "semst", 45.0, seconds=12.25, computed=262),
                              ok_cell("mob", "pca", 30.0, seconds=3.0, embedding=False, reused=True)])
    assert render_wall_times(data) == "\n".join([
        "| dataset | method | status | wall (s) | embedding step (s) | embeddings computed | s per seed | from |",
        "|---|---|---|---:|---:|---:|---:|---|",
        "| mob | SemST | ok | 12.2 | 1.5 | 262 | 5.0 | this run |",
        "| mob | k-means \\| PCA | ok | 3.0 | 1.5 | 0 | 5.0 | earlier run (2025-01-01T00:00:00+00:00) |",
        "",
        "This run: 12.2 s of cell wall time, 262 embeddings computed (everything else came from the shared cache).",
    ])


def test_the_report_states_no_label_selection_skipped_datasets_failures_and_figures():
    text = render_report(report_data(figures=[FigureInfo("Figure 2: mob", "figures/figure2-mob.png", "Maps.")]))
    assert text.startswith("# Test grid\n\nGrid `experiments/test.toml`; seeds 0, 1; generated 2025-01-01")
    assert NO_SELECTION_STATEMENT in text
    assert "| seqfish-cortex | - | - | skipped: holds normalised values |" in text
    assert "## Table 1: main\n\nThe main comparison.\n\n| dataset |" in text
    assert "## Figure 2: mob\n\nMaps.\n\n![Figure 2: mob](figures/figure2-mob.png)" in text
    assert "## Failed cells\n\n- osmfish / w/o LLM: PreprocessError: k_g=50 is larger than the 33 genes" in text
    assert "| seqfish-cortex |" not in render_table(report_data().tables[0], report_data())


def test_write_report_writes_report_md_and_leaves_no_temporary_file(tmp_path):
    path = write_report(report_data(), tmp_path / "report")
    assert path == tmp_path / "report" / "REPORT.md"
    assert path.read_text() == render_report(report_data())
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["REPORT.md"]


def test_cell_results_round_trip_through_dicts():
    cell = ok_cell("mob", "semst", 45.0)
    assert CellResult.from_dict(cell.to_dict()) == cell
    assert CellResult.from_dict({**cell.to_dict(), "unknown_future_field": 1}) == cell


def test_domains_are_matched_to_the_annotation_one_to_one():
    annotation = np.array(["L1", "L1", "L2", "L2", None, "L3"], dtype=object)
    labels = np.array([7, 7, 3, 3, 3, 9])
    assert match_to_annotation(labels, annotation) == {7: "L1", 3: "L2", 9: "L3"}
    # a cluster found only on unannotated spots has no partner: it stays unmatched
    assert match_to_annotation(np.array([0, 0, 1, 1, 2, 3]), annotation) == {0: "L1", 1: "L2", 3: "L3"}


def test_figures_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10, size=(30, 2))
    annotation = np.array(["A"] * 15 + ["B"] * 14 + [None], dtype=object)
    labels = np.array([0] * 15 + [1] * 15)
    for path in (plot_domain_maps(tmp_path / "maps.png", coords, annotation, [("SemST", labels), ("failed", None)]),
                 plot_umaps(tmp_path / "umap.png", annotation, [("LLM", coords), ("MiniLM", coords[::-1])]),
                 plot_sweep(tmp_path / "k.png", {"mob": [(5, {"ARI": m(1, 1), "NMI": m(2, 1)}),
                                                         (20, {"ARI": m(3, 1), "NMI": m(4, 1)})]})):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.png", "maps.png", "umap.png"]


def test_the_report_shows_chosen_against_annotated_k_for_auto_cells():
    auto = ok_cell("mob", "semst", 30.0)
    auto.auto_k = {"range": "auto:3-15", "chosen": 4, "stability": {"4": 0.81234, "5": 0.7}, "seconds": 2.04}
    auto.auto_comparison = {"annotated_k": 5, "chosen_k": 4,
                            "ARI_chosen": {"mean": 30.0, "sd": 1.5, "n": 2, "consensus": 31.25},
                            "ARI_annotated": {"mean": 35.0, "sd": 2.0, "n": 2, "consensus": None}}
    text = render_report(report_data(cells=[auto, ok_cell("mob", "wo-llm", 40.5)]))
    assert "## Number of domains chosen by stability (auto)" in text
    assert ("| mob | SemST | auto:3-15 | 5 | 4 | 0.812 | 0.700 | 30.00 ± 1.50 (consensus 31.25) | "
            "35.00 ± 2.00 | 2.0 |") in text
    assert "| mob | w/o LLM |" not in text.split("(auto)")[1].split("##")[0]


def test_without_auto_cells_there_is_no_auto_section():
    assert "(auto)" not in render_report(report_data())
