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

import numpy as np
import pandas as pd

from semst.shared.config import config_to_toml
from semst.shared.io import atomic_directory


def write_outputs(report, cfg, adata, ground_truth: pd.Series, source: dict):
    """Write a finished :class:`semst.cluster.runner.ClusterReport` into ``report.run_dir``."""
    from semst.cluster.plots import plot_domain_maps, plot_losses

    first = cfg.seeds[0]
    with atomic_directory(report.run_dir) as tmp:
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
        np.savez_compressed(tmp / "embedding.npz", **{f"seed{s}": z for s, z in report.latents.items()})
        out = adata.copy()
        out.obs["semst_domain"] = pd.Categorical(report.labels[first].astype(str))
        out.obsm["X_semst"] = report.latents[first]
        out.uns["semst"] = {"config": config_to_toml(cfg), "summary": json.dumps(report.summary),
                            "embedding": json.dumps(source)}
        out.write_h5ad(tmp / "semst.h5ad")
        sub = ""
        if "ARI" in report.summary:
            ari, nmi = report.summary["ARI"], report.summary["NMI"]
            sub = (f" (ARI {ari['mean']:.1f}, NMI {nmi['mean']:.1f}" +
                   (f": mean of {ari['n']} seeds)" if ari["n"] > 1 else ")"))
        plot_domain_maps(tmp / "domains.png", coords, ground_truth, [(f"SemST domains{sub}", report.labels[first])],
                         title=f"{cfg.dataset}: SemST ({cfg.fusion}, seed {first})")
        plot_losses(report.histories, tmp / "loss.png", title=f"{cfg.dataset}: training losses")
    return report.run_dir
