"""Time to load cached embeddings for a large slide (used by `make bench-embed`)."""
from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from semst.shared.cache import EmbeddingCache, EmbeddingSpace


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


if __name__ == "__main__":
    r = bench_load()
    print(f"load {r['n_spots']} x {r['dim']} cached embeddings: {r['seconds']:.2f} s (fill {r['fill_seconds']:.1f} s)")
