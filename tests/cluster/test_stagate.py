"""The STAGATE-style backbone: tied decoder, FSM plug-in, training, and a run on a toy slide."""
from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from semst.cluster.dgl_compat import dgl
from semst.cluster.graphs import spatial_graph
from semst.cluster.stagate import STAGATE, StagateConfig, StagateError, stagate_dataset, train_stagate

SMALL = StagateConfig(hidden=16, latent=4, epochs=40)


def grid_slide(seed=0):
    """A 10 x 12 grid, left and right halves expressing different genes."""
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    left = coords[:, 0] < 6
    x = rng.normal(size=(120, 20)).astype(np.float32)
    x[left, :10] += 2.0
    x[~left, 10:] += 2.0
    return coords, x, np.where(left, "left", "right")


def self_loop_graph(n):
    return dgl.graph((torch.arange(n), torch.arange(n)), num_nodes=n)


def test_the_model_maps_spots_to_latent_and_back_to_genes():
    coords, x, _ = grid_slide()
    model = STAGATE(20, hidden=16, latent=4)
    z, recon = model(spatial_graph(coords, radius=1.5), torch.from_numpy(x))
    assert z.shape == (120, 4) and recon.shape == (120, 20)


def test_the_decoder_reuses_the_encoder_weights_transposed_and_owns_none():
    model = STAGATE(20, hidden=16, latent=4)
    assert sorted(name for name, _ in model.named_parameters()) == ["W2", "gat1.attn_l", "gat1.attn_r", "gat1.fc.weight"]
    # With only self-loops every attention coefficient is 1, so the decoder is ELU(z W2) W1 exactly.
    g = self_loop_graph(5)
    z = torch.randn(5, 4)
    _, attention = model.encode(g, torch.randn(5, 20))
    expected = F.elu(z @ model.W2) @ model.gat1.fc.weight
    assert torch.allclose(model.decode(g, z, attention), expected, atol=1e-6)


def test_the_fsm_modulates_the_latent_embedding_and_needs_semantic_vectors():
    model = STAGATE(20, hidden=16, latent=4, emb_dim=8)
    plain_names = {"W2", "gat1.attn_l", "gat1.attn_r", "gat1.fc.weight"}
    extra = {name.split(".")[0] for name, _ in model.named_parameters() if name not in plain_names}
    assert extra == {"project", "fsm"}
    g = self_loop_graph(5)
    x = torch.randn(5, 20)
    with pytest.raises(StagateError, match="pass the semantic embeddings"):
        model.encode(g, x)
    # alpha = beta = 0 (last FSM layer zeroed) is the identity: Z' = Z
    with torch.no_grad():
        model.fsm.mlp[-1].weight.zero_()
        model.fsm.mlp[-1].bias.zero_()
    z_fsm, _ = model.encode(g, x, torch.randn(5, 8))
    h1, _ = model.gat1(g, x, get_attention=True)
    assert torch.allclose(z_fsm, F.linear(F.elu(h1.squeeze(1)), model.W2), atol=1e-6)


def test_training_lowers_the_reconstruction_error_and_is_seeded():
    coords, x, _ = grid_slide()
    g = spatial_graph(coords, radius=1.5)
    a = train_stagate(x, g, None, SMALL, seed=3)
    b = train_stagate(x, g, None, SMALL, seed=3)
    assert a.history["mse"][-1] < a.history["mse"][0]
    assert a.latent.shape == (120, 4) and np.array_equal(a.latent, b.latent)


def test_semantic_vectors_must_match_the_spots():
    coords, x, _ = grid_slide()
    with pytest.raises(StagateError, match="7 rows for 120 spots"):
        train_stagate(x, spatial_graph(coords, radius=1.5), np.zeros((7, 8)), SMALL, seed=0)


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(StagateError, match="epochs must be >= 1"):
        StagateConfig(epochs=0)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The grid slide as raw counts on the search path (as 'grid'), a config, fake cached embeddings."""
    from semst.shared.cache import EmbeddingCache, EmbeddingSpace, embedding_tag
    from semst.shared.config import load_cluster_config
    from semst.shared.hashing import prompt_hash

    coords, x, truth = grid_slide()
    counts = np.random.default_rng(1).poisson(np.exp(x / 2)).astype(np.float32)
    a = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(120)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(20)]))
    a.obsm["spatial"] = coords
    a.obs["ground_truth"] = truth
    (tmp_path / "data").mkdir()
    a.write_h5ad(tmp_path / "data" / "grid.h5ad")
    (tmp_path / "grid.toml").write_text("[preprocess]\nmin_cells = 1\n[cluster]\nradius = 1.5\nexpr_k = 5\n")
    monkeypatch.setenv("SEMST_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    cache = tmp_path / "cache.zarr"

    def cfg(**kw):
        return load_cluster_config("grid", {"cache": str(cache), "seeds": [0, 1], **kw}, path=tmp_path / "grid.toml",
                                   embed_overrides={"cache": str(cache)})

    space = EmbeddingSpace(model="fake", weights="0" * 64, pooling="mean", dtype="float32", dim=8)
    hashes = [prompt_hash(f"prompt {i}") for i in range(120)]
    store = EmbeddingCache(cache)
    store.add(space, hashes, np.random.default_rng(2).normal(size=(120, 8)).astype(np.float32), hashes, [1] * 120)
    store.write_spot_table("grid", embedding_tag(cfg().embed), list(a.obs_names), hashes,
                           {"space": dataclasses.asdict(space), "space_id": space.space_id})
    return cfg


@pytest.mark.parametrize("fusion", ["none", "film"])
def test_a_run_on_a_slide_reports_every_seed(toy, fusion):
    report = stagate_dataset(toy(fusion=fusion), SMALL, log=lambda *a: None)
    assert (report.n_spots, report.n_domains) == (120, 2)
    assert [r["seed"] for r in report.per_seed] == [0, 1] and report.summary["ARI"]["n"] == 2
    assert sorted(report.labels) == [0, 1] and report.labels[0].shape == (120,)


def test_only_the_fsm_plugs_into_stagate(toy):
    with pytest.raises(StagateError, match="fusion must be 'film'"):
        stagate_dataset(toy(fusion="concat"), SMALL, log=lambda *a: None)
