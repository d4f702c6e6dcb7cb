"""Exact prefix reuse: the leading tokens every prompt shares are run through the LLM once.

All SemST prompts of one model and template begin with the same tokens (the chat header, the system
instruction and the user prefix: 53 of ~147 SmolLM2 tokens on dlpfc-151673). In a causal LM the hidden
states and keys/values of those tokens depend on nothing after them, so they are the same in every
prompt. The transformers backend runs them once, keeps their KV cache and the sum of their final-layer
hidden states, and runs only each prompt's suffix on top:

- MEAN = (prefix sum + suffix sum) / (prefix length + suffix length),
- LAST = the hidden state of the suffix's last token,

equal to the whole prompt's up to float rounding (tests/embed/test_prefix.py).

The shared prefix is the longest common token prefix of *full* tokenizations of the template rendered
with different gene lists, not the tokenized instruction: the instruction's trailing space merges into
the first gene token. It is found once per tokenizer for every template in ``embed.prompts.TEMPLATES``.
Each prompt is checked: one whose ids do not start with a known prefix (another template, a custom
prompt) is computed whole, so reuse can change speed but never which tokens a vector is pooled over.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

# Gene lists the templates are rendered with to find what all their prompts share: different first
# characters (letter case, a digit) and the empty list, whose gene text is "none".
PROBE_GENE_LISTS = (["MBP", "PLP1"], ["Gfap"], ["7SK"], [])


def common_prefix(seqs: list[list[int]]) -> list[int]:
    """The longest list of leading ids every sequence shares."""
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return list(first[:i])
    return list(first[:n])


def template_prefixes(tokenizer) -> list[tuple[int, ...]]:
    """The shared token prefix of each prompt template in this tokenizer, longest first.

    Empty when the tokenizer has no chat template (no SemST prompt can be rendered for it then)."""
    from semst.embed.prompts import TEMPLATES, PromptError, render_prompt

    prefixes = set()
    for template in TEMPLATES.values():
        try:
            texts = [render_prompt(genes, tokenizer, template) for genes in PROBE_GENE_LISTS]
        except PromptError:
            continue
        prefix = common_prefix(tokenizer(texts, add_special_tokens=False)["input_ids"])
        if prefix:
            prefixes.add(tuple(prefix))
    return sorted(prefixes, key=len, reverse=True)


def group_by_prefix(ids: list[list[int]], prefixes: list[tuple[int, ...]]) -> dict[tuple[int, ...] | None, list[int]]:
    """Rows of ``ids`` by the longest prefix each starts with (and has at least one token after);
    ``None``: the rows that start with none of them, to be computed whole."""
    groups: dict[tuple[int, ...] | None, list[int]] = {}
    for row, seq in enumerate(ids):
        match = next((p for p in prefixes if len(seq) > len(p) and tuple(seq[:len(p)]) == p), None)
        groups.setdefault(match, []).append(row)
    return groups


@dataclass
class PrefixState:
    """One prefix run through the model: its length, KV cache (batch 1) and final-layer hidden sum."""

    length: int
    cache: object  # transformers Cache
    hidden_sum: object  # float32 tensor (hidden,)

    def cache_for(self, batch: int):
        """A copy of the KV cache for ``batch`` rows; the model appends the suffixes' keys to it."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache


def run_prefix(model, prefix: tuple[int, ...]) -> PrefixState:
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix]), use_cache=True)
    hidden = out.last_hidden_state[0].float()
    return PrefixState(length=len(prefix), cache=out.past_key_values, hidden_sum=hidden.sum(dim=0))


def right_padded(seqs: list[list[int]]):
    """(input ids, attention mask, lengths) of ``seqs`` padded on the right with id 0.

    Right padding keeps every real token at positions 0..n-1 (after a prefix: after it), and the
    causal mask keeps real tokens from seeing the pads after them; the pad id is never attended to."""
    import torch

    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        input_ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
    return input_ids, mask, lengths


def pooled_after_prefix(model, state: PrefixState, suffixes: list[list[int]], pooling: str):
    """Pooled final-layer hidden states of prefix + each suffix (one batch), the prefix not rerun."""
    import torch

    input_ids, mask, lengths = right_padded(suffixes)
    rows, width = input_ids.shape
    full_mask = torch.cat([torch.ones((rows, state.length), dtype=torch.long), mask], dim=1)
    positions = torch.arange(state.length, state.length + width).expand(rows, -1)
    hidden = model(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                   past_key_values=state.cache_for(rows), use_cache=True).last_hidden_state.float()
    if pooling == "mean":
        suffix_sum = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        return (state.hidden_sum + suffix_sum) / (state.length + lengths).unsqueeze(-1)
    return hidden[torch.arange(rows), lengths - 1]  # last real token
