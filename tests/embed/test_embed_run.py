"""Stage 1 end to end on a tiny random model: dedupe, reruns, resume after SIGKILL, bad input."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from toy_slides import SYMBOLS, write_slide

from semst.embed.run import embed_dataset
from semst.shared.cache import EmbeddingCache, embedding_tag
from semst.shared.config import load_embed_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model):
    """A search path with two toy slides, a fresh cache path and the tiny model."""
    data = tmp_path / "data"
    data.mkdir()
    write_slide(data / "toy.h5ad", 24, repeat=2)  # 12 distinct spots, each twice
    write_slide(data / "toy-copy.h5ad", 24, repeat=2)  # the same spots under another name
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    return {"data": data, "cache": tmp_path / "cache.zarr", "model": str(tiny_model)}


def cfg(env, dataset="toy", **kw):
    base = {"cache": str(env["cache"]), "model": env["model"], "backend": "transformers", "k_genes": 5,
            "batch_size": 4, "genes_from": "all"}
    return load_embed_config(dataset, {**base, **kw})


def quiet(*a, **k):
    pass


def test_identical_prompts_are_computed_once_and_a_rerun_computes_nothing(env):
    lines = []
    first = embed_dataset(cfg(env), progress=False, log=quiet)
    assert (first.n_spots, first.n_prompts, first.n_computed) == (24, 12, 12)
    again = embed_dataset(cfg(env), progress=False, log=lines.append)
    assert (again.n_cached, again.n_computed) == (12, 0)
    assert "12 prompts: 12 cached, 0 computed" in lines[-1]


def test_another_dataset_with_the_same_spots_computes_nothing(env):
    embed_dataset(cfg(env), progress=False, log=quiet)
    other = embed_dataset(cfg(env, dataset="toy-copy"), progress=False, log=quiet)
    assert other.n_computed == 0 and other.n_prompts == 12


def test_the_spot_table_maps_every_spot_to_its_cached_vector(env):
    report = embed_dataset(cfg(env), progress=False, log=quiet)
    cache = EmbeddingCache(env["cache"], create=False)
    table, meta = cache.read_spot_table("toy", report.tag)
    assert table["spot_id"].tolist() == [f"spot{i}" for i in range(24)]
    assert meta["k_genes"] == 5 and meta["space_id"] == report.space_id
    space = cache.spaces()[0]
    vectors = cache.get(space, table["prompt_hash"].tolist())
    assert vectors.shape == (24, 128)
    np.testing.assert_array_equal(vectors[0], vectors[1])  # spots 0 and 1 have the same genes


def test_max_spots_embeds_the_first_spots_with_the_prompts_of_a_full_run(env):
    # HVG genes depend on the whole slide; a --max-spots run must not change any spot's prompt.
    c = cfg(env, genes_from="hvg")
    c = dataclasses.replace(c, preprocess=dataclasses.replace(c.preprocess, n_top_genes=8))
    part = embed_dataset(c, max_spots=6, progress=False, log=quiet)
    full = embed_dataset(c, progress=False, log=quiet)
    assert (part.n_spots, part.n_prompts, part.n_computed) == (6, 3, 3)
    assert (full.n_spots, full.n_computed) == (24, full.n_prompts - 3)


def test_each_k_gets_its_own_tag_and_shares_the_cache(env):
    a = embed_dataset(cfg(env, k_genes=5), progress=False, log=quiet)
    b = embed_dataset(cfg(env, k_genes=3), progress=False, log=quiet)
    assert a.tag != b.tag and a.space_id == b.space_id
    assert embedding_tag(cfg(env, k_genes=3)) == b.tag


def test_vllm_fills_the_same_space_as_transformers(env):
    t = embed_dataset(cfg(env), progress=False, log=quiet)
    v = embed_dataset(cfg(env, backend="vllm", k_genes=3), progress=False, log=quiet)
    assert v.space_id == t.space_id and v.n_computed > 0


def tree_state(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def _semst(*args, env_vars=None, **kw):
    return subprocess.run([sys.executable, "-m", "semst.experiments.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env_vars or {})}, timeout=600, **kw)


@pytest.mark.parametrize("case,args,message", [
    ("unknown dataset", ["nope"], "unknown dataset 'nope'"),
    ("k larger than genes", ["toy", "--k-genes", "50"], "k_g=50 is larger than the"),
    ("missing model", ["toy", "--model", "/no/such/model"], "/no/such/model"),
    ("negative counts", ["neg"], "negative values"),
    ("duplicate genes", ["dup"], "occur more than once"),
])
def test_bad_input_exits_non_zero_with_a_reason_and_leaves_the_cache_untouched(env, case, args, message):
    embed_dataset(cfg(env), progress=False, log=quiet)  # a cache with content to protect
    bad = ad.read_h5ad(env["data"] / "toy.h5ad")
    if case == "negative counts":
        bad.X[0, 0] = -3
        bad.write_h5ad(env["data"] / "neg.h5ad")
    if case == "duplicate genes":
        bad.var_names = ["SNAP25"] * 2 + SYMBOLS[2:]
        bad.write_h5ad(env["data"] / "dup.h5ad")
    before = tree_state(env["cache"])
    extra = ([] if "--model" in args else ["--model", env["model"]]) + ([] if "--k-genes" in args else ["--k-genes", "5"])
    done = _semst("embed", *args, "--cache", str(env["cache"]), "--backend", "transformers", *extra,
                  env_vars={"SEMST_DATA_PATH": str(env["data"])})
    assert done.returncode == 2, done.stderr[-1500:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert tree_state(env["cache"]) == before


def test_a_cache_path_that_is_not_a_cache_is_refused_untouched(env, tmp_path):
    other = tmp_path / "someone-elses.zarr"
    other.mkdir()
    (other / "zarr.json").write_text("{}")
    before = tree_state(other)
    done = _semst("embed", "toy", "--cache", str(other), "--backend", "transformers", "--model", env["model"], "--k-genes", "5",
                  env_vars={"SEMST_DATA_PATH": str(env["data"])})
    assert done.returncode == 2 and "not a semst embedding cache" in done.stderr
    assert tree_state(other) == before


def test_a_run_killed_with_sigkill_resumes_computing_only_what_is_missing(env):
    write_slide(env["data"] / "big.h5ad", 400, seed=3)
    vars_ = {"SEMST_DATA_PATH": str(env["data"]), "SEMST_COMMIT_ROWS": "8"}  # commits of 8 rows: 2 batches
    cmd = [sys.executable, "-m", "semst.experiments.cli", "embed", "big", "--cache", str(env["cache"]), "--backend",
           "transformers", "--model", env["model"], "--k-genes", "8", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **vars_}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as a few batches are committed
        parts = list(env["cache"].glob("index/*/part-*.parquet"))
        if len(parts) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = EmbeddingCache(env["cache"], create=False)
    assert cache.verify() == []
    committed = cache.count(cache.spaces()[0])
    assert committed >= 24  # 3 commits of 8 rows
    report = embed_dataset(cfg(env, dataset="big", k_genes=8, genes_from="hvg"), progress=False, log=quiet)
    assert report.n_computed == report.n_prompts - committed
    assert report.n_computed > 0  # the kill came before the end
    assert EmbeddingCache(env["cache"], create=False).verify() == []


def test_computed_counts_only_the_rows_this_run_committed(env, monkeypatch):
    """Another run commits each batch while this one computes it (between the check and the add):
    nothing is this run's, so nothing is reported as computed."""
    from semst.embed.backends import TransformersBackend
    from semst.shared.hashing import prompt_hash

    original = TransformersBackend.embed

    def embed_while_another_run_commits(self, texts):
        vectors = original(self, texts)
        EmbeddingCache(env["cache"]).add(self.space(), [prompt_hash(t) for t in texts], vectors, texts,
                                         self.count_tokens(texts))
        return vectors

    monkeypatch.setattr(TransformersBackend, "embed", embed_while_another_run_commits)
    lines = []
    report = embed_dataset(cfg(env), progress=False, log=lines.append)
    assert (report.n_prompts, report.n_cached, report.n_computed) == (12, 12, 0)
    assert "12 prompts: 12 cached, 0 computed (12 of them committed meanwhile by another run" in lines[-1]
    assert EmbeddingCache(env["cache"], create=False).count(EmbeddingCache(env["cache"]).spaces()[0]) == 12


def test_two_concurrent_embeds_on_one_cache_report_the_rows_committed_once(env):
    """Two processes on one cache: their "computed" add up to the rows committed, never more."""
    write_slide(env["data"] / "big.h5ad", 400, seed=3)
    cmd = [sys.executable, "-m", "semst.experiments.cli", "embed", "big", "--cache", str(env["cache"]), "--backend",
           "transformers", "--model", env["model"], "--k-genes", "8", "--batch-size", "4"]
    vars_ = {**os.environ, "SEMST_DATA_PATH": str(env["data"])}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=vars_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-1500:] + outs[1][1][-1500:]
    computed = [int(re.search(r"\d+ prompts: \d+ cached, (\d+) computed", out).group(1)) for out, _ in outs]
    cache = EmbeddingCache(env["cache"], create=False)
    assert sum(computed) == cache.count(cache.spaces()[0]) and cache.verify() == []


def part_sizes(cache_path: Path) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(pq.read_metadata(p).num_rows for p in cache_path.glob("index/*/part-*.parquet"))


def test_rows_are_committed_in_blocks_of_commit_rows_not_per_batch(env, monkeypatch):
    monkeypatch.setenv("SEMST_COMMIT_ROWS", "8")
    report = embed_dataset(cfg(env), progress=False, log=quiet)  # 12 prompts in batches of 4
    assert report.n_computed == 12
    assert part_sizes(env["cache"]) == [4, 8]  # one block of 8 (two batches), then the rest at the end


def test_a_run_commits_once_when_its_rows_fit_one_block(env):
    embed_dataset(cfg(env), progress=False, log=quiet)
    assert part_sizes(env["cache"]) == [12]
    assert EmbeddingCache(env["cache"], create=False).verify() == []


@pytest.mark.parametrize("variable,value", [("SEMST_COMMIT_ROWS", "0"), ("SEMST_COMMIT_ROWS", "many"),
                                            ("SEMST_COMMIT_SECONDS", "-1")])
def test_a_bad_commit_setting_is_refused_before_the_cache_is_touched(env, monkeypatch, variable, value):
    from semst.embed.run import EmbedError

    monkeypatch.setenv(variable, value)
    with pytest.raises(EmbedError, match="SEMST_COMMIT_ROWS"):
        embed_dataset(cfg(env), progress=False, log=quiet)
    assert not env["cache"].exists()
