"""A real slide without annotation, end to end: embed, then cluster with --n-domains auto."""
from __future__ import annotations

import json
import warnings

import anndata as ad
import pandas as pd
import pytest
from click.testing import CliRunner
from tiny_model import build_tiny_model

from semst.cluster.seeds import METRICS
from semst.experiments.cli import main


@pytest.mark.slow
def test_an_unannotated_real_slide_runs_end_to_end_with_auto_domains(shared_data_dir, tmp_path, monkeypatch):
    a = ad.read_h5ad(shared_data_dir / "mob.h5ad")
    del a.obs["ground_truth"]  # a user's own slide: no annotation at all
    data = tmp_path / "data"
    data.mkdir()
    a.write_h5ad(data / "mob.h5ad")
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    model = str(build_tiny_model(tmp_path / "tiny"))
    cache, out = str(tmp_path / "cache.zarr"), tmp_path / "results"
    runner = CliRunner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embed = runner.invoke(main, ["embed", "mob", "--model", model, "--backend", "transformers", "--cache", cache])
        assert embed.exit_code == 0, embed.output
        done = runner.invoke(main, ["cluster", "mob", "--model", model, "--cache", cache, "--out", str(out),
                                    "--n-domains", "auto", "--epochs", "2", "--seeds", "0,1", "--run-name", "r"])
    assert done.exit_code == 0, done.output
    run = out / "mob" / "r"
    assert {"domains.parquet", "domains.png", "stability.png", "stability.tsv", "metrics.json"} <= {
        p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    k = metrics["auto_k"]["chosen"]
    assert 3 <= k <= 15 and metrics["n_domains"] == k and metrics["n_labelled"] == 0
    assert metrics["summary"] == {} and "consensus" not in metrics and "auto_vs_annotation" not in metrics
    assert all(not set(row) & set(METRICS) for row in metrics["per_seed"])  # no metric without labels
    table = pd.read_parquet(run / "domains.parquet")
    assert len(table) == 262 and table["ground_truth"].isna().all() and table["domain"].nunique() <= k
    assert f"number of domains: {k} chosen in auto:3-15" in done.output
    said = [line for line in (embed.output + done.output).splitlines()
            if "annotat" in line.lower() and str(tmp_path) not in line]
    warned = [w for w in caught if any(s in str(w.message).lower() for s in ("annotat", "label", "ground_truth"))]
    assert len(said) + len(warned) <= 1, said + [str(w.message) for w in warned]
