"""What a stage-2 run leaves in ``results/<dataset>/<run>/``.

- ``config.toml``      the exact resolved config (rerun with ``semst cluster --config``)
- ``metrics.json``     per seed and mean +- sd (x100, labelled spots only), embedding source, timings
- ``domains.parquet``  spot_id, x, y, ground_truth, domain (first seed), domain_seed<k> for every seed
- ``embedding.npz``    Z_final of every seed (key ``seed<k>``)
- ``semst.h5ad``       the dataset with ``obs["semst_domain"]`` and ``obsm["X_semst"]`` (first seed)
- ``domains.png``      predicted domains beside the annotation, on the tissue coordinates
- ``loss.png``         loss curves (total and each term) of every seed

Files are written to a temporary folder and moved into place, so a killed run never leaves a run
folder that looks complete.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import config_to_toml


def write_outputs(report, cfg, adata, ground_truth: pd.Series, embeddings: dict, histories: dict,
                  source: dict) -> Path:
    run_dir = Path(report.run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    try:
        first = cfg.seeds[0]
        (tmp / "config.toml").write_text(config_to_toml(cfg))
        (tmp / "metrics.json").write_text(json.dumps({
            "dataset": cfg.dataset, "n_spots": report.n_spots, "n_domains": report.n_domains,
            "n_labelled": int(ground_truth.notna().sum()), "fusion": cfg.fusion, "source": source,
            "selection": "none: last-epoch embedding, k-means with a fixed number of domains; labels only "
                         "used to compute these metrics",
            "per_seed": report.per_seed, "summary": report.summary}, indent=2, default=float))
        coords = np.asarray(adata.obsm["spatial"], dtype=float)
        table = pd.DataFrame({"spot_id": adata.obs_names.astype(str), "x": coords[:, 0], "y": coords[:, 1],
                              "ground_truth": ground_truth.astype("string").to_numpy(),
                              "domain": report.labels[first]})
        for seed, labels in report.labels.items():
            table[f"domain_seed{seed}"] = labels
        table.to_parquet(tmp / "domains.parquet", index=False)
        np.savez_compressed(tmp / "embedding.npz", **{f"seed{s}": z for s, z in embeddings.items()})
        out = adata.copy()
        out.obs["semst_domain"] = pd.Categorical(report.labels[first].astype(str))
        out.obsm["X_semst"] = embeddings[first]
        out.uns["semst"] = {"config": config_to_toml(cfg), "summary": json.dumps(report.summary),
                            "embedding": json.dumps(source)}
        out.write_h5ad(tmp / "semst.h5ad")
        plot_domains(coords, report.labels[first], ground_truth, tmp / "domains.png",
                     title=f"{cfg.dataset}: SemST ({cfg.fusion}, seed {first})", summary=report.summary)
        plot_losses(histories, tmp / "loss.png", title=f"{cfg.dataset}: training losses")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        tmp.rename(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def _scatter(ax, coords, values, title, spot_size):
    import matplotlib.pyplot as plt

    cats = pd.Categorical(values)
    cmap = plt.get_cmap("tab20", max(len(cats.categories), 1))
    labelled = cats.codes >= 0
    ax.scatter(coords[~labelled, 0], coords[~labelled, 1], s=spot_size, c="#dddddd", linewidths=0)
    for code, name in enumerate(cats.categories):
        m = cats.codes == code
        ax.scatter(coords[m, 0], coords[m, 1], s=spot_size, color=cmap(code), label=str(name), linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.invert_yaxis()  # spatial coordinates are image coordinates (y grows downwards)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def plot_domains(coords, labels, ground_truth: pd.Series, path: Path, title: str, summary: dict | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_truth = ground_truth.notna().any()
    n = 2 if has_truth else 1
    spot_size = max(1.0, 4000.0 / max(len(labels), 1))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 5), squeeze=False)
    if has_truth:
        _scatter(axes[0, 0], coords, ground_truth.astype("string").to_numpy(dtype=object, na_value=None),
                 "annotation", spot_size)
    sub = ""
    if summary and "ARI" in summary:
        sub = f" (ARI {summary['ARI']['mean']:.1f}, NMI {summary['NMI']['mean']:.1f})"
    _scatter(axes[0, n - 1], coords, np.asarray(labels).astype(str), "SemST domains" + sub, spot_size)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(histories: dict, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in histories.values() for k in h})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for seed, h in histories.items():
            if key in h:
                ax.plot(np.arange(1, len(h[key]) + 1), h[key], lw=1, label=f"seed {seed}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
