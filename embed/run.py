"""Stage 1 end to end: dataset -> top-k gene prompts -> LLM hidden states -> shared cache.

Everything that can be wrong with the input (dataset, genes, k, model, cache identity) is checked
before the cache is opened for writing, so bad input never touches the cache. Prompts already in the
cache are never computed again: not within a run, not across runs, datasets or k_g settings.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semst.shared.cache import embedding_tag, model_label
from semst.shared.config import EmbedConfig
from semst.shared.hashing import prompt_hash


class EmbedError(RuntimeError):
    """Stage 1 cannot run as asked; the message says why and what to do."""


@dataclass
class EmbedReport:
    dataset: str
    tag: str
    space_id: str
    n_spots: int
    n_prompts: int  # distinct prompts
    n_cached: int
    n_computed: int
    seconds: float
    spot_table: Path


def spot_gene_lists(cfg: EmbedConfig, adata, preprocessed=None) -> list[list[str]]:
    """Top-k_g genes of each spot, in descending raw count or preprocessed value (``gene_ranking``;
    see shared.preprocess.top_k_genes). ``preprocessed``: ``preprocess(adata, cfg.preprocess)`` if
    the caller has it already (several k_g or rankings on one slide), else it is computed here."""
    from semst.shared.preprocess import preprocess, top_k_genes

    if cfg.genes_from != "hvg":
        source = adata
    else:
        source = preprocessed if preprocessed is not None else preprocess(adata, cfg.preprocess)
    return top_k_genes(source, cfg.k_genes, cfg.gene_ranking)


def embedding_space(model_dir: Path, cfg: EmbedConfig):
    """The cache partition these settings write to, computed without loading the model."""
    import json

    from semst.shared.cache import EmbeddingSpace
    from semst.shared.hashing import weights_fingerprint

    model_cfg = json.loads((model_dir / "config.json").read_text())
    dim = model_cfg.get("hidden_size") or model_cfg.get("text_config", {}).get("hidden_size")
    if not dim:
        raise EmbedError(f"{model_dir}/config.json has no hidden_size; is this a causal LM checkpoint?")
    return EmbeddingSpace(model=model_label(cfg.model), weights=weights_fingerprint(model_dir), pooling=cfg.pooling,
                          dtype=cfg.dtype, dim=int(dim))


def embed_dataset(cfg: EmbedConfig, adata=None, max_spots: int | None = None,
                  progress: bool = True, log=print) -> EmbedReport:
    """Fill the cache with the embeddings of every spot of ``cfg.dataset`` and write its spot table."""
    from transformers import AutoTokenizer

    from semst.embed.checkpoints import resolve_model
    from semst.embed.prompts import render_prompts
    from semst.shared.cache import EmbeddingCache
    from semst.shared.datasets import check_slide, load_dataset

    if cfg.semantic == "gene":  # one prompt per gene, not per spot (embed.gene_prompts)
        from semst.embed.gene_prompts import embed_genes
        return embed_genes(cfg, adata, max_spots, progress, log)
    t0 = time.perf_counter()
    # 1. Input: everything checked before the model is loaded or the cache touched.
    if max_spots is not None and max_spots < 1:
        raise EmbedError(f"--max-spots must be >= 1, got {max_spots}")
    if adata is None:
        adata = load_dataset(cfg.dataset)
    # Prompts from "all" genes never run the preprocessing, so only the slide itself is checked then.
    check_slide(adata, cfg.dataset, cfg.preprocess if cfg.genes_from == "hvg" else None)
    # Genes are chosen on the whole slide (gene filter and HVGs depend on all spots), so the
    # prompts of a --max-spots run are exactly those of a full run and stay in the cache for it.
    gene_lists = spot_gene_lists(cfg, adata)
    if max_spots is not None:
        adata = adata[:max_spots]
        gene_lists = gene_lists[:max_spots]
    # The model is only looked up here (a bad --model must not leave a new empty cache behind); the
    # cache is opened (refused if it is not a semst cache) and its writability checked before the
    # tokenizer or any weights load: a read-only cache is not found after the first batch.
    model_dir = resolve_model(cfg.model)
    cache = EmbeddingCache(cfg.cache, create=True)
    cache.check_writable()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = render_prompts(gene_lists, tokenizer, cfg.template)
    spot_hashes = [prompt_hash(p) for p in prompts]
    unique: dict[str, str] = {}
    for h, p in zip(spot_hashes, prompts):
        unique.setdefault(h, p)
    space = embedding_space(model_dir, cfg)
    tag = embedding_tag(cfg)

    # 2. What is missing (the cache refuses a space of another identity here).
    hashes = list(unique)
    missing = [h for h, present in zip(hashes, cache.contains(space, hashes)) if not present]
    log(f"{cfg.dataset}: {len(adata)} spots, {len(hashes)} distinct prompts: "
        f"{len(hashes) - len(missing)} cached, {len(missing)} to compute ({space.model}, {space.pooling})")

    # 3. Compute only what is missing, committing every batch (a killed run keeps its batches).
    n_computed = 0
    if missing:
        n_computed = _compute_missing(cfg, model_dir, space, cache, missing, unique, progress, log)

    table = cache.write_spot_table(cfg.dataset, tag, list(adata.obs_names), spot_hashes, {
        "dataset": cfg.dataset, "tag": tag, "space": dataclasses.asdict(space), "space_id": space.space_id,
        "model": cfg.model, "model_dir": str(model_dir), "k_genes": cfg.k_genes, "template": cfg.template,
        "genes_from": cfg.genes_from, "gene_ranking": cfg.gene_ranking, "pooling": cfg.pooling, "n_spots": len(adata),
        "n_empty_spots": sum(1 for g in gene_lists if not g)})
    seconds = time.perf_counter() - t0
    n_cached = len(hashes) - n_computed  # including rows another run committed meanwhile
    by_others = len(missing) - n_computed
    meanwhile = f"{by_others} of them committed meanwhile by another run; " if by_others else ""
    log(f"{len(hashes)} prompts: {n_cached} cached, {n_computed} computed "
        f"({meanwhile}spot table {tag}, {seconds:.1f} s)")
    return EmbedReport(cfg.dataset, tag, space.space_id, len(adata), len(hashes), n_cached, n_computed,
                       seconds, table)


def _compute_missing(cfg, model_dir, space, cache, missing, unique, progress, log) -> int:
    """Embed and commit ``missing`` batch by batch; how many rows this run committed.

    Ctrl-C / SIGTERM (under the CLI, see semst.shared.interrupt): a first signal stops at the end of
    the batch in progress, once its rows are committed; a second stops at once, losing only that
    batch. A commit itself is never cut. Either way the cache stays valid and a rerun computes the rest.
    """
    from tqdm import tqdm

    from semst.embed.backends import load_backend
    from semst.shared import interrupt

    backend = load_backend(cfg.backend, str(model_dir), pooling=cfg.pooling, dtype=cfg.dtype,
                           batch_size=cfg.batch_size)
    # The label is ours (derived from the model string); everything else must agree exactly.
    got = backend.space()
    if (got.weights, got.pooling, got.dtype, got.dim) != (space.weights, space.pooling, space.dtype, space.dim):
        raise EmbedError(f"backend reports embedding space {got} but the cache key was computed as "
                         f"{space}; refusing to mix them")
    computed = 0
    bar = tqdm(total=len(missing), unit="prompt", desc="embedding", disable=not progress)
    try:
        with interrupt.at_boundaries():
            for start in range(0, len(missing), cfg.batch_size):
                batch = missing[start:start + cfg.batch_size]
                # Another run on the same cache may have committed some of these meanwhile.
                batch = [h for h, present in zip(batch, cache.contains(space, batch)) if not present]
                if batch:
                    texts = [unique[h] for h in batch]
                    vectors = np.asarray(backend.embed(texts), dtype=np.float32)
                    with interrupt.critical():
                        # add() skips rows another run committed while these were computed: count
                        # only what this run appended.
                        computed += cache.add(space, batch, vectors, texts, backend.count_tokens(texts))
                bar.update(len(missing[start:start + cfg.batch_size]))
                interrupt.check()
    except interrupt.Interrupted as stop:
        stop.detail = _stopped_note(cache, space, missing, computed)
        raise
    finally:
        bar.close()
    return computed


def _stopped_note(cache, space, missing, computed: int) -> str:
    """What an interrupted run kept and what is left, for the one-line message."""
    try:
        left = int((~cache.contains(space, missing)).sum())
    except Exception:  # noqa: BLE001 - the note must not hide the interruption
        left = None
    rest = f", {left} of {len(missing)} still to compute" if left is not None else ""
    return (f"{computed} prompts embedded and committed by this run{rest}; the cache is valid, "
            f"run the same command again to finish")
