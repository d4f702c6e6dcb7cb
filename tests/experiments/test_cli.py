"""The `semst` command line: thin, and every expected failure is one line and a non-zero exit."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner
from toy_slides import two_domain_slide

from semst.experiments.cli import main
from semst.shared.cache import EmbeddingCache, EmbeddingSpace

SPACE = EmbeddingSpace(model="tiny", weights="a" * 64, pooling="mean", dtype="float32", dim=3)


def filled(path):
    cache = EmbeddingCache(path)
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4)]
    cache.add(SPACE, hashes, np.ones((4, 3), dtype=np.float32), ["p"] * 4, [2] * 4)
    cache.write_spot_table("toy", "tiny.mean.k5", ["a", "b"], hashes[:2], {"space_id": SPACE.space_id})
    return cache


def test_cache_info_lists_spaces_and_spot_tables(tmp_path):
    filled(tmp_path / "c.zarr")
    out = CliRunner().invoke(main, ["cache", "info", "--cache", str(tmp_path / "c.zarr")])
    assert out.exit_code == 0
    assert f"space {SPACE.space_id}: tiny pooling=mean float32 dim=3" in out.output
    assert "toy / tiny.mean.k5: 2 spots" in out.output


def test_cache_verify_exits_0_when_consistent_and_1_with_the_problem_when_not(tmp_path):
    cache = filled(tmp_path / "c.zarr")
    ok = CliRunner().invoke(main, ["cache", "verify", "--cache", str(cache.path)])
    assert ok.exit_code == 0 and "OK" in ok.output
    cache._root[f"spaces/{SPACE.space_id}/vectors"].resize((2, 3))
    bad = CliRunner().invoke(main, ["cache", "verify", "--cache", str(cache.path)])
    assert bad.exit_code == 1 and "past the 2 rows" in bad.output


def test_cache_gc_reports_what_it_did(tmp_path):
    cache = filled(tmp_path / "c.zarr")
    out = CliRunner().invoke(main, ["cache", "gc", "--cache", str(cache.path)])
    assert out.exit_code == 0 and "rows_trimmed: 0" in out.output


def test_a_missing_cache_is_one_line_and_exit_2(tmp_path):
    out = CliRunner().invoke(main, ["cache", "verify", "--cache", str(tmp_path / "none.zarr")])
    assert out.exit_code == 2
    assert out.output.startswith("error: no embedding cache at") and "make embed" in out.output


@pytest.fixture
def toy_on_path(tmp_path, monkeypatch):
    """A toy slide named "toy" on the data search path (the CLI finds the dataset before anything else)."""
    monkeypatch.setenv("SEMST_DATA_PATH", str(tmp_path))
    two_domain_slide().write_h5ad(tmp_path / "toy.h5ad")
    return "toy"


def test_bad_seeds_are_one_line_and_exit_2(toy_on_path):
    out = CliRunner().invoke(main, ["cluster", toy_on_path, "--seeds", "0,x"])
    assert out.exit_code == 2 and out.output.startswith("error: --seeds must be comma-separated integers")


def test_data_list_names_every_registered_dataset():
    out = CliRunner().invoke(main, ["data", "--list"])
    assert out.exit_code == 0
    for name in ("mba", "hbc", "dlpfc-151507", "dlpfc-151676", "me", "mvc", "mob"):
        assert f"\n{name}  " in out.output


def test_a_grid_with_a_typo_is_one_line_and_exit_2_before_anything_runs(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\ndatasets = ["mob"]\nseeds = [0]\nout = "r"\n\n'
                    '[[variant]]\nname = "semst"\ncluster = { fuson = "film" }\n')
    result = CliRunner().invoke(main, ["experiment", str(grid), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown key(s) in variant 'semst' cluster: fuson" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unknown_recipe_is_one_line_and_exit_2_for_both_stages(toy_on_path):
    for stage in ("embed", "cluster"):
        out = CliRunner().invoke(main, [stage, toy_on_path, "--recipe", "papr"])
        assert out.exit_code == 2
        assert out.output.startswith("error: unknown recipe 'papr'; known recipes: semst, paper")


# -- `--set section.field=value` and the one SemstError (issue 21) ----------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--set", "train.epochs=fast"], 'error: --set train.epochs=fast: train.epochs must be an integer, got "fast" (str)'),
    (["--set", "train.expr_k=3"], "error: --set train.expr_k=3: train has no field 'expr_k' (expr_k is in graph)"),
    (["--set", "model.fsm_mode=fancy"], 'model.fsm_mode must be "paper", "zero-init" or "gated", got "fancy"'),
    (["--set", "epochs=5"], "error: --set epochs=5: write SECTION.FIELD=VALUE"),
    (["--epochs", "3", "--set", "train.epochs=5"], "error: epochs set both by its option and by --set"),
    (["--set", "embed.k_genes=ten"], 'embed.k_genes must be an integer, got "ten" (str)'),
])
def test_a_bad_set_is_one_line_naming_the_field_and_exit_2(toy_on_path, tmp_path, args, message):
    out = CliRunner().invoke(main, ["cluster", toy_on_path, "--out", str(tmp_path / "out"), *args])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and message in out.output
    assert not (tmp_path / "out").exists()


def test_embed_takes_set_for_its_own_section_only(toy_on_path):
    out = CliRunner().invoke(main, ["embed", toy_on_path, "--set", "train.epochs=5"])
    assert out.exit_code == 2 and out.output == "error: --set train.epochs=5: unknown section 'train' here; known: embed\n"


def test_set_values_reach_the_config_and_the_saved_config_loads_back(toy_on_path, tmp_path):
    from semst.shared.config import load_cluster_config

    out = CliRunner().invoke(main, ["cluster", toy_on_path, "--fusion", "none", "--out", str(tmp_path / "out"),
                                    "--run-name", "r", "--set", "train.epochs=2", "--set", "graph.expr_k=5",
                                    "--set", "cluster.train.lr=0.01", "--set", "clustering.n_domains=auto:2-3"])
    assert out.exit_code == 0, out.output
    cfg = load_cluster_config(toy_on_path, path=tmp_path / "out" / toy_on_path / "r" / "config.toml")
    assert (cfg.train.epochs, cfg.graph.expr_k, cfg.train.lr, cfg.clustering.n_domains) == (2, 5, 0.01, "auto:2-3")


def test_an_unknown_fusion_is_one_line_naming_the_registered_ones_and_exit_2(toy_on_path, tmp_path):
    out = CliRunner().invoke(main, ["cluster", toy_on_path, "--fusion", "multiply", "--out", str(tmp_path / "out")])
    assert out.exit_code == 2
    assert out.output.splitlines()[-1].startswith("error: unknown fusion 'multiply'; known: ")
    assert "cross-attention" in out.output.splitlines()[-1]
    assert not (tmp_path / "out" / toy_on_path).exists()


EXPECTED_ERRORS = [("semst.shared.config", "ConfigError", ValueError), ("semst.shared.datasets", "DatasetError", ValueError),
                   ("semst.shared.download", "DownloadError", RuntimeError),
                   ("semst.shared.preprocess", "PreprocessError", ValueError),
                   ("semst.shared.cache", "CacheError", RuntimeError),
                   ("semst.embed.checkpoints", "ModelNotFoundError", FileNotFoundError),
                   ("semst.embed.backends", "BackendError", RuntimeError), ("semst.embed.prompts", "PromptError", ValueError),
                   ("semst.embed.run", "EmbedError", RuntimeError), ("semst.cluster.graphs", "GraphError", ValueError),
                   ("semst.cluster.seeds", "ClusterError", RuntimeError),
                   ("semst.experiments.grid", "ExperimentError", ValueError),
                   ("semst.experiments.prompt_information", "PromptInformationError", RuntimeError),
                   ("semst.cluster.baselines", "BaselineError", ValueError), ("semst.cluster.stagate", "StagateError", ValueError),
                   ("semst.embed.sentence_encoder", "SentenceEncoderError", RuntimeError),
                   ("semst.cluster.fusion", "UnknownFusionError", ValueError)]


@pytest.mark.parametrize("module,name,builtin", EXPECTED_ERRORS)
def test_every_expected_error_is_a_semst_error_and_keeps_its_builtin_base(module, name, builtin):
    import importlib

    from semst.shared.errors import SemstError

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, SemstError) and issubclass(cls, builtin)


def test_the_cli_turns_any_semst_error_into_one_line_and_exit_2_and_keeps_a_bugs_traceback(monkeypatch):
    from semst.shared.errors import SemstError

    class NewError(SemstError):
        pass

    def fail(kind):
        def info(cache):
            raise kind("what went wrong")
        return info

    monkeypatch.setattr("semst.shared.cache.format_info", lambda info: "")
    monkeypatch.setattr("semst.experiments.cli._open_cache", fail(NewError))
    out = CliRunner().invoke(main, ["cache", "info"])
    assert out.exit_code == 2 and out.output == "error: what went wrong\n"
    monkeypatch.setattr("semst.experiments.cli._open_cache", fail(KeyError))
    out = CliRunner().invoke(main, ["cache", "info"])
    assert out.exit_code == 1 and isinstance(out.exception, KeyError)
