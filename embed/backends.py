"""Stage-1 backends: prompts -> one float32 vector each. ``BACKENDS`` (at the end) maps a name to its
class; a new backend is one class with the :class:`Backend` protocol and one line there. Besides the two
LLM backends below, ``"sentence"`` is a sentence-transformers encoder (embed.sentence_encoder).

LLM backends: rendered prompts -> pooled final-layer hidden states, one float32 vector each.

Two interchangeable backends compute the same embedding space (tested to agree per prompt); the
default ``"auto"`` takes vLLM where a GPU is and transformers on a CPU (:func:`resolve_backend`):

- ``"vllm"``: vLLM in-process, the model run as a pooling model (``runner="pooling"``,
  ``convert="embed"``) with MEAN or LAST pooling and no normalisation. The fast path on a GPU, and
  the engine of ``--ray``'s replicas.
- ``"transformers"``: ``AutoModel`` (the decoder without its LM head) in padded batches with masked
  mean / last-token pooling over ``last_hidden_state``. The reference, the fallback where vLLM does
  not install, and on a CPU the faster one with prefix reuse for MEAN pooling.

"Final-layer hidden states" are the decoder's output after its final norm: transformers'
``last_hidden_state`` and what vLLM's pooler receives. Vectors are returned raw (not normalised).

Tokenization is done here, once, for both backends: ``tokenizer(text, add_special_tokens=False)``,
and vLLM receives the token ids. The rendered chat text already contains every special token the
model's chat template wants (``<|im_start|>``, or Llama-3's ``<|begin_of_text|>``); letting the
tokenizer add its own would put a second BOS in front for tokenizers that add one (vLLM adds them by
default for text prompts). For SmolLM2 and Qwen, whose tokenizers add nothing, this is token for token
what the SemST authors' ``tokenizer(prompts)`` produced. Prompts longer than ``max_tokens`` are an
error, never silently truncated.

Exact prefix reuse (``prefix_reuse``, on by default; embed/prefix.py): every prompt of a template starts
with the same ~53 tokens, whose hidden states do not depend on what follows. transformers runs them
once per model and template (KV cache + hidden-state sum) and only each prompt's suffix after that,
for MEAN and LAST; vLLM uses its own prefix cache for LAST (it refuses one for MEAN). Same vectors up
to float rounding, same embedding space.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from semst.embed.prefix import (
    PrefixState,
    group_by_prefix,
    pooled_after_prefix,
    right_padded,
    run_prefix,
    template_prefixes,
)
from semst.shared.errors import SemstError

POOLINGS = ("mean", "last")
DTYPES = ("float32", "bfloat16", "float16")
MAX_TOKENS = 2048  # longest prompt accepted (a 20-gene SemST prompt is ~145 SmolLM2 tokens)


class BackendError(SemstError, RuntimeError):
    """A backend cannot be loaded or run as asked; the message says why and what to do."""


class Backend(Protocol):
    """What stage 1 (embed.run.embed_dataset) needs of a backend; a new one is a class with these,
    registered in BACKENDS below.

    The class methods work before any weights load (stage 1 checks everything, and knows what is
    cached, first); the instance, built with ``(model_dir, pooling=, dtype=, batch_size=, max_tokens=)``,
    computes.
    """

    name: str  # its key in BACKENDS: "vllm" | "transformers" | "sentence"
    poolings: tuple[str, ...]  # the poolings it accepts
    dtypes: tuple[str, ...]  # the dtypes it accepts
    prefix_reuse: bool  # the prompts' shared prefix is computed once (embed/prefix.py)
    tokenizer: object  # the HF tokenizer prompts are tokenized with

    @classmethod
    def locate(cls, model: str) -> Path: ...  # the model directory of a model string (checked)

    @classmethod
    def render(cls, gene_lists, model_dir: Path, template: str) -> list[str]: ...  # the prompts it embeds

    @classmethod
    def expected_space(cls, model_dir: Path, cfg): ...  # the EmbeddingSpace, without loading the model

    @classmethod
    def tag(cls, cfg) -> str: ...  # the spot-table tag (shared.cache.embedding_tag)

    @classmethod
    def table_meta(cls, cfg) -> dict: ...  # its own keys in the spot table's metadata

    def space(self): ...  # -> shared.cache.EmbeddingSpace

    def embed(self, prompts: list[str]) -> np.ndarray: ...  # float32 (n, dim)

    def count_tokens(self, prompts: list[str]) -> list[int]: ...


def _text_config(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return getattr(config, "text_config", None) or config


class _TokenizingBackend:
    """What both backends share: the checkpoint, its tokenizer, tokenization, the embedding space."""

    name = ""
    poolings = POOLINGS
    dtypes = DTYPES
    reuses_prefix = True  # takes prefix_reuse= (embed/prefix.py); a backend without it is built without

    @classmethod
    def locate(cls, model: str) -> Path:
        from semst.embed.checkpoints import resolve_model

        return resolve_model(model)

    @classmethod
    def render(cls, gene_lists, model_dir: Path, template: str) -> list[str]:
        """The chat prompts, rendered with the model's own tokenizer (no weights loaded)."""
        from transformers import AutoTokenizer

        from semst.embed.prompts import render_prompts

        return render_prompts(gene_lists, AutoTokenizer.from_pretrained(model_dir), template)

    @classmethod
    def expected_space(cls, model_dir: Path, cfg):
        from semst.embed.run import embedding_space

        return embedding_space(model_dir, cfg)

    @classmethod
    def tag(cls, cfg) -> str:
        from semst.shared.cache import embedding_tag

        return embedding_tag(cfg)

    @classmethod
    def table_meta(cls, cfg) -> dict:
        return {}

    def __init__(self, model_dir: Path, pooling: str, dtype: str, batch_size: int, max_tokens: int):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.pooling = pooling
        self.dtype = dtype
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        config = _text_config(self.model_dir)
        self.dim = int(config.hidden_size)
        # Both backends accept the same prompts: at most what the model has positions for.
        self.max_tokens = min(max_tokens, int(getattr(config, "max_position_embeddings", None) or max_tokens))
        self._space = None

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """The exact token ids each backend runs (see the module docstring on special tokens)."""
        if isinstance(prompts, str):
            raise BackendError("prompts must be a list of strings, got a single string")
        if not prompts:
            return []
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        for text, seq in zip(prompts, ids):
            if not seq:
                raise BackendError(f"prompt {text!r} has no tokens; render prompts with embed.prompts")
            if len(seq) > self.max_tokens:
                raise BackendError(f"a prompt has {len(seq)} tokens, more than max_tokens={self.max_tokens}; "
                                   "use fewer genes (k_genes) or a larger max_tokens")
        return ids

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(seq) for seq in self.token_ids(prompts)]

    def space(self):
        """The cache partition these vectors belong to; identical for both backends."""
        if self._space is None:
            from semst.shared.cache import EmbeddingSpace, model_label
            from semst.shared.hashing import weights_fingerprint

            self._space = EmbeddingSpace(model=model_label(self.model_dir),
                                         weights=weights_fingerprint(self.model_dir),
                                         pooling=self.pooling, dtype=self.dtype, dim=self.dim)
        return self._space

    def embed(self, prompts: list[str]) -> np.ndarray:
        ids = self.token_ids(prompts)
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.asarray(self._embed_ids(ids), dtype=np.float32)
        if out.shape != (len(ids), self.dim):
            raise BackendError(f"{self.name} returned shape {out.shape}, expected {(len(ids), self.dim)}")
        if not np.isfinite(out).all():
            raise BackendError(f"{self.name} produced non-finite hidden states for {self.model_dir.name} "
                               f"in {self.dtype}; try --dtype float32")
        return out

    def _embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_dir.name}, pooling={self.pooling}, dtype={self.dtype}, "
                f"dim={self.dim})")


# --------------------------------------------------------------------------------------------------


def _set_vllm_env() -> None:
    """vLLM in-process on CPU; only where the user has not chosen otherwise. Read at vllm import."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (vLLM's CPU default is larger)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(cores or 1))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO start-up log is pages long
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _guard_llvmlite_against_vllm_scan() -> None:
    """Let vLLM load after numba (which scanpy imports for preprocessing).

    vLLM's Triton dispatcher scans every loaded module and reads ``vars(obj)`` of each attribute.
    llvmlite's library wrapper answers *any* attribute, ``__dict__`` included, with a wrapped C
    function, so the scan fails ("'_lib_fn_wrapper' object has no attribute 'get") as soon as numba
    is loaded. A dunder lookup on a C-library wrapper is never a C function: make it fail normally.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    cls = getattr(ffi, "_lib_wrapper", None)
    if cls is None or getattr(cls, "_semst_dunder_guard", False):
        return
    original = cls.__getattr__

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return original(self, name)

    cls.__getattr__ = __getattr__
    cls._semst_dunder_guard = True


@contextlib.contextmanager
def _thread_control_kept():
    """vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole process once it
    has bound its threads (vllm/v1/worker/cpu_worker.py). In-process (``semst experiment`` embeds,
    then trains) that silently disabled stage 2's thread budget; the real function is put back."""
    import torch

    original = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = original


@contextlib.contextmanager
def _global_random_state_kept():
    import random

    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _vllm_prefix_caching(pooling: str, prefix_reuse: bool) -> dict:
    """vLLM's own prefix cache, where it is exact and hits: LAST pooling only.

    vLLM 0.32 refuses prefix caching with MEAN pooling (a pooled prefill cannot start mid-prompt),
    so MEAN on vLLM always runs whole prompts. For LAST, vLLM's CPU backend finds cached blocks only
    with 32-token blocks (its default of 128 is longer than the ~53 shared tokens; 16 is refused);
    measured bit-identical to runs without it."""
    from vllm.platforms import current_platform

    if not (prefix_reuse and pooling == "last"):
        return {"enable_prefix_caching": False}
    return {"enable_prefix_caching": True, **({"block_size": 32} if current_platform.is_cpu() else {})}


class VLLMBackend(_TokenizingBackend):
    name = "vllm"

    def __init__(self, model_dir: Path, pooling: str = "mean", dtype: str = "float32", batch_size: int = 64,
                 max_tokens: int = MAX_TOKENS, prefix_reuse: bool = True):
        super().__init__(model_dir, pooling, dtype, batch_size, max_tokens)
        self.prefix_reuse = prefix_reuse and pooling == "last"  # see _vllm_prefix_caching
        _set_vllm_env()
        _guard_llvmlite_against_vllm_scan()
        try:
            from vllm import LLM, PoolingParams
            from vllm.config import PoolerConfig
        except Exception as exc:  # ImportError, or a broken install failing at import time
            raise BackendError(f"vLLM cannot be imported ({type(exc).__name__}: {exc}); "
                               "use --backend transformers (same embeddings, slower)") from exc
        try:
            # In-process, vLLM seeds the global random, numpy and torch generators; the caller's
            # random state (e.g. a training run in the same process) is put back afterwards.
            with _global_random_state_kept(), _thread_control_kept():
                self.llm = LLM(
                    model=str(self.model_dir),
                    runner="pooling", convert="embed",  # hidden states out, no sampling
                    pooler_config=PoolerConfig(pooling_type=pooling.upper(), use_activation=False),
                    dtype=dtype,
                    max_model_len=self.max_tokens,  # bounds the KV cache and the batched-token budget
                    max_num_seqs=batch_size,
                    # No graph compilation: start-up in seconds. Measured on 2 CPU cores, torch.compile
                    # costs ~100 s of start-up (even when cached) for ~10% more prompts/s.
                    enforce_eager=True,
                    **_vllm_prefix_caching(pooling, prefix_reuse),
                )
        except Exception as exc:
            raise BackendError(f"vLLM could not load {self.model_dir} ({type(exc).__name__}: {exc}); "
                               "use --backend transformers") from exc
        # Per request as well: normalisation (the embed task's "activation") is off whatever the
        # model's own pooler defaults say.
        self._params = PoolingParams(use_activation=False)

    def _embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.embed([TokensPrompt(prompt_token_ids=seq) for seq in ids],
                                 pooling_params=self._params, use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)


# --------------------------------------------------------------------------------------------------


class TransformersBackend(_TokenizingBackend):
    name = "transformers"

    def __init__(self, model_dir: Path, pooling: str = "mean", dtype: str = "float32", batch_size: int = 64,
                 max_tokens: int = MAX_TOKENS, prefix_reuse: bool = True):
        super().__init__(model_dir, pooling, dtype, batch_size, max_tokens)
        import torch
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(self.model_dir, dtype=getattr(torch, dtype))
        except Exception as exc:
            raise BackendError(f"transformers could not load {self.model_dir} "
                               f"({type(exc).__name__}: {exc})") from exc
        self.model.eval()
        # Exact prefix reuse (embed/prefix.py): the prompt templates' shared leading tokens, found now,
        # and each one's KV cache and hidden-state sum, computed the first time a prompt uses it.
        self._prefixes = template_prefixes(self.tokenizer) if prefix_reuse else []
        self.prefix_reuse = bool(self._prefixes)  # none without a chat template
        self._prefix_states: dict[tuple[int, ...], PrefixState] = {}

    def _embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        import torch

        out = np.empty((len(ids), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for prefix, rows in group_by_prefix(ids, self._prefixes).items():
                seqs = [ids[i] for i in rows]
                out[rows] = self._embed_whole(seqs) if prefix is None else self._embed_after(prefix, seqs)
        return out

    def _embed_whole(self, seqs: list[list[int]]) -> np.ndarray:
        import torch

        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        for rows in self._length_sorted_batches(seqs):
            input_ids, mask, lengths = right_padded([seqs[i] for i in rows])
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            if self.pooling == "mean":
                pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / lengths.unsqueeze(-1)
            else:  # last real token
                pooled = hidden[torch.arange(len(rows)), lengths - 1]
            out[rows] = pooled.numpy()
        return out

    def _embed_after(self, prefix: tuple[int, ...], seqs: list[list[int]]) -> np.ndarray:
        """Prompts that all start with ``prefix``: only their suffixes are run (embed/prefix.py)."""
        if prefix not in self._prefix_states:
            self._prefix_states[prefix] = run_prefix(self.model, prefix)
        state = self._prefix_states[prefix]
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        for rows in self._length_sorted_batches(seqs):
            suffixes = [seqs[i][state.length:] for i in rows]
            out[rows] = pooled_after_prefix(self.model, state, suffixes, self.pooling).numpy()
        return out

    def _length_sorted_batches(self, seqs: list[list[int]]):
        """Row indices in batches of ``batch_size``, similar lengths together: less padding, same
        results (padding is masked out)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]


# --------------------------------------------------------------------------------------------------

from semst.embed.sentence_encoder import SentenceBackend  # noqa: E402 - it imports nothing of this module

# Every backend by name: a new one is one class (the Backend protocol) and one line here.
BACKENDS: dict[str, type] = {cls.name: cls for cls in (VLLMBackend, TransformersBackend, SentenceBackend)}


AUTO = "auto"  # the default: vLLM where a GPU is, transformers with prefix reuse on a CPU (resolve_backend)


def resolve_backend(name: str) -> str:
    """The backend ``name`` stands for: itself, or for "auto" vLLM on a machine with a CUDA GPU and
    transformers on a CPU-only one, where its exact prefix reuse for MEAN pooling (which vLLM refuses)
    makes it the faster of the two (docs/benchmarks.md, "Stage 1 at scale"). Both compute the same
    embedding space, so the choice changes no cache key."""
    if name != AUTO:
        return name
    import torch

    return VLLMBackend.name if torch.cuda.is_available() else TransformersBackend.name


def backend_class(name: str) -> type:
    """The class of backend ``name`` ("auto" resolved); a BackendError naming the choices if there is none."""
    name = resolve_backend(name)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join([AUTO, *BACKENDS])} "
                           "(--backend transformers works wherever PyTorch does)")
    return BACKENDS[name]


def load_backend(name: str, model: str, pooling: str = "mean", dtype: str = "float32", batch_size: int = 64,
                 max_tokens: int = MAX_TOKENS, prefix_reuse: bool = True) -> Backend:
    """Load ``model`` ("default", a checkpoint directory or a cached HF id; a sentence encoder's name
    or directory) into backend ``name`` ("auto": see :func:`resolve_backend`).

    ``prefix_reuse``: compute the prompts' shared leading tokens once (exact; embed/prefix.py) where
    the backend can: transformers for MEAN and LAST, vLLM for LAST. ``backend.prefix_reuse`` says
    whether it is in effect."""
    cls = backend_class(name)
    if pooling not in cls.poolings:
        raise BackendError(f"pooling must be one of {', '.join(cls.poolings)}, got {pooling!r}")
    if dtype not in cls.dtypes:
        raise BackendError(f"dtype must be one of {', '.join(cls.dtypes)}, got {dtype!r}")
    if batch_size < 1:
        raise BackendError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(prefix_reuse, bool):
        raise BackendError(f"prefix_reuse must be True or False, got {prefix_reuse!r}")
    model_dir = cls.locate(model)
    reuse = {"prefix_reuse": prefix_reuse} if getattr(cls, "reuses_prefix", False) else {}
    return cls(model_dir, pooling=pooling, dtype=dtype, batch_size=batch_size, max_tokens=max_tokens, **reuse)
