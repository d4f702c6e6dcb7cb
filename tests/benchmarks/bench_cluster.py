"""`make bench-cluster` (`python tests/benchmarks/bench_cluster.py`): seconds per epoch and peak memory of stage 2 at 3k, 10k, 30k and 100k spots.

Each size runs in a fresh subprocess (so peak RSS is that size's own): synthetic negative-binomial
counts over 3000 genes on a square grid, random 576-d semantic vectors (SmolLM2's width), FSM fusion,
the DLPFC config's network sizes, graphs built as in a real run, then ``--epochs`` epochs of
training. Not a test: numbers, not assertions.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_size(n_spots: int, n_genes: int, epochs: int, expr_pcs: int | None = None, seed: int = 0) -> dict:
    import numpy as np
    import scipy.sparse as sp

    from semst.cluster.graphs import expression_graph, spatial_graph
    from semst.cluster.train import train_semst
    from semst.shared.config import load_cluster_config

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_spots].astype(float)
    # Negative-binomial counts, ~8% non-zero like Visium, built sparse row block by row block.
    blocks = []
    for start in range(0, n_spots, 10_000):
        m = min(10_000, n_spots - start)
        dense = rng.negative_binomial(1, 0.93, size=(m, n_genes)).astype(np.float32)
        blocks.append(sp.csr_matrix(dense))
    counts = sp.vstack(blocks).tocsr()
    lib = np.asarray(counts.sum(1)).ravel()
    features = counts.multiply(1.0 / np.maximum(lib, 1)[:, None]).tocsr() * 1e4
    features = np.minimum(features.toarray() / (features.toarray().std(0) + 1e-6), 10).astype(np.float32)
    semantic = rng.normal(size=(n_spots, 576)).astype(np.float32)
    cfg = load_cluster_config("dlpfc-151673", {"epochs": epochs, "fusion": "film", "expr_pcs": expr_pcs})
    t0 = time.perf_counter()
    sg = spatial_graph(coords, k=6)
    fg = expression_graph(features, cfg.expr_k, cfg.expr_pcs)
    graph_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_semst(features, counts, lib / np.median(lib), sg, fg, semantic, cfg, seed, progress=False)
    train_s = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    return {"spots": n_spots, "genes": n_genes, "epochs": epochs, "graph_s": round(graph_s, 1),
            "s_per_epoch": round(train_s / epochs, 2), "peak_gib": round(peak_gib, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="3000,10000,30000,100000")
    ap.add_argument("--genes", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--expr-pcs", type=int, default=None,
                    help="expression kNN on this many SVD components (config expr_pcs); default exact")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one, args.genes, args.epochs, args.expr_pcs)))
        return
    graph = f"expression kNN on {args.expr_pcs} SVD components" if args.expr_pcs else "exact expression kNN"
    print(f"bench-cluster: {args.genes} genes, {args.epochs} epochs each, FSM fusion, {graph}, "
          f"one subprocess per size", flush=True)
    print(f"{'spots':>8}{'graphs s':>10}{'s/epoch':>10}{'peak GiB':>10}")
    for n in (int(s) for s in args.sizes.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--genes", str(args.genes),
                               "--epochs", str(args.epochs)]
                              + (["--expr-pcs", str(args.expr_pcs)] if args.expr_pcs else []),
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{n:>8}  failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['spots']:>8}{r['graph_s']:>10}{r['s_per_epoch']:>10}{r['peak_gib']:>10}", flush=True)


if __name__ == "__main__":
    main()
