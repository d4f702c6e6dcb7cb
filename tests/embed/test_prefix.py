"""Exact prefix reuse (semst.embed.prefix): the prompts' shared leading tokens run once give the same
vectors as whole prompts, for MEAN and LAST pooling, on the tiny model (CI) and on real prompts.

"Same" is the tolerance within which vLLM and transformers already agree: cosine >= 0.99999 and a
largest absolute difference <= 2e-5.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
from click.testing import CliRunner

from semst.embed.backends import load_backend
from semst.embed.prefix import common_prefix, group_by_prefix, template_prefixes
from semst.embed.prompts import render_prompts

MAX_ABS = 2e-5
MIN_COSINE = 0.99999

GENE_LISTS = [
    [],
    ["MBP"],
    ["7SK", "MBP"],  # a first gene starting with a digit
    ["Gfap", "Aqp4", "Slc1a3", "Sparc", "mt-Nd1", "Rps27a", "Apoe", "Clu"],
    [f"GENE{i}" for i in range(20)],
    [f"LOC{1000 + i}" for i in range(60)],
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_same_vectors(reused: np.ndarray, whole: np.ndarray) -> None:
    assert reused.shape == whole.shape
    assert np.abs(reused - whole).max() <= MAX_ABS
    assert cosine(reused, whole).min() >= MIN_COSINE


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """(pooling, prefix_reuse) -> transformers backend on the tiny model (batch 4: mixed lengths)."""
    loaded = {}

    def get(pooling: str, reuse: bool):
        if (pooling, reuse) not in loaded:
            loaded[pooling, reuse] = load_backend("transformers", str(tiny_model), pooling=pooling, batch_size=4,
                                                  prefix_reuse=reuse)
        return loaded[pooling, reuse]

    return get


@pytest.fixture(scope="module")
def mixed_prompts(tiny):
    """semst prompts, nonbio prompts (another prefix) and texts that share no prefix, interleaved."""
    tokenizer = tiny("mean", False).tokenizer
    semst = render_prompts(GENE_LISTS, tokenizer, "semst")
    nonbio = render_prompts(GENE_LISTS[:3], tokenizer, "nonbio")
    plain = ["hello there", "<|im_start|>system\nsomething else entirely<|im_end|>\n"]
    return [semst[0], plain[0], nonbio[0], *semst[1:4], plain[1], *nonbio[1:], *semst[4:]]


def test_common_prefix_is_the_longest_shared_start():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[1, 2], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[7], [8]]) == []
    assert common_prefix([]) == []


def test_the_shared_prefix_is_taken_from_whole_prompts_not_the_tokenized_instruction(tiny):
    """The user prefix's trailing space merges into the first gene token, so tokenizing the text before
    the genes gives a token that no real prompt contains at that place."""
    tokenizer = tiny("mean", True).tokenizer
    prefixes = template_prefixes(tokenizer)
    prompts = render_prompts(GENE_LISTS, tokenizer, "semst")
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    semst_prefix = max(prefixes, key=lambda p: sum(tuple(s[:len(p)]) == p for s in ids))
    assert all(tuple(s[:len(semst_prefix)]) == semst_prefix for s in ids)
    assert tuple(common_prefix(ids)) == semst_prefix
    head = prompts[0][:prompts[0].index("Highly expressed genes: ") + len("Highly expressed genes: ")]
    naive = tokenizer(head, add_special_tokens=False)["input_ids"]
    assert naive[:len(semst_prefix)] == list(semst_prefix) and len(naive) > len(semst_prefix)
    assert not all(s[:len(naive)] == naive for s in ids)


def test_prompts_are_grouped_by_the_longest_prefix_they_start_with():
    groups = group_by_prefix([[1, 2, 3, 9], [1, 2, 8], [5, 6], [1, 2], [1, 2, 3]], [(1, 2, 3), (1, 2)])
    # A prompt equal to a prefix has no suffix to run: computed whole.
    assert groups == {(1, 2, 3): [0], (1, 2): [1, 4], None: [2, 3]}


def test_every_template_has_a_shared_prefix_of_the_smollm2_tokenizer(tiny):
    prefixes = template_prefixes(tiny("mean", True).tokenizer)
    assert len(prefixes) == 2  # semst and nonbio
    assert len(prefixes[0]) == 53  # dlpfc-151673's prompts share exactly 53 tokens (issue 22)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_prefix_reuse_gives_the_whole_prompts_vectors(tiny, mixed_prompts, pooling):
    reused = tiny(pooling, True).embed(mixed_prompts)
    whole = tiny(pooling, False).embed(mixed_prompts)
    assert_same_vectors(reused, whole)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_prompt_without_the_shared_prefix_is_computed_whole(tiny, pooling):
    backend = tiny(pooling, True)
    text = "hello there, no template here"
    assert group_by_prefix(backend.token_ids([text]), backend._prefixes) == {None: [0]}
    np.testing.assert_array_equal(backend.embed([text]), tiny(pooling, False).embed([text]))


def test_reuse_uses_the_prefix_cache(tiny, mixed_prompts):
    backend = tiny("mean", True)
    backend.embed(mixed_prompts)
    assert backend.prefix_reuse
    assert len(backend._prefix_states) == 2  # semst's and nonbio's prefix, each run once


def test_a_prompt_alone_equals_it_in_a_reused_batch(tiny, mixed_prompts):
    backend = tiny("mean", True)
    batch = backend.embed(mixed_prompts)
    for i in (0, 3, len(mixed_prompts) - 1):
        assert_same_vectors(backend.embed([mixed_prompts[i]]), batch[i:i + 1])


def test_prefix_reuse_keeps_the_embedding_space(tiny):
    assert tiny("mean", True).space() == tiny("mean", False).space()


def test_reuse_off_means_no_prefix_is_computed(tiny, mixed_prompts):
    backend = tiny("last", False)
    backend.embed(mixed_prompts)
    assert not backend.prefix_reuse and backend._prefix_states == {}


# -- vLLM: its own prefix cache, for LAST only ---------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_last_reused(tiny_model):
    backend = load_backend("vllm", str(tiny_model), pooling="last", batch_size=4, prefix_reuse=True)
    yield backend
    del backend
    gc.collect()


def test_vllm_reuses_the_prefix_for_last_pooling_only(vllm_last_reused):
    assert vllm_last_reused.prefix_reuse
    config = vllm_last_reused.llm.llm_engine.vllm_config.cache_config
    assert config.enable_prefix_caching and config.block_size == 32


def test_vllm_last_with_its_prefix_cache_matches_transformers(vllm_last_reused, tiny, mixed_prompts):
    first = vllm_last_reused.embed(mixed_prompts)
    again = vllm_last_reused.embed(mixed_prompts)  # now the prefix's blocks are cached
    np.testing.assert_array_equal(first, again)
    assert cosine(again, tiny("last", False).embed(mixed_prompts)).min() >= 0.9999


# -- real prompts: the default model on a real slide ----------------------------------------------------


@pytest.fixture(scope="module")
def real_prompts(shared_data_dir):
    from semst.embed.checkpoints import is_complete
    from semst.embed.run import spot_gene_lists
    from semst.shared.config import load_embed_config
    from semst.shared.datasets import load_dataset
    from semst.shared.paths import default_model_dir

    if not is_complete(default_model_dir()):
        pytest.skip("the default model is not converted (make model)")
    adata = load_dataset("mob", shared_data_dir / "mob.h5ad")
    lists = spot_gene_lists(load_embed_config("mob", {"k_genes": 20}), adata)
    from transformers import AutoTokenizer

    prompts = render_prompts(lists[:6], AutoTokenizer.from_pretrained(default_model_dir()), "semst")
    return default_model_dir(), prompts + ["a prompt that does not share the prefix"]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_prefix_reuse_is_exact_on_real_prompts(real_prompts, pooling):
    model_dir, prompts = real_prompts
    reused = load_backend("transformers", str(model_dir), pooling=pooling, batch_size=5, prefix_reuse=True)
    whole = load_backend("transformers", str(model_dir), pooling=pooling, batch_size=5, prefix_reuse=False)
    assert reused.prefix_reuse
    assert_same_vectors(reused.embed(prompts), whole.embed(prompts))


# -- configuration -----------------------------------------------------------------------------------


def test_prefix_reuse_is_on_by_default_and_off_on_request():
    from semst.shared.config import load_embed_config

    assert load_embed_config("toy").prefix_reuse is True
    assert load_embed_config("toy", {"prefix_reuse": False}).prefix_reuse is False


def test_a_prefix_reuse_that_is_not_a_boolean_is_a_config_error():
    from semst.shared.config import ConfigError, EmbedConfig, validate_embed_config

    with pytest.raises(ConfigError, match="prefix_reuse"):
        validate_embed_config(EmbedConfig(dataset="toy", prefix_reuse="no"))


def test_prefix_reuse_does_not_change_the_cache_space(tiny_model):
    from semst.embed.run import embedding_space
    from semst.shared.config import EmbedConfig

    on, off = EmbedConfig(model=str(tiny_model)), EmbedConfig(model=str(tiny_model), prefix_reuse=False)
    assert embedding_space(tiny_model, on).space_id == embedding_space(tiny_model, off).space_id


@pytest.mark.parametrize("flag,expected", [([], True), (["--no-prefix-reuse"], False), (["--prefix-reuse"], True)])
def test_the_embed_command_takes_the_prefix_reuse_flag(tmp_path, monkeypatch, flag, expected):
    from toy_slides import two_domain_slide

    from semst.experiments.cli import main

    monkeypatch.setenv("SEMST_DATA_PATH", str(tmp_path))
    two_domain_slide().write_h5ad(tmp_path / "toy.h5ad")
    seen = {}
    monkeypatch.setattr("semst.embed.run.embed_dataset", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    out = CliRunner().invoke(main, ["embed", "toy", "--cache", str(tmp_path / "c.zarr"), *flag])
    assert out.exit_code == 0, out.output
    assert seen["cfg"].prefix_reuse is expected
