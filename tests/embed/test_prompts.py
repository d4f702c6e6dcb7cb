"""semst.embed.prompts: the exact text each spot's embedding (and its cache key) is computed from."""
from __future__ import annotations

import copy

import pytest
from tiny_model import QWEN3_STYLE_TEMPLATE, smollm2_tokenizer

from semst.embed.prompts import TEMPLATES, PromptError, render_prompt, render_prompts
from semst.shared.hashing import prompt_hash

SEMST_SYSTEM = ("You are an expert in bioinformatics. Represent the biological state of a cell characterized "
                "by the following highly expressed genes. Focus on capturing the functional essence relevant "
                "for spatial domain identification. Output a dense vector representation.")


def chatml(system: str, user: str) -> str:
    """The ChatML string the SemST authors wrote by hand (llm_generate_embedding.py)."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer and chat template (the default model's)."""
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """A tokenizer whose template has Qwen3's enable_thinking switch."""
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    return tok


def test_semst_prompt_is_the_papers_chatml_text(tokenizer):
    got = render_prompt(["MBP", "PLP1", "GFAP"], tokenizer)
    assert got == chatml(SEMST_SYSTEM, "Highly expressed genes: MBP, PLP1, GFAP")


def test_thinking_template_renders_without_a_think_block(qwen3_tokenizer):
    # enable_thinking is not passed: Qwen3 then ends with "<|im_start|>assistant\n", as in the paper.
    got = render_prompt(["MBP", "PLP1"], qwen3_tokenizer)
    assert got == chatml(SEMST_SYSTEM, "Highly expressed genes: MBP, PLP1")
    assert "<think>" not in got


def test_empty_gene_list_renders_as_none(tokenizer):
    assert render_prompt([], tokenizer) == chatml(SEMST_SYSTEM, "Highly expressed genes: none")


def test_gene_order_is_kept(tokenizer):
    assert "Highly expressed genes: PLP1, MBP<" in render_prompt(["PLP1", "MBP"], tokenizer)


def test_cache_key_of_a_known_prompt_is_pinned(tokenizer):
    # Any change of the rendered text (template, separator, instruction) changes every cache key.
    text = render_prompt(["MBP", "PLP1", "GFAP"], tokenizer)
    assert prompt_hash(text) == "2cd36f6ccfb2ebf60b30ecbce83ff546ea64e008647711969fab62d4f816c017"


def test_identical_gene_lists_render_identically(tokenizer):
    prompts = render_prompts([["A1", "B2"], ["C3"], ["A1", "B2"], ["A1", "B2"]], tokenizer, "semst")
    assert prompts[0] == prompts[2] == prompts[3]
    assert prompts[0] != prompts[1]


def test_render_prompts_equals_rendering_each_spot(tokenizer, qwen3_tokenizer):
    lists = [["MBP"], [], ["SNAP25", "NRGN", "CALM1"], ["MBP"], ["Gfap", "mt-Co1", "Rps27a"]]
    for tok in (tokenizer, qwen3_tokenizer):
        for template in TEMPLATES:
            assert render_prompts(lists, tok, template) == [render_prompt(g, tok, template) for g in lists]


def test_nonbio_template_lists_the_same_genes_without_biology(tokenizer):
    got = render_prompt(["MBP", "PLP1"], tokenizer, "nonbio")
    t = TEMPLATES["nonbio"]
    assert got == chatml(t.system, t.user_prefix + "MBP, PLP1")
    framing = (t.system + t.user_prefix).lower()
    assert not any(word in framing for word in ("gene", "bio", "cell", "express", "spatial"))


def test_unknown_template_is_an_error_naming_the_known_ones(tokenizer):
    with pytest.raises(PromptError, match="nonbio.*semst"):
        render_prompt(["MBP"], tokenizer, "bio")


def test_tokenizer_without_chat_template_is_an_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(PromptError, match="no chat template"):
        render_prompts([["MBP"]], tok, "semst")


@pytest.mark.parametrize("bad", ["", "  ", None, 3])
def test_a_gene_symbol_that_is_not_a_nonempty_string_is_an_error(tokenizer, bad):
    with pytest.raises(PromptError, match="non-empty strings"):
        render_prompts([["MBP", bad]], tokenizer, "semst")
