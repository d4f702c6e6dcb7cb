"""`make bench-embed` (gene-level part): what the gene-level semantic space costs, measured in one run.

1. dlpfc-151673 (when on the search path): the distinct genes of its top-k_g lists against its
   distinct per-spot prompts, the LLM time of a sample of each (same backend, batch and threads; the
   total extrapolated from the measured rate), and stage 2's aggregation (weights from the slide,
   then the weighted means) with vectors of the model's width.
2. A synthetic imaging slide of --cells cells x --genes genes (Poisson counts, ~--detected genes per
   cell): the LLM time of its genes (at the rate measured in 1, or of --genes synthetic gene prompts)
   and the aggregation time. Target: under 2 minutes for 1M cells x 500 genes.
Not a test: numbers, not assertions.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llm_rate(prompts: list[str], model_dir, batch_size: int) -> float:
    """Prompts/s of the transformers backend on ``prompts`` (after one warm-up batch)."""
    from semst.embed.backends import load_backend

    backend = load_backend("transformers", str(model_dir), pooling="mean", dtype="float32", batch_size=batch_size)
    backend.embed(prompts[:batch_size])
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        backend.embed(prompts[lo:lo + batch_size])
    return len(prompts) / (time.perf_counter() - t0)


def aggregate(cfg, adata, dim: int) -> tuple[float, float, int]:
    """(seconds for the weights, seconds for the weighted means, genes) with random gene vectors."""
    import numpy as np

    from semst.cluster.gene_space import spot_vectors
    from semst.shared.genes import gene_weight_matrix, normalised_rows

    t0 = time.perf_counter()
    raw, genes = gene_weight_matrix(cfg, adata)
    weights = normalised_rows(raw)
    t1 = time.perf_counter()
    spot_vectors(weights, np.random.default_rng(0).normal(size=(len(genes), dim)).astype(np.float32))
    return t1 - t0, time.perf_counter() - t1, len(genes)


def synthetic_slide(cells: int, genes: int, detected: int, seed: int = 0):
    """Sparse Poisson-like counts: ``detected`` random genes per cell, counts 1 + Poisson(2)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    cols = np.argsort(rng.random((cells, genes), dtype=np.float32), axis=1)[:, :detected].ravel() \
        if cells * genes <= 5e7 else rng.integers(0, genes, size=cells * detected)
    rows = np.repeat(np.arange(cells), detected)
    vals = (1 + rng.poisson(2.0, size=len(rows))).astype(np.float32)
    X = sp.csr_matrix((vals, (rows, cols)), shape=(cells, genes))
    X.sum_duplicates()
    return ad.AnnData(X=X, obs=pd.DataFrame(index=pd.RangeIndex(cells).astype(str)),
                      var=pd.DataFrame(index=[f"GENE{j}" for j in range(genes)]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--sample", type=int, default=64, help="prompts timed per kind (the rest extrapolated)")
    ap.add_argument("--k-genes", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--detected", type=int, default=40)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from semst.embed.checkpoints import resolve_model
    from semst.embed.gene_prompts import render_gene_prompts
    from semst.embed.prompts import render_prompts
    from semst.embed.run import embedding_space, spot_gene_lists
    from semst.shared.config import load_embed_config

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dim = None
    gene_rate = None
    try:
        from semst.shared.datasets import load_dataset
        adata = load_dataset("dlpfc-151673")
    except Exception as exc:  # noqa: BLE001 - the real slide is optional
        print(f"dlpfc-151673: skipped ({type(exc).__name__}: {exc})")
        adata = None
    if adata is not None:
        cfg = load_embed_config("dlpfc-151673", {"k_genes": args.k_genes, "semantic": "gene", "model": args.model})
        dim = embedding_space(model_dir, cfg).dim
        spot_prompts = sorted(set(render_prompts(spot_gene_lists(cfg, adata), tokenizer, cfg.template)))
        w_s, w_m, n_genes = aggregate(cfg, adata, dim)
        from semst.shared.genes import gene_weight_matrix
        gene_prompts = render_gene_prompts(gene_weight_matrix(cfg, adata)[1], tokenizer, cfg)
        spot_rate = llm_rate(spot_prompts[:args.sample], model_dir, args.batch_size)
        gene_rate = llm_rate(gene_prompts[:args.sample], model_dir, args.batch_size)
        print(f"dlpfc-151673 ({adata.n_obs} spots, k_g {args.k_genes}): {len(spot_prompts)} distinct spot prompts, "
              f"{n_genes} distinct genes ({len(spot_prompts) / n_genes:.1f}x fewer LLM calls)")
        print(f"  LLM, transformers, {os.environ['OMP_NUM_THREADS']} thread(s), batch {args.batch_size}: "
              f"spot prompts {spot_rate:.2f}/s -> {len(spot_prompts) / spot_rate:.0f} s; gene prompts "
              f"{gene_rate:.2f}/s -> {n_genes / gene_rate:.0f} s ({(len(spot_prompts) / spot_rate) / (n_genes / gene_rate):.1f}x)")
        print(f"  aggregation: weights {w_s:.2f} s (incl. preprocessing for the HVGs), weighted means {w_m:.3f} s")
    if gene_rate is None:
        cfg = load_embed_config("bench", {"semantic": "gene", "model": args.model})
        dim = embedding_space(model_dir, cfg).dim
        prompts = render_gene_prompts([f"GENE{j}" for j in range(args.sample)], tokenizer, cfg)
        gene_rate = llm_rate(prompts, model_dir, args.batch_size)
    t0 = time.perf_counter()
    slide = synthetic_slide(args.cells, args.genes, args.detected)
    made = time.perf_counter() - t0
    cfg = load_embed_config("bench", {"k_genes": args.k_genes, "semantic": "gene", "genes_from": "all",
                                      "model": args.model})
    w_s, w_m, n_genes = aggregate(cfg, slide, dim)
    llm = args.genes / gene_rate
    print(f"synthetic {args.cells} cells x {args.genes} genes ({slide.X.nnz} counts, built in {made:.1f} s), top-"
          f"{args.k_genes} weights: {n_genes} genes -> LLM {llm:.0f} s at {gene_rate:.2f} gene prompts/s; "
          f"weights {w_s:.1f} s, weighted means {w_m:.1f} s ({dim} wide); total {llm + w_s + w_m:.0f} s "
          f"(target < 120 s)")


if __name__ == "__main__":
    main()
