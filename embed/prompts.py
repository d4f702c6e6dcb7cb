"""Stage 1 prompts: a spot's top expressed genes as a chat conversation, in the model's own template.

A prompt is two chat messages rendered by the tokenizer's chat template with the generation prompt
appended (``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``):

- system: the template's instruction,
- user:   the template's prefix + the gene symbols joined by ``", "``, most expressed first.

The rendered text is exactly what the backends tokenize and what the embedding cache is keyed by
(``shared.hashing.prompt_hash``), so any change here changes every cache key.

The ``"semst"`` template is the paper's (SemST, ``llm_generate_embedding.py``). For ChatML models
(Qwen, SmolLM2) the rendered text is identical to the string the authors wrote by hand:
``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prefix}{genes}<|im_end|>\\n
<|im_start|>assistant\\n``.

Thinking models (Qwen3): ``enable_thinking`` is deliberately *not* passed. Qwen3's template then
ends the prompt with ``<|im_start|>assistant\\n``, exactly the authors' string for their Qwen3-4B;
``enable_thinking=False`` would append an empty ``<think>\\n\\n</think>\\n\\n`` block, i.e. a few more
tokens that would enter every mean-pooled embedding and differ from the paper. (Templates that open
``<think>`` by default, as some later Qwen releases do, are likewise rendered with their default.)

A spot whose gene list is empty (no detected counts among the ranked genes) gets the gene text
``"none"``: ``"Highly expressed genes: none"``. All such spots share one prompt and one embedding.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from semst.shared.errors import SemstError

GENE_SEPARATOR = ", "
EMPTY_GENE_TEXT = "none"  # the gene text of a spot without any expressed ranked gene


class PromptError(SemstError, ValueError):
    """A prompt cannot be rendered as asked; the message says why and what to do."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str  # the system message
    user_prefix: str  # the user message is user_prefix + gene text
    description: str


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t for t in (
        PromptTemplate(
            name="semst",
            system=("You are an expert in bioinformatics. Represent the biological state of a cell "
                    "characterized by the following highly expressed genes. Focus on capturing the "
                    "functional essence relevant for spatial domain identification. Output a dense "
                    "vector representation."),
            user_prefix="Highly expressed genes: ",
            description="the paper's instruction (SemST llm_generate_embedding.py)",
        ),
        # The paper's Table-2 control: the same gene symbols, stripped of their biological framing.
        # Written to be neutral: it neither names genes, cells nor biology, nor tells the model to
        # ignore them; it only asks for a representation of a list of character strings. The last
        # sentence is the semst one, so the two prompts differ only in what the list is said to be.
        PromptTemplate(
            name="nonbio",
            system=("Represent the following list of character strings. Treat each item as an "
                    "arbitrary sequence of characters. Output a dense vector representation."),
            user_prefix="Strings: ",
            description="non-biological control: same gene list, framed as arbitrary strings",
        ),
    )
}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise PromptError(f"unknown prompt template {template!r}; "
                          f"known templates: {', '.join(sorted(TEMPLATES))}") from None


def gene_text(genes: Sequence[str]) -> str:
    """The gene part of the user message: symbols joined by ", " in the given order, or "none"."""
    for g in genes:
        if not isinstance(g, str) or not g.strip():
            raise PromptError(f"gene symbols must be non-empty strings, got {g!r} in {list(genes)[:5]}...")
    return GENE_SEPARATOR.join(genes) if len(genes) else EMPTY_GENE_TEXT


def messages(genes: Sequence[str], template: str | PromptTemplate = "semst") -> list[dict[str, str]]:
    """The chat conversation of one spot (before the model's template is applied)."""
    t = get_template(template)
    return [{"role": "system", "content": t.system},
            {"role": "user", "content": t.user_prefix + gene_text(genes)}]


def _apply_template(msgs: list[dict[str, str]], tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PromptError(
            f"the tokenizer of {name} has no chat template, so the SemST prompt cannot be rendered in "
            "the model's own format; use an instruct/chat model (e.g. the default SmolLM2-135M-Instruct "
            "or Qwen/Qwen3-4B), or give the checkpoint a chat_template.jinja")
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # a template that renders to a batch or ids is not one we can key by
        raise PromptError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def render_prompt(genes: Sequence[str], tokenizer, template: str | PromptTemplate = "semst") -> str:
    """The exact prompt text of one spot (its genes most-expressed first) in the model's template."""
    return _apply_template(messages(genes, template), tokenizer)


def render_prompts(gene_lists: Sequence[Sequence[str]], tokenizer,
                   template: str | PromptTemplate = "semst") -> list[str]:
    """Prompts of many spots, in order; equal to ``[render_prompt(g, ...) for g in gene_lists]``.

    Each distinct gene list is rendered once (spots often share one, e.g. all empty spots). The
    template itself is compiled once by transformers, so rendering 100k distinct 20-gene lists takes
    a few seconds.
    """
    t = get_template(template)
    distinct: dict[tuple[str, ...], int] = {}
    index = [distinct.setdefault(tuple(genes), len(distinct)) for genes in gene_lists]
    rendered = [render_prompt(genes, tokenizer, t) for genes in distinct]
    return [rendered[i] for i in index]
