"""When stage 2 finds no embeddings it names the stage-1 command to run: the user's own options
(cache, config, model, k_g, ...), as a command that runs and writes exactly what stage 2 then reads.
A setting no `semst embed` can satisfy is refused up front instead."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_model import build_tiny_model
from toy_slides import two_domain_slide

import semst.cluster.run as cluster_run
from semst.experiments.cli import main
from semst.shared.cache import embedding_tag

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def grid(tmp_path, monkeypatch):
    """An 80-spot, 20-gene slide 'grid' on the search path; cluster runs record the config they hint for."""
    data = tmp_path / "data"
    data.mkdir()
    two_domain_slide().write_h5ad(data / "grid.h5ad")
    # grid has no config of its own: every run gets a --config, with stage-2 settings only ...
    cluster_only = "[cluster]\nradius = 1.5\nexpr_k = 5\nepochs = 2\nhidden1 = 16\nhidden2 = 8\n"
    (tmp_path / "cluster.toml").write_text(cluster_only)
    # ... or also with settings of stage 1 that no `semst embed` option sets (min_cells picks the HVGs)
    (tmp_path / "embed.toml").write_text("[preprocess]\nmin_cells = 1\n[embed]\nk_genes = 5\n" + cluster_only)
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    monkeypatch.chdir(REPO)  # the home folder: the default cache is REPO/data/cache (never written here)
    asked = []
    original = cluster_run.embed_command
    monkeypatch.setattr(cluster_run, "embed_command", lambda cfg, *a: asked.append(cfg) or original(cfg, *a))
    return {"toml": tmp_path / "cluster.toml", "embed_toml": tmp_path / "embed.toml", "cache": tmp_path / "cache.zarr", "out": tmp_path / "results", "asked": asked}


def hint_of(grid, *args) -> str:
    """The command in the error of a `semst cluster grid` that finds no embeddings."""
    config = [] if "--config" in args else ["--config", str(grid["toml"])]
    done = CliRunner().invoke(main, ["cluster", "grid", "--out", str(grid["out"]), *config, *args])
    assert done.exit_code == 2, done.output
    m = re.search(r"Run `([^`]+)`", done.output)
    assert m, done.output
    return m.group(1)


def semst_args(command: str) -> list[str]:
    """The `semst` arguments a hint runs; for `make embed ...`, the ones the Makefile would run."""
    words = shlex.split(command)
    if words[0] == "make":
        dry = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, check=True)
        line = next(x for x in dry.stdout.splitlines() if "/semst embed " in x)
        words = shlex.split(line)
    assert words[0].endswith("semst"), command
    return words[1:]


def resolved_by_embed(args: list[str], monkeypatch):
    """Run `semst <args>` through the real CLI up to the point it would embed; the config it resolved."""
    seen = []
    monkeypatch.setattr("semst.embed.run.embed_dataset", lambda cfg, **kw: seen.append(cfg))
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0 and seen, done.output
    return seen[0]


@pytest.mark.parametrize("options,form", [
    ([], "make embed DATASET=grid"),
    (["--cache", "{cache}"], "make embed DATASET=grid CACHE={cache}"),
    (["--cache", "{cache}", "--model", "/models/My Model"], "semst embed grid --cache {cache} --model '/models/My Model'"),
    (["--cache", "{cache}", "--model", "/models/llama"], "make embed DATASET=grid MODEL=/models/llama CACHE={cache}"),
    (["--cache", "{cache}", "--k-genes", "7"], "semst embed grid --cache {cache} --k-genes 7"),
    (["--cache", "{cache}", "--k-genes", "20"], "make embed DATASET=grid CACHE={cache}"),  # the default
    (["--cache", "{cache}", "--recipe", "paper"], "semst embed grid --cache {cache} --recipe paper"),
    (["--cache", "{cache}", "--recipe", "paper", "--k-genes", "20"],
     "semst embed grid --cache {cache} --recipe paper --k-genes 20"),
    (["--cache", "{cache}", "--pooling", "last", "--template", "nonbio", "--gene-ranking", "scaled"],
     "semst embed grid --cache {cache} --gene-ranking scaled --pooling last --template nonbio"),
    (["--cache", "{cache}", "--config", "{embed_toml}"], "semst embed grid --cache {cache} --config {embed_toml}"),
    (["--cache", "{cache}", "--config", "{embed_toml}", "--k-genes", "3", "--pooling", "last"],
     "semst embed grid --cache {cache} --config {embed_toml} --k-genes 3 --pooling last"),
    (["--cache", "{space}"], "semst embed grid --cache '{space}'"),
], ids=["default-cache", "cache", "model-path-with-space", "model", "k-genes", "k-genes-default", "recipe",
        "recipe-and-its-k", "pooling-template-ranking", "config", "config-and-options", "cache-with-space"])
def test_the_hint_repeats_the_users_options_and_resolves_to_what_stage_2_reads(grid, monkeypatch, options, form):
    values = {"cache": grid["cache"], "embed_toml": grid["embed_toml"], "space": grid["cache"].parent / "my cache.zarr"}
    options = [o.format(**values) for o in options]
    command = hint_of(grid, *options)
    assert command == form.format(**values)
    wanted = grid["asked"][-1]
    got = resolved_by_embed(semst_args(command), monkeypatch)
    assert (embedding_tag(got), got.model, got.pooling, got.dtype, got.cache) == (
        embedding_tag(wanted.embed), wanted.embed.model, wanted.embed.pooling, wanted.embed.dtype, wanted.cache)


def test_a_config_built_in_code_gets_a_hint_that_says_what_options_cannot_set(grid):
    from semst.cluster.run import embed_command
    from semst.shared.config import load_cluster_config

    cfg = load_cluster_config("grid", {"cache": str(grid["cache"])}, path=grid["toml"],
                              embed_overrides={"cache": str(grid["cache"])})
    cfg.embed.genes_from = "all"  # no `semst embed` option sets it
    assert embed_command(cfg) == (f"`semst embed grid --cache {grid['cache']}` with this run's [embed] and "
                                  f"[preprocess] settings in a --config file")


@pytest.mark.parametrize("options,message", [
    (["--k-genes", "20000"], "k_genes=20000 is larger than the 20 genes preprocessing keeps (HVGs) of grid"),
    (["--k-genes", "21"], "k_genes=21 is larger than the 20 genes preprocessing keeps (HVGs) of grid"),
])
def test_a_k_no_embed_can_satisfy_is_refused_up_front_without_a_hint(grid, options, message):
    done = CliRunner().invoke(main, ["cluster", "grid", "--cache", str(grid["cache"]), "--out", str(grid["out"]),
                                     "--config", str(grid["toml"]), *options])
    assert done.exit_code == 2 and message in done.output and "Run `" not in done.output, done.output
    assert not grid["out"].exists() and not grid["cache"].exists()


def test_running_the_hint_writes_the_embeddings_stage_2_then_uses(grid, tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path / "tiny")
    options = ["--cache", str(grid["cache"]), "--config", str(grid["embed_toml"]), "--model", str(model)]
    command = hint_of(grid, *options)
    done = CliRunner().invoke(main, semst_args(command) + ["--backend", "transformers"])
    assert done.exit_code == 0, done.output
    done = CliRunner().invoke(main, ["cluster", "grid", "--out", str(grid["out"]), *options])
    assert done.exit_code == 0, done.output
    assert (grid["out"] / "grid").is_dir()
