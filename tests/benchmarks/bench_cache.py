"""Cache speed. ``bench_scaling`` (``--scaling``): the cost of one embed commit (``contains`` + ``add`` of
one block) as the cache grows, first vs last commits, and looking up every hash from a fresh reader, at
10k / 100k / 1M rows; with ``--old`` the same for the cache module of commit 9f0458c (before the
incremental index), in the same run. ``bench_load``: time to load cached embeddings for a large slide (used by `make
bench-embed`). Run as a script: what the row checksums cost on a synthetic cache of 1M rows x 576
float32 (SmolLM2's width) committed in batches of 10k -- seconds to commit (and the part of it spent
computing checksums), to ``get`` every row with and without checking them, and to ``verify``.

    taskset -c 1 python tests/benchmarks/bench_cache.py [--rows 1000000 --dim 576 --batch 10000 --dir DIR]
    taskset -c 1 python tests/benchmarks/bench_cache.py --scaling 10000 100000 [--commit 1000] [--old]

Not a test: numbers, not assertions (the store needs ~2.3 GB of disk and ~5 GB of memory for 1M rows).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from semst.shared.cache import EmbeddingCache, EmbeddingSpace, row_checksums


def bench_load(n_spots: int = 100_000, dim: int = 576, path: str | Path | None = None) -> dict:
    """Fill a temporary cache with ``n_spots`` distinct vectors and a spot table, then time what
    stage 2 does cold: open the cache, read the spot table, fetch every spot's vector."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(path) if path else Path(tmp) / "bench.zarr"
        space = EmbeddingSpace(model="bench", weights="0" * 64, pooling="mean", dtype="float32", dim=dim)
        hashes = [hashlib.sha256(f"bench prompt {i}".encode()).hexdigest() for i in range(n_spots)]
        rng = np.random.default_rng(0)
        cache = EmbeddingCache(store)
        t0 = time.perf_counter()
        for start in range(0, n_spots, 20_000):
            part = hashes[start:start + 20_000]
            cache.add(space, part, rng.normal(size=(len(part), dim)).astype(np.float32),
                      [f"bench prompt {start + i}" for i in range(len(part))], [85] * len(part))
        fill = time.perf_counter() - t0
        cache.write_spot_table("bench", "bench", [f"spot{i}" for i in range(n_spots)], hashes,
                               {"space_id": space.space_id})
        t0 = time.perf_counter()
        cold = EmbeddingCache(store, create=False)
        table, _ = cold.read_spot_table("bench", "bench")
        vectors = cold.get(space, table["prompt_hash"].tolist())
        seconds = time.perf_counter() - t0
        assert vectors.shape == (n_spots, dim)
        return {"n_spots": n_spots, "dim": dim, "seconds": seconds, "fill_seconds": fill}


def bench_checksums(n_rows: int = 1_000_000, dim: int = 576, batch: int = 10_000,
                    directory: str | Path | None = None, log=print) -> dict:
    """Commit ``n_rows`` random rows in batches, then time reading them all back and verifying."""
    space = EmbeddingSpace(model="bench", weights="0" * 64, pooling="mean", dtype="float32", dim=dim)
    hashes = [hashlib.sha256(f"bench prompt {i}".encode()).hexdigest() for i in range(n_rows)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cache = EmbeddingCache(Path(tmp) / "bench.zarr")
        commit = hashing = commit_cpu = 0.0
        for start in range(0, n_rows, batch):
            part = hashes[start:start + batch]
            vectors = rng.normal(size=(len(part), dim)).astype(np.float32)
            t0 = time.perf_counter()
            row_checksums(vectors)  # the same digests add() computes, timed on their own
            hashing += time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            cache.add(space, part, vectors, [f"bench prompt {start + i}" for i in range(len(part))], [85] * len(part))
            commit += time.perf_counter() - t0
            commit_cpu += time.process_time() - c0
        log(f"committed {n_rows} x {dim} in batches of {batch}: {commit:.1f} s ({commit_cpu:.1f} s CPU), "
            f"of which computing checksums {hashing:.1f} s")
        out = {"rows": n_rows, "dim": dim, "batch": batch, "commit_s": commit, "commit_cpu_s": commit_cpu,
               "checksum_s": hashing}
        for check in (False, True):
            cold = EmbeddingCache(cache.path, create=False)  # a fresh reader: index read included
            t0, c0 = time.perf_counter(), time.process_time()
            got = cold.get(space, hashes, check=check)
            name = f"get_{'checked' if check else 'unchecked'}"
            out[f"{name}_s"], out[f"{name}_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            assert got.shape == (n_rows, dim)
            del got
            log(f"get all rows {'with' if check else 'without'} checksum verification: {out[f'{name}_s']:.1f} s "
                f"({out[f'{name}_cpu_s']:.1f} s CPU)")
        t0, c0 = time.perf_counter(), time.process_time()
        problems = EmbeddingCache(cache.path, create=False).verify()
        out["verify_s"], out["verify_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        assert problems == [], problems
        log(f"verify: {out['verify_s']:.1f} s ({out['verify_cpu_s']:.1f} s CPU)")
        out["bytes"] = sum(p.stat().st_size for p in cache.path.rglob("*") if p.is_file())
        return out


OLD_COMMIT = "9f0458c"  # the last commit whose index was re-read whole whenever a part appeared


def old_cache_module(directory: str | Path):
    """The cache module of OLD_COMMIT, imported from a temporary file (it reads the same format)."""
    repo = Path(__file__).resolve().parents[2]
    source = subprocess.run(["git", "-C", str(repo), "show", f"{OLD_COMMIT}:shared/cache.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(directory) / "old_semst_cache.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_semst_cache", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench_scaling(n_rows: int, commit: int = 1000, dim: int = 576, module=None, directory=None,
                  n_edge: int = 5, log=print) -> dict:
    """Fill a cache with ``n_rows`` synthetic rows in commits of ``commit`` rows, each preceded by the
    ``contains`` of its hashes (what `semst embed` does per block); the seconds of the first and last
    ``n_edge`` commits (mean), the median and the slowest; then a fresh reader's ``contains`` of every
    hash (index read included), the same again warm, and ``get`` of 10k random hashes."""
    import semst.shared.cache as new_module

    module = module or new_module
    space = module.EmbeddingSpace(model="bench", weights="0" * 64, pooling="mean", dtype="float32", dim=dim)
    hashes = [hashlib.sha256(f"bench prompt {i}".encode()).hexdigest() for i in range(n_rows)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cache = module.EmbeddingCache(Path(tmp) / "bench.zarr")
        times = []
        for start in range(0, n_rows, commit):
            part = hashes[start:start + commit]
            vectors = rng.normal(size=(len(part), dim)).astype(np.float32)
            prompts = [f"bench prompt {start + i}" for i in range(len(part))]
            t0 = time.perf_counter()
            todo = ~cache.contains(space, part)
            assert todo.all()
            cache.add(space, part, vectors, prompts, [85] * len(part))
            times.append(time.perf_counter() - t0)
        times = np.asarray(times)
        first, last = float(times[:n_edge].mean()), float(times[-n_edge:].mean())
        out = {"rows": n_rows, "commit": commit, "commits": len(times), "first_s": first, "last_s": last,
               "last_over_first": last / first, "median_s": float(np.median(times)), "max_s": float(times.max()),
               "fill_s": float(times.sum()),
               "parts": len(list((cache.path / "index" / space.space_id).glob("part-*.parquet")))}
        reader = module.EmbeddingCache(cache.path, create=False)
        t0 = time.perf_counter()
        assert reader.contains(space, hashes).all()
        out["lookup_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reader.contains(space, hashes)
        out["lookup_warm_s"] = time.perf_counter() - t0
        sample = [hashes[i] for i in rng.choice(n_rows, size=min(10_000, n_rows), replace=False)]
        t0 = time.perf_counter()
        reader.get(space, sample)
        out["get_10k_s"] = time.perf_counter() - t0
        log(f"{n_rows} rows in {len(times)} commits of {commit}: commit first {first * 1e3:.0f} ms, last "
            f"{last * 1e3:.0f} ms (x{last / first:.2f}), median {out['median_s'] * 1e3:.0f} ms, slowest "
            f"{out['max_s'] * 1e3:.0f} ms, fill {out['fill_s']:.1f} s, {out['parts']} index parts; lookup of "
            f"{n_rows} hashes cold {out['lookup_cold_s']:.2f} s, warm {out['lookup_warm_s']:.2f} s; get 10k "
            f"{out['get_10k_s']:.2f} s")
        return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--dir", default=None, help="where the temporary store goes (default: the system's temp dir)")
    ap.add_argument("--load", action="store_true", help="instead: the 100k-spot load time of `make bench-embed`")
    ap.add_argument("--scaling", type=int, nargs="+", default=None, metavar="ROWS",
                    help="instead: commit and lookup time as the cache grows to each ROWS")
    ap.add_argument("--commit", type=int, default=1000, help="rows per commit for --scaling")
    ap.add_argument("--old", action="store_true", help=f"--scaling for the cache module of {OLD_COMMIT} too")
    args = ap.parse_args()
    if args.scaling:
        with tempfile.TemporaryDirectory() as module_dir:
            modules = {"new": None, **({"old": old_cache_module(module_dir)} if args.old else {})}
            for n in args.scaling:
                for name, module in modules.items():
                    print(f"[{name}] ", end="")
                    bench_scaling(n, args.commit, args.dim, module, args.dir)
    elif args.load:
        r = bench_load()
        print(f"load {r['n_spots']} x {r['dim']} cached embeddings: {r['seconds']:.2f} s (fill {r['fill_seconds']:.1f} s)")
    else:
        r = bench_checksums(args.rows, args.dim, args.batch, args.dir)
        print(f"store: {r['bytes'] / 1e9:.2f} GB")
