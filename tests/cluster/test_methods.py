"""The methods registry: every registered method keeps one protocol, and a new method is one class.

A method is built from a slide and its own settings and returns per seed what the per-seed runner
clusters; the grid asks the registry which methods and settings exist. The toy method below is
added the way a user would add theirs: one class, registered, and a grid that names it -- no other
module changes.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from toy_slides import two_domain_slide

from semst.cluster.methods import METHODS, Method, method_class, register_method
from semst.cluster.seeds import load_slide, run_seeds

N_SPOTS = 120
# The built-ins' own settings kept small so the contract runs in seconds; any other method runs its defaults.
QUICK = {"stagate": {"hidden": 16, "latent": 4, "epochs": 5}}
# Other tools (semst.experiments.peers), registered when the grid is imported: a stand-in script under
# this interpreter keeps their contract without building their environments.
STANDIN_PEER = {"python": sys.executable, "script": str(Path(__file__).resolve().parents[1] / "peer_standin.py"),
                "platform": "visium"}
PEERS = ("graphst", "banksy", "spagcn", "stdcl", "cellcharter")
QUICK.update({name: STANDIN_PEER for name in PEERS})


def quiet(*args, **kwargs):
    pass


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A 12 x 10 two-domain slide 'toy' on the data path, its config, and fake cached embeddings for it;
    returns a function making the slide's ClusterConfig with overrides."""
    from semst.shared.cache import EmbeddingCache, EmbeddingSpace, embedding_tag
    from semst.shared.config import load_cluster_config
    from semst.shared.hashing import prompt_hash

    (tmp_path / "data").mkdir()
    adata = two_domain_slide(12, 10)
    adata.write_h5ad(tmp_path / "data" / "toy.h5ad")
    (tmp_path / "toy.toml").write_text("[preprocess]\nmin_cells = 1\n[cluster]\nradius = 1.5\nexpr_k = 5\n"
                                       "hidden1 = 16\nhidden2 = 8\nepochs = 3\n")
    monkeypatch.setenv("SEMST_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    cache = tmp_path / "cache.zarr"

    def cfg(**overrides):
        return load_cluster_config("toy", {"cache": str(cache), "seeds": [0, 1], **overrides},
                                   path=tmp_path / "toy.toml", embed_overrides={"cache": str(cache)})

    space = EmbeddingSpace(model="fake", weights="0" * 64, pooling="mean", dtype="float32", dim=8)
    hashes = [prompt_hash(f"prompt {i}") for i in range(N_SPOTS)]
    store = EmbeddingCache(cache)
    store.add(space, hashes, np.random.default_rng(2).normal(size=(N_SPOTS, 8)).astype(np.float32), hashes,
              [1] * N_SPOTS)
    store.write_spot_table("toy", embedding_tag(cfg().embed), list(adata.obs_names), hashes,
                           {"space": dataclasses.asdict(space), "space_id": space.space_id})
    cfg.root = tmp_path
    return cfg


# -- the contract every registered method keeps -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_is_found_by_its_name_and_configures_its_own_settings(toy, name):
    cls = METHODS[name]
    cfg = toy()
    assert cls.name == name and method_class(name) is cls and issubclass(cls, Method)
    settings = cls.configure(cfg, QUICK.get(name, {}))
    if cls.settings_class is None:
        assert settings is None and cls.settings_key is None
    else:
        # the grid hashes the settings into the cell's identity and reads their defaults from the dataclass
        assert isinstance(settings, cls.settings_class) and isinstance(dataclasses.asdict(settings), dict)
        if name not in PEERS:  # a peer needs its platform named for a slide semst does not know (the toy)
            assert isinstance(cls.configure(cfg), cls.settings_class)
    assert isinstance(cls.describe({}), str) and cls.describe({})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_says_whether_it_reads_semantic_vectors(toy, name):
    cls = METHODS[name]
    assert cls.uses_semantic(toy(fusion="film")) is cls.reads_semantic
    assert cls.uses_semantic(toy(fusion="none")) is False


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_fits_one_finite_latent_per_seed_and_the_same_one_for_the_same_seed(toy, name):
    cls = METHODS[name]
    cfg = toy()
    slide = load_slide(cfg)
    method = cls(slide, cls.configure(cfg, QUICK.get(name, {})), progress=False, log=quiet)
    report = run_seeds(slide, method.fit, log=quiet, fixed_seconds=method.fixed_seconds)
    for seed in cfg.seeds:
        latent = report.latents[seed]
        assert latent.ndim == 2 and latent.shape[0] == N_SPOTS and np.isfinite(latent).all()
        assert report.labels[seed].shape == (N_SPOTS,) and isinstance(report.histories[seed], dict)
    assert report.n_domains == 2 and [r["seed"] for r in report.per_seed] == [0, 1]
    assert np.array_equal(method.fit(0).latent, report.latents[0])


def test_a_method_is_registered_only_with_a_name_and_dataclass_settings():
    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        register_method(type("Nameless", (Method,), {}))
    with pytest.raises(ValueError, match="settings_key and settings_class go together"):
        register_method(type("Half", (Method,), {"name": "half", "settings_key": "half"}))
    with pytest.raises(ValueError, match="settings_class must be a dataclass"):
        register_method(type("Loose", (Method,), {"name": "loose", "settings_key": "loose", "settings_class": dict}))
    assert not {"half", "loose"} & set(METHODS)


def test_an_unknown_method_name_lists_the_known_ones():
    from semst.shared.config import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'gcn'; known: semst, stagate, pca-kmeans"):
        method_class("gcn")


# -- a toy method, added through the registry only ---------------------------------------------------------

@dataclass
class TwistSettings:
    n_pcs: int = 5
    weight: float = 1.0  # how much the spot's position counts beside its expression


class PcsWithPosition(Method):
    """k-means on the PCs of the raw counts (log1p, no preprocessing), with a twist: each spot's
    standardised position appended, scaled by ``weight``."""

    name = "toy-pcs-with-position"
    settings_key = "twist"
    settings_class = TwistSettings

    def __init__(self, slide, settings=None, *, progress=False, log=print):
        from sklearn.decomposition import PCA

        super().__init__(slide, settings, progress=progress, log=log)
        x = slide.adata.X
        counts = np.log1p(np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64))
        pcs = PCA(self.settings.n_pcs, random_state=0).fit_transform(counts)
        position = (slide.coords - slide.coords.mean(0)) / slide.coords.std(0)
        self.latent = np.hstack([pcs / pcs.std(), self.settings.weight * position]).astype(np.float32)

    @classmethod
    def describe(cls, own):
        return "toy: k-means on raw-count PCs beside the spot's position"

    def fit(self, seed):
        return types.SimpleNamespace(latent=self.latent)


@pytest.fixture
def toy_method():
    cls = register_method(PcsWithPosition)
    yield cls
    METHODS.pop(cls.name)


TOY_GRID = """
[grid]
datasets = ["toy"]
seeds = [0, 1]
dataset_configs = { toy = "toy.toml" }
[twist]
n_pcs = 4
[[variant]]
name = "pca"
label = "PCA"
backbone = "pca-kmeans"
[[variant]]
name = "twisted"
label = "PCs + position"
backbone = "toy-pcs-with-position"
twist = { weight = WEIGHT }
[[table]]
name = "t"
title = "Toy"
variants = ["pca", "twisted"]
[[figure]]
name = "maps"
kind = "domains"
title = "Domain maps"
variants = ["pca", "twisted"]
"""


def write_grid(root: Path, weight: float = 2.0, text: str = TOY_GRID) -> Path:
    path = root / "grid.toml"
    path.write_text(text.replace("WEIGHT", repr(weight)))
    return path


def test_a_method_added_through_the_registry_runs_in_a_grid_end_to_end(toy, toy_method):
    from semst.experiments.grid import run_experiment

    out = toy.root / "report"
    outcome = run_experiment(write_grid(toy.root), cache=toy.root / "cache.zarr", out_dir=out, progress=False,
                             log=quiet)
    assert outcome.n_failed == 0 and not outcome.skipped
    cell = json.loads((out / "cells" / "toy" / "twisted.json").read_text())
    assert cell["status"] == "ok" and [r["seed"] for r in cell["per_seed"]] == [0, 1]
    assert cell["summary"]["ARI"]["mean"] > 90  # the two halves, found from expression and position
    assert cell["prompts_computed"] == 0 and cell["embedding"] is None  # it reads no semantic vectors
    assert cell["settings"]["backbone"] == "toy-pcs-with-position"
    text = (out / "REPORT.md").read_text()
    assert "| toy | 120 | 2 | PCs + position | 2 |" in text
    assert "toy: k-means on raw-count PCs beside the spot's position" in text
    assert "Grid-wide [twist] overrides, applied to every method: n_pcs = 4." in text
    assert (out / "figures" / "maps-toy.png").is_file()


def test_a_new_methods_settings_are_part_of_its_cells_identity(toy, toy_method):
    from semst.experiments.grid import cell_config, cell_method_settings, cell_settings, load_grid

    same, other = (load_grid(write_grid(toy.root, w)) for w in (2.0, 3.0))
    variant = same.variant("twisted")
    cfg = cell_config(same, variant, "toy")
    assert cell_method_settings(same, variant, cfg) == TwistSettings(n_pcs=4, weight=2.0)  # grid-wide < variant
    assert cell_settings(same, variant, cfg)["twist"] == {"n_pcs": 4, "weight": 2.0}
    assert cell_settings(other, other.variant("twisted"), cfg) != cell_settings(same, variant, cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("twist = { weight", "twist = { wieght"),
     "unknown key(s) in variant 'twisted' twist: wieght; allowed: n_pcs, weight"),
    (lambda t: t.replace("twist = { weight = 2.0 }", 'twist = { weight = "heavy" }'),
     "variant 'twisted' twist.weight = 'heavy' is not a valid float"),
    (lambda t: t.replace('backbone = "pca-kmeans"', 'backbone = "pca-kmeans"\ntwist = { weight = 1.0 }'),
     "variant 'pca': 'twist' settings only apply to backbone 'toy-pcs-with-position', not 'pca-kmeans'"),
    (lambda t: t.replace("twist = { weight = 2.0 }", "twist = { weight = 2.0 }\nembed = { k_genes = 5 }"),
     "variant 'twisted': backbone 'toy-pcs-with-position' uses no semantic embedding; drop embed"),
    (lambda t: t.replace("[twist]\nn_pcs = 4", "[twist]\nn_pc = 4"), "unknown key(s) in [twist]: n_pc"),
    (lambda t: t.replace('kind = "domains"', 'kind = "umap"'),
     "a UMAP shows a variant's semantic embeddings, and 'pca' has none"),
])
def test_the_grid_checks_a_new_methods_settings_from_its_class(toy, toy_method, edit, message):
    from semst.experiments.grid import ExperimentError, load_grid

    with pytest.raises(ExperimentError) as info:
        load_grid(write_grid(toy.root, text=edit(TOY_GRID.replace("WEIGHT", "2.0"))))
    assert message in str(info.value)


def test_without_its_class_neither_the_method_nor_its_settings_table_exist(toy):
    from semst.experiments.grid import ExperimentError, load_grid

    with pytest.raises(ExperimentError, match=r"unknown key\(s\) in the file \(top level\): twist"):
        load_grid(write_grid(toy.root))
    plain = TOY_GRID.replace("[twist]\nn_pcs = 4\n", "").replace("twist = { weight = WEIGHT }\n", "")
    with pytest.raises(ExperimentError, match="has backbone 'toy-pcs-with-position'; known methods: semst, stagate"):
        load_grid(write_grid(toy.root, text=plain))


def test_a_grid_wide_baseline_table_applies_to_every_baseline_under_the_variants_own(toy):
    from semst.cluster.baselines import BaselineSettings
    from semst.experiments.grid import cell_config, cell_method_settings, parse_grid

    grid = parse_grid({"grid": {"datasets": ["mob"], "seeds": [0]}, "baseline": {"n_pcs": 10},
                       "variant": [{"name": "pca", "backbone": "pca-kmeans"},
                                   {"name": "smooth", "backbone": "pca-spatial-kmeans", "baseline": {"hops": 2}}]})
    settings = [cell_method_settings(grid, v, cell_config(grid, v, "mob")) for v in grid.variants]
    assert settings == [BaselineSettings(n_pcs=10, hops=1), BaselineSettings(n_pcs=10, hops=2)]
