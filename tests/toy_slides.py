"""Small synthetic slides for tests: a grid whose left and right halves differ in expression."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

SYMBOLS = ["SNAP25", "GFAP", "MBP", "PLP1", "NRGN", "CALM2", "MOBP", "PCP4", "NEFL", "SCGB2A2",
           "AQP4", "CCK", "VSNL1", "ENC1", "CAMK2N1", "HPCAL1", "KRT17", "MT3", "SST", "NPY"]


def two_domain_slide(width: int = 10, height: int = 8, genes=SYMBOLS, seed: int = 0) -> ad.AnnData:
    """Poisson counts on a ``width`` x ``height`` grid (spacing 1); the left half expresses the genes
    at one set of rates, the right half at the same rates in reverse; obs["ground_truth"] says which."""
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(float(width)), np.arange(float(height))), -1).reshape(-1, 2)
    left = coords[:, 0] < width / 2
    rates = rng.uniform(0.5, 6, len(genes))
    X = rng.poisson(np.where(left[:, None], rates, rates[::-1])).astype(np.float32)
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(len(coords))]),
                   var=pd.DataFrame(index=list(genes)))
    a.obsm["spatial"] = coords
    a.obs["ground_truth"] = np.where(left, "left", "right")
    return a


def write_slide(path: Path, n: int, seed: int = 0, repeat: int = 1) -> None:
    """n spots of raw counts over SYMBOLS; ``repeat`` > 1 repeats rows so prompts coincide."""
    rng = np.random.default_rng(seed)
    base = rng.poisson(rng.uniform(0.2, 6, size=len(SYMBOLS)), size=(n // repeat, len(SYMBOLS)))
    X = np.repeat(base, repeat, axis=0)[:n].astype(np.float32)
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"spot{i}" for i in range(n)]),
                   var=pd.DataFrame(index=SYMBOLS))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    a.obs["ground_truth"] = rng.choice(["L1", "L2"], size=n)
    a.write_h5ad(path)
