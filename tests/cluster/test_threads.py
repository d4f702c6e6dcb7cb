"""One thread budget bounds every pool: torch intra- and inter-op, BLAS, OpenMP, numba, DGL."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from semst.shared.threads import resolve_threads

_ONE_THREAD_RUN = """
import json
from semst.shared.threads import apply_thread_budget, pool_sizes
apply_thread_budget({threads})
import numpy as np, scipy.sparse as sp, numba, sklearn.cluster
from semst.cluster.graphs import expression_graph, spatial_graph
from semst.cluster.train import train_semst
from semst.cluster.domains import kmeans_domains
from semst.shared.config import ClusterConfig
rng = np.random.default_rng(0)
coords = rng.uniform(0, 10, size=(80, 2)); x = rng.poisson(2.0, size=(80, 30)).astype(np.float32)
c = ClusterConfig.from_flat(dataset="t", spatial={{"rule": "knn", "k": 4}}, fusion="none", hidden1=16, hidden2=8,
                            epochs=2)
r = train_semst(x, sp.csr_matrix(x), np.ones(80), spatial_graph(coords, k=4), expression_graph(x, 4), None,
                c.model, c.loss, c.train, 0, progress=False)
kmeans_domains(r.latent, 3, 0)
print(json.dumps(pool_sizes()))
"""


def pools_after_a_run(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}  # the budget alone decides
    out = subprocess.run([sys.executable, "-c", _ONE_THREAD_RUN.format(threads=threads)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_under_a_one_thread_budget_every_pool_reports_one_thread():
    sizes = pools_after_a_run(1)
    kinds = {name.split()[0] for name in sizes}
    assert {"torch", "blas", "openmp", "numba", "dgl"} <= kinds, sizes
    assert set(sizes.values()) == {1}, sizes


def test_threads_default_to_omp_num_threads_then_to_the_usable_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3 and resolve_threads(2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads(None) == len(os.sched_getaffinity(0))


def test_a_thread_count_below_one_is_refused():
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        resolve_threads(0)
