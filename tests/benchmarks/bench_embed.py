"""`make bench-embed`: stage-1 speed, measured in one run on the same prompts.

Prints prompts/s on the default model (same prompts, same batch size, after one warm-up batch) for
the vLLM and the transformers backend, each with and without exact prefix reuse (embed/prefix.py:
transformers for MEAN and LAST; vLLM only for LAST, its prefix cache refusing MEAN), the largest
difference of each reuse run from the same backend's whole-prompt vectors, and the time to load
cached embeddings for 100k spots (open the cache, read the spot table, fetch every vector). Not a
test: numbers, not assertions. Pin it for ratios that mean something, e.g.
``OMP_NUM_THREADS=1 taskset -c 1 python tests/benchmarks/bench_embed.py --prompts 256``.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_prompts(n: int, k: int, tokenizer) -> list[str]:
    """Prompts of real spots (dlpfc-151673) when the dataset is on the search path, else synthetic."""
    from semst.embed.prompts import render_prompts
    from semst.shared.config import load_embed_config

    try:
        from semst.embed.run import spot_gene_lists
        from semst.shared.datasets import load_dataset

        adata = load_dataset("dlpfc-151673")
        cfg = load_embed_config("dlpfc-151673", {"k_genes": k})
        lists = spot_gene_lists(cfg, adata)[:n]
        source = "dlpfc-151673"
    except Exception as exc:  # any reason the real data is unavailable -> synthetic symbols
        import numpy as np
        rng = np.random.default_rng(0)
        pool = [f"GENE{i}" for i in range(3000)]
        lists = [list(rng.choice(pool, size=k, replace=False)) for _ in range(n)]
        source = f"synthetic ({type(exc).__name__})"
    return render_prompts(lists, tokenizer, "semst"), source


# (backend, pooling, prefix reuse asked for), the ones the issue asks about first.
VARIANTS = [("transformers", "mean", False), ("transformers", "mean", True),
            ("vllm", "mean", False), ("vllm", "last", True), ("vllm", "last", False),
            ("transformers", "last", False), ("transformers", "last", True)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k-genes", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--spots", type=int, default=100_000, help="cached embeddings to load (0: skip)")
    ap.add_argument("--only", nargs="*", metavar="BACKEND[:POOLING]",
                    help="only these backends, e.g. vllm transformers:mean")
    args = ap.parse_args(argv)

    from bench_cache import bench_load  # beside this file
    from transformers import AutoTokenizer

    from semst.embed.backends import load_backend
    from semst.embed.checkpoints import resolve_model

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, source = bench_prompts(args.prompts, args.k_genes, tokenizer)
    n_tokens = None
    rows = []
    whole = {}  # (backend, pooling) -> vectors without reuse, to compare the reuse run with
    for name, pooling, reuse in VARIANTS:
        if args.only and name not in args.only and f"{name}:{pooling}" not in args.only:
            continue
        t0 = time.perf_counter()
        backend = load_backend(name, str(model_dir), pooling=pooling, batch_size=args.batch_size,
                               prefix_reuse=reuse)
        load_s = time.perf_counter() - t0
        if n_tokens is None:
            n_tokens = backend.count_tokens(prompts)
        backend.embed(prompts[: args.batch_size])  # warm-up (graph capture, allocator, the prefix's KV cache)
        t0, cpu0 = time.perf_counter(), time.process_time()
        vectors = np.concatenate([backend.embed(prompts[i:i + args.batch_size])
                                  for i in range(0, len(prompts), args.batch_size)])
        s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        diff = None  # between the runs with and without reuse of one backend and pooling, the second's row
        if (name, pooling) in whole:
            diff = float(np.abs(vectors - whole[name, pooling]).max())
        whole[name, pooling] = vectors
        rows.append((name, pooling, backend.prefix_reuse, load_s, len(prompts) / s, len(prompts) / cpu_s, diff))
        print("row:", *rows[-1], flush=True)  # as it comes: a slow run still shows what it measured
        del backend
        gc.collect()
    load = bench_load(n_spots=args.spots) if args.spots > 0 else None

    print(f"\nbench-embed: {len(prompts)} prompts from {source}, k_g={args.k_genes}, "
          f"{sum(n_tokens) / len(n_tokens):.0f} tokens/prompt on average, model {model_dir.name}, "
          f"batch {args.batch_size}, {os.environ.get('OMP_NUM_THREADS')} threads")
    # prompts per CPU second: on a machine shared with other jobs, a pinned one-thread run's CPU time
    # is what the wall clock would show on an idle core.
    print(f"{'backend':<14}{'pooling':<9}{'reuse':<7}{'load s':>8}{'prompts/s':>12}{'per CPU s':>12}"
          f"{'max |diff|':>12}")
    for name, pooling, reuse, load_s, rate, cpu_rate, diff in rows:
        shown = "" if diff is None else f"{diff:.1e}"
        print(f"{name:<14}{pooling:<9}{'yes' if reuse else 'no':<7}{load_s:>8.1f}{rate:>12.2f}{cpu_rate:>12.2f}"
              f"{shown:>12}")
    if args.spots < 1:
        return
    secs = load["seconds"] if isinstance(load, dict) else load
    print(f"load cached embeddings for {args.spots} spots: {secs:.2f} s")


if __name__ == "__main__":
    main()
