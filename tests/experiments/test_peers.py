"""Peers (other tools' methods, each in its own environment) through the adapter contract.

No peer environment is built here: stand-in peer scripts run under this interpreter
(``sys.executable``) and speak the same contract as experiments/peers/<name>/run.py: an .h5ad in;
labels, embedding and info out; a failure reported as a failed row saying why.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from toy_slides import two_domain_slide

from semst.cluster.methods import METHODS, run_method
from semst.experiments.peers.adapter import (
    PeerError,
    PeerSettings,
    dataset_platform,
    read_outputs,
    run_process,
    thread_environment,
)
from semst.shared.config import ConfigError, load_cluster_config

PEERS = Path(__file__).resolve().parents[2] / "experiments" / "peers"

# A stand-in peer: the two halves of the slide by their x coordinate, through peer_io as a real one.
GOOD = f"""
import json, os, sys
sys.path.insert(0, {str(PEERS)!r})
import numpy as np
import peer_io
args = peer_io.arguments()
adata = peer_io.read_slide(args)
x = adata.obsm["spatial"][:, 0]
labels = (x >= np.median(x)).astype(int)
emb = np.column_stack([x, adata.X.toarray().sum(1)])
peer_io.write_outputs(args, labels, emb, {{"clustering": "median split", "threads": os.environ["OMP_NUM_THREADS"],
                                          "seed": args.seed, "n_domains": args.n_domains,
                                          "platform": args.platform, "obs": list(adata.obs.columns)}})
"""
CRASH = """
import sys
print("loading...", file=sys.stderr)
raise ValueError("the peer found no spatial coordinates")
"""
WRONG_COUNT = f"""
import sys
sys.path.insert(0, {str(PEERS)!r})
import numpy as np
import peer_io
args = peer_io.arguments()
peer_io.write_outputs(args, np.zeros(3, dtype=int), np.zeros((3, 2)))
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def toy_config(tmp_path: Path, seeds=(0, 1)):
    toml = tmp_path / "toy.toml"
    toml.write_text("[preprocess]\nmin_cells = 1\n[cluster]\nradius = 1.5\n")
    return load_cluster_config("toy", {"seeds": list(seeds), "threads": 1}, toml)


def run_peer(tmp_path, text, name="spagcn", seeds=(0, 1), **settings):
    settings = PeerSettings(python=sys.executable, script=script(tmp_path, "peer", text), platform="visium",
                            **settings)
    return run_method(name, toy_config(tmp_path, seeds), settings, adata=two_domain_slide(), log=lambda *a: None)


def test_every_peer_is_a_registered_method_reading_no_semantic_vectors():
    for name in ("graphst", "banksy", "spagcn", "stdcl", "cellcharter"):
        assert METHODS[name].settings_key == "peer" and not METHODS[name].reads_semantic
        assert (PEERS / name / "run.py").is_file() and (PEERS / name / "requirements.txt").is_file()


# A stand-in with semst's FSM inside: says which semantic vectors it was given.
SEMANTIC = GOOD.replace('"median split",', '"median split", "semantic": None if args.semantic is None else '
                        'peer_io.read_semantic(args, adata.n_obs)[:, 0].tolist(),')


def test_graphst_with_the_fsm_is_graphst_reading_semantic_vectors_unless_fusion_is_none(tmp_path):
    method = METHODS["graphst-fsm"]
    assert method.peer == "graphst" and method.reads_semantic
    assert method.uses_semantic(toy_config(tmp_path)) and not METHODS["graphst"].uses_semantic(toy_config(tmp_path))
    assert not method.uses_semantic(load_cluster_config("toy", {"fusion": "none"}, tmp_path / "toy.toml"))


@pytest.mark.parametrize("name,given", [("graphst-fsm", True), ("graphst", False)])
def test_a_peer_with_the_fsm_gets_each_seeds_semantic_vectors_in_the_slides_order(tmp_path, monkeypatch, name, given):
    class Vectors:  # what semst's SemanticVectors would read from the cache: here the seed in column 0
        def __init__(self, cfg, spot_ids, **kwargs):
            self.n = len(spot_ids)

        def for_seed(self, seed):
            return np.column_stack([np.full(self.n, seed + 0.5), np.arange(self.n)]).astype(np.float32)

    seen = {}

    def capture(out, n, what):
        labels, emb, info = read_outputs(out, n, what)
        seen[info["seed"]] = info["semantic"]
        return labels, emb, info

    monkeypatch.setattr("semst.cluster.methods.SemanticVectors", Vectors)
    monkeypatch.setattr("semst.experiments.peers.adapter.read_outputs", capture)
    run_peer(tmp_path, SEMANTIC, name=name)
    if given:
        assert seen == {0: [0.5] * 80, 1: [1.5] * 80}
    else:
        assert seen == {0: None, 1: None}


def test_a_peers_labels_are_the_seeds_domains_with_its_seconds_and_peak_memory(tmp_path):
    report = run_peer(tmp_path, GOOD)
    assert [r["seed"] for r in report.per_seed] == [0, 1]
    for row in report.per_seed:
        assert row["ARI"] == pytest.approx(100.0)  # the median split is the two annotated halves
        assert row["peak_gib"] > 0 and row["peer_seconds"] > 0 and row["clustering"] == "median split"
    assert report.latents[0].shape == (80, 2)


def test_a_peer_gets_the_seed_the_number_of_domains_the_thread_budget_and_no_annotation(tmp_path, monkeypatch):
    seen = {}

    def capture(out, n, what):
        labels, emb, info = read_outputs(out, n, what)
        seen[info["seed"]] = info
        return labels, emb, info

    monkeypatch.setattr("semst.experiments.peers.adapter.read_outputs", capture)
    run_peer(tmp_path, GOOD)
    assert sorted(seen) == [0, 1]
    assert {(i["n_domains"], i["threads"], i["platform"]) for i in seen.values()} == {(2, "1", "visium")}
    assert "ground_truth" not in seen[0]["obs"]


def test_a_peer_that_crashes_is_reported_with_its_last_stderr_line(tmp_path):
    with pytest.raises(PeerError, match=r"spagcn on toy, seed 0 failed \(exit 1\): ValueError: the peer found no "
                                        r"spatial coordinates"):
        run_peer(tmp_path, CRASH)


def test_a_peer_that_writes_the_wrong_number_of_labels_is_refused(tmp_path):
    with pytest.raises(PeerError, match="wrote 3 labels for 80 spots"):
        run_peer(tmp_path, WRONG_COUNT)


def test_a_peer_killed_by_a_signal_says_so(tmp_path):
    with pytest.raises(PeerError, match=r"failed \(exit 137\): killed by SIGKILL \(e.g. the kernel's out-of-memory"):
        run_peer(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")


def test_a_peer_writing_labels_of_two_columns_is_refused(tmp_path):
    two_columns = WRONG_COUNT.replace("np.zeros(3, dtype=int), np.zeros((3, 2))",
                                      "np.zeros((80, 2), dtype=int), np.zeros((80, 2))")
    with pytest.raises(PeerError, match=r"wrote labels of shape \(80, 2\); one label per spot expected"):
        run_peer(tmp_path, two_columns)


def test_a_peer_past_its_timeout_is_stopped_and_reported(tmp_path):
    with pytest.raises(PeerError, match="stopped after the timeout of 1 s"):
        run_peer(tmp_path, "import time\ntime.sleep(60)\n", timeout_seconds=1.0)


def test_a_peer_not_installed_says_to_run_make_peers(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    with pytest.raises(PeerError, match=r"no environment at .*\.peers/banksy/bin/python; run `make peers`"):
        run_method("banksy", toy_config(tmp_path), PeerSettings(platform="visium"), adata=two_domain_slide())


def test_a_peer_that_could_not_install_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMST_HOME", str(tmp_path))
    (tmp_path / ".peers").mkdir()
    (tmp_path / ".peers" / "cellcharter.failed").write_text("pip failed after 3 s: ERROR: No matching distribution")
    with pytest.raises(PeerError, match="cellcharter: not installed \\(pip failed after 3 s: ERROR: No matching"):
        run_method("cellcharter", toy_config(tmp_path), PeerSettings(platform="visium"), adata=two_domain_slide())


def test_a_peer_needs_a_platform_for_a_slide_semst_does_not_know(tmp_path):
    with pytest.raises(ConfigError, match="does not know the technology of 'toy'; set peer = { platform = \"visium\" }"):
        run_method("spagcn", toy_config(tmp_path), PeerSettings(python=sys.executable), adata=two_domain_slide())


def test_the_local_slides_platforms():
    assert [dataset_platform(d) for d in ("dlpfc-151673", "mob", "starmap-mpfc", "osmfish")] == [
        "visium", "st", "imaging", "imaging"]
    assert dataset_platform("my-own-slide") is None


def test_a_peer_runs_with_our_thread_budget_and_without_our_packages(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/semst")
    env = thread_environment(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "3"
    assert "PYTHONPATH" not in env


def test_the_peak_memory_is_the_peer_processes_own(tmp_path):
    big = "import numpy as np\na = np.ones(400 * 2**20 // 8)\n"  # ~400 MiB resident
    run = run_process([sys.executable, "-c", big], dict(os.environ), tmp_path / "err.txt")
    small = run_process([sys.executable, "-c", "pass"], dict(os.environ), tmp_path / "err2.txt")
    assert run.returncode == 0 and run.peak_gib > 0.35
    assert small.peak_gib < 0.2  # not the maximum over every child this process ever had


# -- through the grid ---------------------------------------------------------------------------------

@pytest.fixture
def peer_grid(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    two_domain_slide().write_h5ad(data / "toy.h5ad")
    (tmp_path / "toy.toml").write_text("[preprocess]\nmin_cells = 1\n[cluster]\nradius = 1.5\n")
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    good, crash = script(tmp_path, "good", GOOD), script(tmp_path, "crash", CRASH)
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""
[grid]
name = "peers"
title = "Peers"
datasets = ["toy"]
seeds = [0, 1]
dataset_configs = {{ toy = "toy.toml" }}
[peer]
platform = "visium"
python = "{sys.executable}"
[[variant]]
name = "spagcn"
backbone = "spagcn"
peer = {{ script = "{good}" }}
[[variant]]
name = "banksy"
backbone = "banksy"
peer = {{ script = "{crash}" }}
[[variant]]
name = "pca"
backbone = "pca-kmeans"
[[table]]
name = "t1"
title = "Table 1"
variants = ["spagcn", "banksy", "pca"]
[[figure]]
name = "maps"
kind = "domains"
title = "Domain maps"
variants = ["spagcn", "banksy", "pca"]
""")
    return grid


def test_a_grid_runs_peers_as_cells_and_a_failing_peer_is_a_row_saying_why(peer_grid, tmp_path):
    from semst.experiments.grid import run_experiment

    out = tmp_path / "report"
    outcome = run_experiment(peer_grid, out_dir=out, progress=False, log=lambda *a: None)
    cells = {c.variant: c for c in outcome.cells}
    assert cells["spagcn"].status == "ok" and cells["spagcn"].summary["ARI"]["mean"] == pytest.approx(100.0)
    assert cells["banksy"].status == "failed"
    assert cells["banksy"].error.endswith("failed (exit 1): ValueError: the peer found no spatial coordinates")
    text = (out / "REPORT.md").read_text()
    assert "| toy | 80 | 2 | banksy | - | failed | failed | failed | failed | - | - |" in text
    assert "ValueError: the peer found no spatial coordinates" in text
    saved = json.loads((out / "cells" / "toy" / "spagcn.json").read_text())
    assert all(r["peak_gib"] > 0 for r in saved["per_seed"])
    assert (out / "figures" / "maps-toy.png").is_file()


def test_the_field_grid_runs_semst_and_every_peer_on_the_five_local_count_slides_with_three_seeds():
    from semst.experiments.grid import load_grid

    grid = load_grid(Path(__file__).resolve().parents[2] / "experiments" / "field.toml")
    assert sorted(grid.datasets) == ["dlpfc-151510", "dlpfc-151673", "mob", "osmfish", "starmap-mpfc"]
    assert len(grid.seeds) == 3
    table1, table3 = grid.tables
    assert table1.variants == grid.figures[0].variants == ["semst", "graphst", "banksy", "spagcn", "stdcl",
                                                           "cellcharter"]
    assert [v.backbone for v in grid.variants if v.name in table1.variants] == table1.variants


def test_the_field_grids_table_3_is_graphst_without_and_with_the_fsm_on_llm_and_on_random_vectors():
    from semst.experiments.grid import load_grid

    grid = load_grid(Path(__file__).resolve().parents[2] / "experiments" / "field.toml")
    table3 = {v.name: v for v in grid.variants if v.name in grid.tables[1].variants}
    assert [v.backbone for v in table3.values()] == ["graphst", "graphst-fsm", "graphst-fsm"]
    assert table3["graphst-fsm-random"].cluster == {"embedding": "random"} and not table3["graphst-fsm"].cluster
