"""A grid's results on disk: ``<out>/cells/<dataset>/`` holds each dataset's spots (``spots.parquet``)
and, per variant, the cell (``<variant>.json``) and its domains per seed (``<variant>.domains.parquet``).

Every file is written atomically, so an interrupted run leaves either the old file or the new one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from semst.shared.io import atomic_write_parquet, atomic_write_text


def cell_paths(out: Path, dataset: str, variant: str) -> tuple[Path, Path]:
    """(the cell's JSON, its domains' Parquet)."""
    d = out / "cells" / dataset
    return d / f"{variant}.json", d / f"{variant}.domains.parquet"


def load_cell(out: Path, dataset: str, variant: str):
    """The CellResult an earlier run wrote, or None (absent, incomplete or unreadable)."""
    from semst.experiments.report import CellResult

    path, labels = cell_paths(out, dataset, variant)
    if not path.is_file() or not labels.is_file():
        return None
    try:
        return CellResult.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def save_cell(out: Path, cell, labels: dict[int, np.ndarray], spot_ids) -> None:
    """Write the cell's JSON and, if it finished, its domains (one column per seed)."""
    path, labels_path = cell_paths(out, cell.dataset, cell.variant)
    if cell.status == "ok":
        df = pd.DataFrame({"spot_id": list(spot_ids)})
        for seed, lab in labels.items():
            df[f"seed{seed}"] = np.asarray(lab)
        atomic_write_parquet(labels_path, df)
    atomic_write_text(path, json.dumps(cell.to_dict(), indent=1, default=_json_default))


def cell_labels(out: Path, dataset: str, variant: str, seed: int) -> np.ndarray | None:
    """One seed's domains of a finished cell, or None."""
    _, path = cell_paths(out, dataset, variant)
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    col = f"seed{seed}"
    return df[col].to_numpy() if col in df else None


def write_spots(out: Path, dataset: str, adata, truth: pd.Series) -> None:
    """The dataset's spots (id, coordinates, annotation) that the figures draw the domains on."""
    coords = np.asarray(adata.obsm["spatial"], dtype=float)
    atomic_write_parquet(spots_path(out, dataset),
                         pd.DataFrame({"spot_id": adata.obs_names.astype(str), "x": coords[:, 0],
                                       "y": coords[:, 1], "ground_truth": truth.astype("string").to_numpy()}))


def spots_path(out: Path, dataset: str) -> Path:
    return out / "cells" / dataset / "spots.parquet"


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
