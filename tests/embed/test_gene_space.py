"""The gene-level semantic space (semantic = "gene"): one prompt per gene in stage 1, a spot's vector
the expression-weighted mean of its genes' vectors in stage 2."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from toy_slides import SYMBOLS, two_domain_slide

from semst.cluster.gene_space import spot_vectors
from semst.cluster.run import cluster_dataset, semantic_embeddings
from semst.cluster.seeds import ClusterError
from semst.embed.gene_prompts import gene_text, render_gene_prompts
from semst.embed.run import EmbedError, embed_dataset
from semst.shared.cache import EmbeddingCache
from semst.shared.config import ConfigError, load_cluster_config, load_embed_config
from semst.shared.genes import gene_table_tag, gene_weight_matrix, hgnc_names, normalised_rows, top_k_mask
from semst.shared.preprocess import top_k_genes


def quiet(*a, **k):
    pass


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model):
    """Two toy slides: "toy" over the first 14 symbols, "toy2" over the last 14 (8 shared)."""
    data = tmp_path / "data"
    data.mkdir()
    two_domain_slide(6, 4, genes=SYMBOLS[:14], seed=0).write_h5ad(data / "toy.h5ad")
    two_domain_slide(6, 4, genes=SYMBOLS[6:], seed=1).write_h5ad(data / "toy2.h5ad")
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    return {"data": data, "cache": tmp_path / "cache.zarr", "model": str(tiny_model), "tmp": tmp_path}


BASE = {"backend": "transformers", "k_genes": 5, "batch_size": 4, "genes_from": "all", "semantic": "gene"}


def embed_cfg(env, dataset="toy", **kw):
    return load_embed_config(dataset, {"cache": str(env["cache"]), "model": env["model"], **BASE, **kw})


def cluster_cfg(env, dataset="toy", embed=None, **kw):
    embed = {"cache": str(env["cache"]), "model": env["model"], **BASE, **(embed or {})}
    return load_cluster_config(dataset, {"cache": str(env["cache"]), "epochs": 3, "n_domains": 2, **kw},
                               embed_overrides=embed)


def listed_genes(adata, k):
    return {g for genes in top_k_genes(adata, k) for g in genes}


def test_semantic_and_gene_weights_are_checked_choices(env):
    with pytest.raises(ConfigError, match="semantic must be one of 'spot', 'gene', got 'cell'"):
        embed_cfg(env, semantic="cell")
    with pytest.raises(ConfigError, match="gene_weights must be one of 'topk', 'all', got 'hvg'"):
        embed_cfg(env, gene_weights="hvg")


def test_embed_computes_one_prompt_per_distinct_gene_of_the_top_lists(env):
    import anndata as ad

    adata = ad.read_h5ad(env["data"] / "toy.h5ad")
    report = embed_dataset(embed_cfg(env), progress=False, log=quiet)
    assert report.n_prompts == report.n_computed == len(listed_genes(adata, 5))
    again = embed_dataset(embed_cfg(env), progress=False, log=quiet)
    assert (again.n_cached, again.n_computed) == (report.n_prompts, 0)


def test_all_weights_embed_every_gene_of_the_set(env):
    report = embed_dataset(embed_cfg(env, gene_weights="all"), progress=False, log=quiet)
    assert report.n_prompts == report.n_computed == 14


def test_a_second_dataset_computes_only_its_new_genes(env):
    embed_dataset(embed_cfg(env, gene_weights="all"), progress=False, log=quiet)
    other = embed_dataset(embed_cfg(env, "toy2", gene_weights="all"), progress=False, log=quiet)
    assert (other.n_prompts, other.n_cached, other.n_computed) == (14, 8, 6)


def test_the_gene_table_maps_each_gene_to_its_prompt(env, tiny_model):
    from transformers import AutoTokenizer

    from semst.shared.hashing import prompt_hash

    cfg = embed_cfg(env, gene_weights="all")
    embed_dataset(cfg, progress=False, log=quiet)
    table, meta = EmbeddingCache(env["cache"], create=False).read_spot_table("toy", gene_table_tag(cfg))
    prompts = render_gene_prompts(SYMBOLS[:14], AutoTokenizer.from_pretrained(tiny_model), cfg)
    assert table["spot_id"].tolist() == SYMBOLS[:14]
    assert table["prompt_hash"].tolist() == [prompt_hash(p) for p in prompts]
    assert meta["kind"] == "gene-table" and meta["n_genes"] == 14


def test_a_gene_prompt_is_the_papers_framing_with_the_symbol_and_its_hgnc_name(env, tiny_model):
    from transformers import AutoTokenizer

    prompt = render_gene_prompts(["GFAP"], AutoTokenizer.from_pretrained(tiny_model), embed_cfg(env))[0]
    assert "Highly expressed genes: GFAP (glial fibrillary acidic protein)<|im_end|>" in prompt
    assert "Represent the biological state of a cell" in prompt


def test_a_mouse_symbol_gets_its_human_orthologs_name_and_an_unknown_symbol_stays_bare():
    names = hgnc_names()[0]
    assert gene_text("Mobp", names) == "Mobp (myelin associated oligodendrocyte basic protein)"
    assert gene_text("Gm12345", names) == "Gm12345"
    assert gene_text("GFAP", None) == "GFAP"


def test_names_off_and_on_write_different_gene_tables(env):
    assert gene_table_tag(embed_cfg(env)) != gene_table_tag(embed_cfg(env, gene_names=False))


def test_max_spots_is_refused_for_gene_prompts(env):
    with pytest.raises(EmbedError, match="drop --max-spots"):
        embed_dataset(embed_cfg(env), max_spots=3, progress=False, log=quiet)
    assert not env["cache"].exists()


def test_top_k_mask_lists_exactly_the_genes_top_k_genes_lists():
    rng = np.random.default_rng(3)
    counts = rng.poisson(0.8, size=(200, 30)).astype(np.float32)  # many ties and zeros
    import anndata as ad

    adata = ad.AnnData(X=counts)
    adata.var_names = [f"g{j}" for j in range(30)]
    m = sp.csr_matrix(counts, dtype=np.float64)
    m.eliminate_zeros()
    mask = top_k_mask(m, 7)
    rows = np.repeat(np.arange(200), np.diff(m.indptr))
    got = [set(adata.var_names[m.indices[(rows == i) & mask]]) for i in range(200)]
    assert got == [set(g) for g in top_k_genes(adata, 7)]


def test_the_spot_vectors_equal_a_dense_numpy_weighted_mean():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(50, 12)).astype(np.float64)
    counts[3] = 0  # a spot without counts: a zero vector
    genes = rng.normal(size=(12, 16)).astype(np.float32)
    got = spot_vectors(normalised_rows(sp.csr_matrix(counts)), genes)
    totals = counts.sum(1, keepdims=True)
    reference = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0) @ genes.astype(np.float64)
    np.testing.assert_allclose(got, reference.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert not got[3].any()


def test_topk_weights_are_each_spots_top_genes_by_count_normalised(env):
    import anndata as ad

    adata = ad.read_h5ad(env["data"] / "toy.h5ad")
    cfg = embed_cfg(env)
    raw, genes = gene_weight_matrix(cfg, adata)
    weights = normalised_rows(raw).toarray()
    for i, spot_genes in enumerate(top_k_genes(adata, 5)):
        expected = np.zeros(len(genes))
        for g in spot_genes:
            expected[genes.index(g)] = adata[i, g].X.item()
        np.testing.assert_allclose(weights[i], expected / expected.sum())


def test_stage2_vectors_are_the_weighted_means_of_the_cached_gene_vectors(env):
    import anndata as ad

    ecfg = embed_cfg(env, gene_weights="all")
    embed_dataset(ecfg, progress=False, log=quiet)
    cache = EmbeddingCache(env["cache"], create=False)
    table, meta = cache.read_spot_table("toy", gene_table_tag(ecfg))
    from semst.shared.cache import EmbeddingSpace

    gene_vectors = cache.get(EmbeddingSpace(**meta["space"]), table["prompt_hash"].tolist()).astype(np.float64)
    adata = ad.read_h5ad(env["data"] / "toy.h5ad")
    counts = np.asarray(adata.X, dtype=np.float64)
    reference = (counts / counts.sum(1, keepdims=True)) @ gene_vectors
    cfg = cluster_cfg(env, embed={"gene_weights": "all"})
    spot_ids = list(adata.obs_names[::-1])  # any spot order
    got, source = semantic_embeddings(cfg, spot_ids, 0, adata=adata)
    np.testing.assert_allclose(got, reference[::-1].astype(np.float32), rtol=1e-5, atol=1e-6)
    again, _ = semantic_embeddings(cfg, spot_ids, 0, adata=adata)
    assert np.array_equal(got, again)  # deterministic, bit for bit
    assert source["n_genes"] == 14


def test_a_missing_gene_table_names_the_embed_call_with_semantic_gene(env):
    cfg = cluster_cfg(env)
    with pytest.raises(ClusterError, match=r"semst embed toy .*--semantic gene"):
        cluster_dataset(cfg, out_dir=env["tmp"] / "r", progress=False, log=quiet)


def test_a_gene_table_without_some_needed_genes_names_them_and_the_embed_call(env):
    import anndata as ad

    embed_dataset(embed_cfg(env, gene_weights="all"), progress=False, log=quiet)
    adata = ad.read_h5ad(env["data"] / "toy.h5ad")
    cache = EmbeddingCache(env["cache"], create=False)
    tag = gene_table_tag(embed_cfg(env, gene_weights="all"))
    table, meta = cache.read_spot_table("toy", tag)
    cache.write_spot_table("toy", tag, table["spot_id"][:-2].tolist(), table["prompt_hash"][:-2].tolist(), meta)
    with pytest.raises(ClusterError, match=r"has no vector for 2 of the 14 genes .*--semantic gene"):
        semantic_embeddings(cluster_cfg(env, embed={"gene_weights": "all"}), list(adata.obs_names), 0, adata=adata)


def test_cluster_with_gene_semantic_runs_end_to_end_from_the_cli(env):
    from click.testing import CliRunner

    from semst.experiments.cli import main

    common = ["--cache", str(env["cache"]), "--model", env["model"], "--k-genes", "5", "--semantic", "gene"]
    cfg_file = env["tmp"] / "genes_all.toml"
    cfg_file.write_text('[embed]\ngenes_from = "all"\n')
    runner = CliRunner()
    embedded = runner.invoke(main, ["embed", "toy", *common, "--backend", "transformers", "--config", str(cfg_file)])
    assert embedded.exit_code == 0, embedded.output
    out = env["tmp"] / "results"
    clustered = runner.invoke(main, ["cluster", "toy", *common, "--config", str(cfg_file), "--epochs", "3",
                                     "--n-domains", "2", "--out", str(out)])
    assert clustered.exit_code == 0, clustered.output
    assert "gene-level mean (topk)" in clustered.output
    assert list(out.glob("toy/*/domains.csv")) or list(out.glob("toy/*/*"))
