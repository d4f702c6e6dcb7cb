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
