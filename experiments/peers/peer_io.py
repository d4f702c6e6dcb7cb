"""The peers' side of the adapter contract (:mod:`semst.experiments.peers.adapter`), for their scripts.

Runs inside a peer's own virtualenv, where semst is not installed: stdlib, numpy and anndata only.
A script (``experiments/peers/<name>/run.py``) does::

    args = peer_io.arguments()            # --h5ad --out --seed --n-domains --threads --platform --technology
                                          # [--semantic FILE.npy]
    adata = peer_io.read_slide(args)      # raw counts, obsm["spatial"]; seeds and threads fixed
    ...                                   # the tool's own documented pipeline
    peer_io.write_outputs(args, labels, embedding, {"clustering": "..."})
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one peer method on one slide, one seed")
    p.add_argument("--h5ad", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--n-domains", required=True, type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--platform", choices=("visium", "st", "imaging"), default="visium")
    p.add_argument("--technology", default="", help="e.g. osmFISH, STARmap, 10x Visium ('' if unknown)")
    p.add_argument("--semantic", type=Path, default=None,
                   help="a .npy of semst's semantic vectors (spots x d, the h5ad's order): modulate with them")
    return p.parse_args(argv)


def fix_seed(seed: int, threads: int) -> None:
    """Every random generator the peers use, and torch's thread pools (when torch is there)."""
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already used: the intra-op pool, where the work is, is still set
        pass


def read_slide(args: argparse.Namespace):
    """The slide written by the adapter, after the seed and the thread budget are fixed."""
    import anndata as ad

    fix_seed(args.seed, args.threads)
    adata = ad.read_h5ad(args.h5ad)
    adata.var_names_make_unique()
    return adata


def read_semantic(args: argparse.Namespace, n_spots: int):
    """semst's semantic vectors given with --semantic (float32, spots x d), or None."""
    if args.semantic is None:
        return None
    vectors = np.load(args.semantic, allow_pickle=False).astype(np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != n_spots:
        raise SystemExit(f"--semantic {args.semantic}: shape {vectors.shape}, expected ({n_spots}, d)")
    return vectors


def write_outputs(args: argparse.Namespace, labels, embedding, info: dict | None = None) -> None:
    """labels.npy (one integer domain per spot, the h5ad's order), embedding.npy, info.json."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.unique(labels.astype(str), return_inverse=True)[1]
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "labels.npy", labels.astype(np.int64))
    np.save(args.out / "embedding.npy", np.asarray(embedding, dtype=np.float32))
    (args.out / "info.json").write_text(json.dumps(info or {}, indent=1, default=str))
