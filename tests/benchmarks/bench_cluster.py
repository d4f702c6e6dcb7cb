"""`make bench-cluster`: stage-2 speed and memory, measured, never asserted.

Parts (``--parts``, default all):

- ``dlpfc``: seconds per epoch on dlpfc-151673 (3639 spots x 3000 genes, FSM on random 576-d
  vectors) on one pinned core and on two, for this checkout **and** for ``--baseline`` (a git
  revision, default the commit before the stage-2 speed work) checked out with ``git worktree`` in a
  temporary folder, measured in the same run, one subprocess each, so the ratio compares like with
  like. Also user and system CPU time per epoch (system time = allocation churn) and the per-part
  profile of one epoch (this checkout).
- ``sizes``: synthetic negative-binomial counts x 3000 genes on a grid (``--sizes``), ``--size-epochs``
  each after a one-epoch warm-up on 2000 spots, one subprocess per size (and per code with
  ``--sizes-baseline``): graph seconds, the training's one-off set-up, seconds per epoch after it, per part, peak RSS.
- ``million``: 1M cells x 500 genes, imaging-like (irregular positions, 8-nearest spatial graph,
  sparse counts, ten spatial domains): one training epoch (time, peak RSS), then a whole
  ``semst cluster`` on it (``--million-epochs``, fusion none, 10 domains), end to end, outputs written.
  ``million-cluster``: only that whole run (its log says the seconds per epoch).

Every subprocess gets one thread per core it is pinned to (``taskset``) and ``--threads`` to match.
Timings taken while other jobs run are not comparable: run on an idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINE = "983362f"  # the commit before the stage-2 speed work (issue 8)

_EPOCH_TIMER = r"""
import inspect, json, resource, sys, time
import numpy as np
threads = {threads}
try:
    from semst.shared.threads import apply_thread_budget
    apply_thread_budget(threads)
except ImportError:  # a revision without the thread budget
    import torch; torch.set_num_threads(threads)
from semst.shared.config import load_cluster_config
from semst.shared.datasets import load_dataset
from semst.shared.preprocess import preprocess
from semst.cluster.graphs import expression_graph
from semst.cluster.train import train_semst
cfg = load_cluster_config("dlpfc-151673", {{"fusion": "film", "epochs": {epochs}}})
a = load_dataset("dlpfc-151673")
prep = preprocess(a, cfg.preprocess)
try:
    from semst.cluster.spatial import spatial_rule
    sg = spatial_rule(cfg).build(np.asarray(a.obsm["spatial"], float))
except ImportError:  # a revision before the spatial-graph rules
    from semst.cluster.seeds import slide_spatial_graph
    sg = slide_spatial_graph(cfg, np.asarray(a.obsm["spatial"], float))
fg = expression_graph(prep.X, cfg.expr_k, cfg.expr_pcs)
sem = np.random.default_rng(0).normal(size=(a.n_obs, 576)).astype(np.float32)
kw = {{"coords": a.obsm["spatial"]}} if "coords" in inspect.signature(train_semst).parameters else {{}}
args = (prep.X, prep.layers["counts"], prep.obs["size_factor"].to_numpy(), sg, fg, sem)
import dataclasses
# the config's sections (train_semst(model_cfg, loss_cfg, train_cfg, ...)) or, at older commits, the whole config
sections = lambda c: (c.model, c.loss, c.train) if "train_cfg" in inspect.signature(train_semst).parameters else (c,)
changed = lambda c, **kw: c.replace(**kw) if hasattr(c, "replace") else dataclasses.replace(c, **kw)
train_semst(*args, *sections(changed(cfg, epochs=1)), 0, progress=False, **kw)  # warm-up
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
result = train_semst(*args, *sections(cfg), 0, progress=False, **kw)
wall = time.perf_counter() - t0; r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"s_per_epoch": wall / cfg.epochs, "user": (r1.ru_utime - r0.ru_utime) / cfg.epochs,
                  "sys": (r1.ru_stime - r0.ru_stime) / cfg.epochs, "peak_gib": r1.ru_maxrss / 2**20,
                  "parts": {{k: v / cfg.epochs for k, v in getattr(result, "seconds", {{}}).items() if k != "graphs"}}}}))
"""


def _run_python(code: str, cores: str, pythonpath: str | None = None, cwd: Path = REPO) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cores.split(",")))}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(["taskset", "-c", cores, sys.executable, "-c", code], env=env, cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else str(done.returncode))
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _worktree(revision: str):
    """``revision`` checked out in a temporary git worktree; yields a PYTHONPATH that imports it as semst."""
    tmp = Path(tempfile.mkdtemp(prefix="semst-bench-"))
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tmp / "semst"), revision],
                       check=True)
        yield str(tmp)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "semst")], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_dlpfc(baseline: str, epochs: int, core_sets: tuple[str, ...] = ("0", "0,1")) -> None:
    """This checkout vs ``baseline`` on dlpfc-151673, one pinned core and two, in one run."""
    this = Path(tempfile.mkdtemp(prefix="semst-bench-this-"))  # `import semst` -> this checkout, whatever is installed
    (this / "semst").symlink_to(REPO)
    try:
        with _worktree(baseline) as old:
            print(f"dlpfc-151673, {epochs} epochs after a 1-epoch warm-up, FSM on random 576-d vectors; "
                  f"baseline {baseline} from a git worktree", flush=True)
            print(f"{'code':>10}{'cores':>7}{'s/epoch':>9}{'user s':>8}{'sys s':>7}{'sys %':>7}{'GiB':>6}")
            rows = {}
            for cores in core_sets:
                for name, pythonpath in (("baseline", old), ("this", str(this))):
                    code = _EPOCH_TIMER.format(threads=len(cores.split(",")), epochs=epochs)
                    r = _run_python(code, cores, pythonpath)
                    rows[name, cores] = r
                    print(f"{name:>10}{cores:>7}{r['s_per_epoch']:>9.3f}{r['user']:>8.3f}{r['sys']:>7.3f}"
                          f"{100 * r['sys'] / r['s_per_epoch']:>6.1f}%{r['peak_gib']:>6.2f}", flush=True)
        for cores in core_sets:
            print(f"speed-up on {len(cores.split(','))} core(s): "
                  f"{rows['baseline', cores]['s_per_epoch'] / rows['this', cores]['s_per_epoch']:.2f}x")
        print(f"per-part seconds per epoch (this checkout, cores {core_sets[0]}): " + ", ".join(
            f"{k} {v:.3f}" for k, v in rows["this", core_sets[0]]["parts"].items()))
    finally:
        shutil.rmtree(this, ignore_errors=True)


def synthetic_slide(n_spots: int, n_genes: int, seed: int = 0, irregular: bool = False, n_domains: int = 10):
    """Counts with ``n_domains`` spatial domains (Voronoi regions of random centres), CSR, built in
    blocks; grid positions (Visium-like) or uniform random ones (imaging-like)."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    if irregular:
        coords = rng.uniform(0, side, size=(n_spots, 2))
    else:
        coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_spots].astype(float)
    centres = rng.uniform(0, side, size=(n_domains, 2))
    from scipy.spatial import cKDTree

    domain = cKDTree(centres).query(coords)[1]
    # per-domain mean expression: a shared profile times domain-specific fold changes; ~5-10% non-zero
    base = rng.gamma(0.3, 0.3, size=n_genes)
    fold = np.exp(rng.normal(0, 0.7, size=(n_domains, n_genes)))
    blocks = []
    for start in range(0, n_spots, 20_000):
        d = domain[start:start + 20_000]
        mean = base[None, :] * fold[d]
        p = 1.0 / (1.0 + mean)  # NB with r = 1 (geometric) and this mean
        blocks.append(sp.csr_matrix(rng.negative_binomial(1, p).astype(np.float32)))
    return coords, sp.vstack(blocks).tocsr(), domain


_SIZE = r"""
import json, resource, time
import numpy as np
from semst.shared.threads import apply_thread_budget
apply_thread_budget({threads})
import sys; sys.path.insert(0, {bench_dir!r})
from bench_cluster import synthetic_slide
from semst.cluster.graphs import expression_graph, spatial_graph
from semst.cluster.train import train_semst
from semst.shared.config import load_cluster_config
coords, counts, _ = synthetic_slide({n}, {genes}, irregular={irregular})
lib = np.asarray(counts.sum(1)).ravel(); lib = np.maximum(lib, 1)
norm = counts.multiply(1e4 / lib[:, None]).tocsr()
sd = np.sqrt(np.asarray(norm.multiply(norm).mean(0)).ravel() - np.asarray(norm.mean(0)).ravel() ** 2)
features = norm.multiply(1.0 / np.maximum(sd, 1e-6)[None, :]).tocsr(); features.data = np.minimum(features.data, 10)
features = features.toarray().astype(np.float32)
cfg = load_cluster_config("dlpfc-151673", {{"epochs": {epochs}, "fusion": "{fusion}", "spatial_k": {spatial_k},
                                            "minibatch": "{minibatch}"}})
t0 = time.perf_counter()
sg = spatial_graph(coords, k={spatial_k}); fg = expression_graph(features, cfg.expr_k, {expr_pcs}, progress=True)
graph_s = time.perf_counter() - t0
graphs_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # data + graphs (incl. the kNN search)
sem = None if "{fusion}" == "none" else np.random.default_rng(0).normal(size=({n}, 576)).astype(np.float32)
import dataclasses, inspect
# revisions before the blockwise mini-batch (the baseline of a comparison) cut batches by coordinates
at = (lambda rows: {{"coords": coords[rows]}}) if "coords" in inspect.signature(train_semst).parameters else (lambda rows: {{}})
# the config's sections (train_semst(model_cfg, loss_cfg, train_cfg, ...)) or, at older commits, the whole config
sections = lambda c: (c.model, c.loss, c.train) if "train_cfg" in inspect.signature(train_semst).parameters else (c,)
changed = lambda c, **kw: c.replace(**kw) if hasattr(c, "replace") else dataclasses.replace(c, **kw)
w = 2000  # warm-up epoch on the first spots: one-off costs (compiling kernels, thread pools) not in the timing
train_semst(features[:w], counts[:w], lib[:w] / np.median(lib), spatial_graph(coords[:w], k={spatial_k}),
            expression_graph(features[:w], cfg.expr_k, {expr_pcs}), None if sem is None else sem[:w],
            *sections(changed(cfg, epochs=1, minibatch="off")), 0, progress=False, **at(slice(0, w)))
t0 = time.perf_counter()
r = train_semst(features, counts, lib / np.median(lib), sg, fg, sem, *sections(cfg), 0, progress=True,
                **at(slice(None)))
train_s = time.perf_counter() - t0
setup_s = r.seconds["graphs"]  # train_semst's one-off set-up (counts, CSR input, index tensors)
print(json.dumps({{"spots": {n}, "graph_s": round(graph_s, 1), "s_per_epoch": round((train_s - setup_s) / {epochs}, 2),
                  "setup_s": round(setup_s, 1), "mode": r.mode,
                  "parts": {{k: round(v / {epochs}, 2) for k, v in r.seconds.items() if k != "graphs"}},
                  "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "graphs_peak_gib": round(graphs_peak, 2)}}))
"""


def bench_sizes(sizes: list[int], genes: int, epochs: int, cores: str, irregular: bool = False,
                fusion: str = "film", spatial_k: int = 6, minibatch: str = "auto", expr_pcs: int | None = None,
                baseline: str | None = None) -> None:
    """One subprocess per size; with ``baseline`` (a git revision) also that revision's code, from a
    temporary git worktree, right before this checkout's, so the two rows compare like with like."""
    if baseline:
        with _worktree(baseline) as pythonpath:
            _bench_sizes(sizes, genes, epochs, cores, irregular, fusion, spatial_k, minibatch, expr_pcs,
                         [(baseline, pythonpath), ("this", None)])
    else:
        _bench_sizes(sizes, genes, epochs, cores, irregular, fusion, spatial_k, minibatch, expr_pcs, [("this", None)])


def _bench_sizes(sizes, genes, epochs, cores, irregular, fusion, spatial_k, minibatch, expr_pcs, codes) -> None:
    print(f"synthetic NB counts x {genes} genes ({'irregular' if irregular else 'grid'} positions, "
          f"{spatial_k}-nearest spatial graph, expression kNN on "
          f"{f'{expr_pcs} SVD components' if expr_pcs else 'all genes'}), fusion {fusion}, {epochs} epoch(s), "
          f"cores {cores}", flush=True)
    print(f"{'code':>10}{'spots':>9}{'graphs s':>10}{'set-up s':>10}{'s/epoch':>9}{'peak GiB':>10}  mode; seconds per "
          "epoch by part; peak GiB before training  (s/epoch: the training after its set-up, with the final "
          "whole-slide latent, per epoch)")
    for n in sizes:
        code = _SIZE.format(n=n, genes=genes, epochs=epochs, threads=len(cores.split(",")), irregular=irregular,
                            fusion=fusion, spatial_k=spatial_k, minibatch=minibatch, expr_pcs=expr_pcs,
                            bench_dir=str(Path(__file__).parent))
        for name, pythonpath in codes:
            try:
                r = _run_python(code, cores, pythonpath)
            except RuntimeError as exc:
                print(f"{name:>10}{n:>9}  failed: {exc}", flush=True)
                continue
            parts = ", ".join(f"{k} {v}" for k, v in r.get("parts", {}).items())
            print(f"{name:>10}{r['spots']:>9}{r['graph_s']:>10}{r['setup_s']:>10}{r['s_per_epoch']:>9}{r['peak_gib']:>10}  {r['mode']}; "
                  f"{parts}; {r.get('graphs_peak_gib', '?')}", flush=True)


def bench_million_end_to_end(epochs: int, cores: str, n: int = 1_000_000, genes: int = 500) -> None:
    """A whole ``semst cluster`` on 1M synthetic cells (fusion none: no LLM stage), outputs written."""
    import anndata as ad
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="semst-million-"))
    try:
        coords, counts, domain = synthetic_slide(n, genes, irregular=True)
        a = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(genes)]))
        a.obsm["spatial"] = coords
        a.obs["ground_truth"] = pd.Categorical([f"d{d}" for d in domain])
        (work / "data").mkdir()
        a.write_h5ad(work / "data" / "synthetic-1m.h5ad")
        (work / "synthetic-1m.toml").write_text(
            f"[preprocess]\nmin_cells = 10\nn_top_genes = {genes}\n[cluster]\nspatial_k = 8\n"
            f"epochs = {epochs}\nfusion = \"none\"\nexpr_pcs = 50\n")
        env = {**os.environ, "SEMST_DATA_PATH": str(work / "data"), "SEMST_HOME": str(work),
               "OMP_NUM_THREADS": str(len(cores.split(",")))}
        t0 = time.perf_counter()
        done = subprocess.run(["taskset", "-c", cores, sys.executable, "-m", "semst.experiments.cli", "cluster",
                               "synthetic-1m", "--config", str(work / "synthetic-1m.toml"), "--out",
                               str(work / "results")], env=env, cwd=work, text=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        outputs = sorted(p.name for p in (work / "results" / "synthetic-1m").glob("*/*"))
        print(f"semst cluster, {n} cells x {genes} genes, {epochs} epochs, fusion none: exit {done.returncode}, "
              f"{wall:.0f} s end to end, peak RSS {peak:.2f} GiB; outputs: {', '.join(outputs)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="dlpfc,sizes,million")
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare against on dlpfc-151673")
    ap.add_argument("--epochs", type=int, default=10, help="epochs timed on dlpfc-151673")
    ap.add_argument("--dlpfc-cores", default="0;0,1", help="';'-separated core sets for the dlpfc comparison")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--genes", type=int, default=3000)
    ap.add_argument("--cores", default="0,1", help="cores for the synthetic sizes and the million (taskset)")
    ap.add_argument("--million-epochs", type=int, default=3)
    ap.add_argument("--size-epochs", type=int, default=1, help="epochs timed per synthetic size (after a warm-up)")
    ap.add_argument("--sizes-baseline", default=None, help="git revision to run beside this checkout on --sizes")
    ap.add_argument("--expr-pcs", type=int, default=None, help="expression kNN on this many SVD components (sizes)")
    ap.add_argument("--minibatch", default="auto", choices=("auto", "on", "off"),
                    help="training mode on --sizes (on: batches of the default batch_spots)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if "dlpfc" in parts:
        bench_dlpfc(args.baseline, args.epochs, tuple(args.dlpfc_cores.split(";")))
    if "sizes" in parts:
        bench_sizes([int(s) for s in args.sizes.split(",")], args.genes, args.size_epochs, args.cores, expr_pcs=args.expr_pcs,
                    minibatch=args.minibatch, baseline=args.sizes_baseline)
    if "million" in parts:
        # expression kNN on 50 SVD components: NN-descent over 500 dimensions at 1M cells is the slow part
        bench_sizes([1_000_000], 500, 1, args.cores, irregular=True, fusion="none", spatial_k=8, expr_pcs=50)
    if "million" in parts or "million-cluster" in parts:
        # its log gives the graph time, each seed's seconds per epoch, and the whole run's wall time
        bench_million_end_to_end(args.million_epochs, args.cores)


if __name__ == "__main__":
    main()
