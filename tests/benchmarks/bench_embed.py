"""`make bench-embed`: stage-1 speed, measured in one run on the same prompts.

Prints prompts/s on the default model (same prompts, same batch size, after one warm-up batch) for
the vLLM and the transformers backend, each with and without exact prefix reuse (embed/prefix.py:
transformers for MEAN and LAST; vLLM only for LAST, its prefix cache refusing MEAN), the largest
difference of each reuse run from the same backend's whole-prompt vectors, and the time to load
cached embeddings for 100k spots (open the cache, read the spot table, fetch every vector). Not a
test: numbers, not assertions. Pin it for ratios that mean something, e.g.
``OMP_NUM_THREADS=1 taskset -c 1 python tests/benchmarks/bench_embed.py --prompts 256``.
With Ray installed (`--ray on`, or `auto`
by default), `semst embed --ray`'s path with 1 and 2 local vLLM replicas of one CPU thread each on the
same prompts: start-up (Ray + vLLM until the first batch is committed) apart from the steady rate
(prompts committed after the first batch / the time after it).
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
    ap.add_argument("--ray", choices=("auto", "on", "off", "only"), default="auto",
                    help="the Ray section: auto (when ray is installed), on, off, only (skip the rest)")
    ap.add_argument("--ray-prompts", type=int, default=256)
    ap.add_argument("--ray-batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    if args.ray == "only":
        return bench_ray(args)

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
    import importlib.util
    if args.ray == "on" or (args.ray == "auto" and importlib.util.find_spec("ray") is not None):
        bench_ray(args)


def bench_ray(args, replica_counts=(1, 2)) -> None:
    """`semst embed --ray`'s driver loop (token ids to local replicas, each batch committed to a fresh
    cache) with 1 and 2 one-CPU replicas on the same prompts."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from semst.embed import ray_engine
    from semst.embed.backends import MAX_TOKENS, _TokenizingBackend
    from semst.embed.checkpoints import resolve_model
    from semst.shared.cache import EmbeddingCache
    from semst.shared.config import EmbedConfig
    from semst.shared.hashing import prompt_hash

    model_dir = resolve_model(args.model)
    prompts, source = bench_prompts(args.ray_prompts, args.k_genes, AutoTokenizer.from_pretrained(model_dir))
    texts = {prompt_hash(p): p for p in prompts}
    missing = list(texts)
    tokens = _TokenizingBackend(model_dir, "mean", "float32", args.ray_batch_size, MAX_TOKENS)
    ids = tokens.token_ids([texts[h] for h in missing])
    n_tokens = {h: len(seq) for h, seq in zip(missing, ids)}
    rows = []
    for replicas in replica_counts:
        cfg = EmbedConfig(model=str(model_dir), batch_size=args.ray_batch_size, ray_address=ray_engine.LOCAL,
                          workers=replicas)
        arrivals = []

        def stamped(results, arrivals=arrivals):
            for hashes, vectors in results:
                arrivals.append((time.perf_counter(), len(hashes)))
                yield hashes, vectors

        with tempfile.TemporaryDirectory() as tmp:
            cache = EmbeddingCache(Path(tmp) / "c.zarr", create=True)
            t0 = time.perf_counter()
            with ray_engine.ray_session(cfg.ray_address, replicas, log=lambda *a: None) as cluster:
                results = ray_engine.replica_results(cfg, model_dir, tokens.max_tokens, missing, ids, cluster)
                ray_engine.commit_as_they_arrive(cache, tokens.space(), missing, texts, n_tokens, stamped(results))
        (first, _), (last, _) = arrivals[0], arrivals[-1]
        steady = sum(n for _, n in arrivals[1:]) / (last - first) if last > first else float("nan")
        rows.append((replicas, first - t0, steady, len(prompts) / (last - t0)))
    print(f"\nbench-embed, Ray: {len(prompts)} prompts from {source}, batch {args.ray_batch_size}, local Ray, "
          f"vLLM replicas of 1 CPU / 1 thread each, {len(os.sched_getaffinity(0))} cores visible")
    print(f"{'replicas':<10}{'start-up s':>12}{'steady prompts/s':>18}{'overall prompts/s':>19}{'ratio':>8}")
    for replicas, startup, steady, overall in rows:
        print(f"{replicas:<10}{startup:>12.1f}{steady:>18.2f}{overall:>19.2f}{steady / rows[0][2]:>8.2f}")


if __name__ == "__main__":
    main()
