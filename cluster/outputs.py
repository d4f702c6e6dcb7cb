"""What a stage-2 run leaves in ``results/<dataset>/<run>/``.

- ``config.toml``      the exact resolved config (rerun with ``semst cluster --config``)
- ``metrics.json``     per seed, mean +- sd and the consensus's metrics (x100, labelled spots only; none
                       for an unannotated slide), the number of domains (and with "auto" the stability
                       curve, the chosen k and, if annotated, the ARI at the chosen and annotated k),
                       embedding source, timings
- ``domains.parquet``  spot_id, x, y, ground_truth, domain (the consensus with several seeds, else the
                       seed's), domain_seed<k> for every seed
- ``embedding.npz``    Z_final of every seed (key ``seed<k>``)
- ``semst.h5ad``       the dataset with ``obs["semst_domain"]`` (the ``domain`` column) and
                       ``obsm["X_semst"]`` (first seed)
- ``domains.png``      the domains (consensus with several seeds) beside the annotation, on the tissue
- ``loss.png``         loss curves (total and each term) of every seed
- ``stability.png``, ``stability.tsv``  with ``n_domains = "auto..."``: k vs stability (mean, sd over
                       pairs of runs, peak, chosen)

Files are written to a temporary folder and moved into place, so a killed run never leaves a run
folder that looks complete.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from semst.shared.config import config_to_toml
from semst.shared.io import atomic_directory


def domains_title(report, cfg) -> str:
    """What the main labelling is, in words: the consensus of N seeds, or the one seed."""
    if report.consensus is not None:
        return f"consensus of seeds {','.join(map(str, cfg.seeds))}"
    return f"seed {cfg.seeds[0]}"


def metrics_document(report, cfg, ground_truth: pd.Series, source: dict) -> dict:
    doc = {
        "dataset": cfg.dataset, "n_spots": report.n_spots, "n_domains": report.n_domains,
        "n_domains_setting": "annotation" if cfg.n_domains is None else str(cfg.n_domains),
        "n_labelled": int(ground_truth.notna().sum()), "fusion": cfg.fusion, "source": source,
        "refine": cfg.refine, "domain": domains_title(report, cfg),
        "selection": ("none: last-epoch embedding, k-means with a fixed number of domains" if report.auto is None
                      else "none: last-epoch embedding, k-means with the number of domains chosen by stability "
                           "of the embeddings alone") + "; labels only used to compute these metrics",
        "per_seed": report.per_seed, "summary": report.summary}
    if report.consensus_metrics:
        doc["consensus"] = report.consensus_metrics
    if report.auto is not None:
        doc["auto_k"] = report.auto.summary()
    if report.auto_comparison:
        doc["auto_vs_annotation"] = report.auto_comparison
    return doc


def write_outputs(report, cfg, adata, ground_truth: pd.Series, source: dict):
    """Write a finished :class:`semst.cluster.runner.ClusterReport` into ``report.run_dir``."""
    from semst.cluster.plots import plot_domain_maps, plot_losses

    main = report.main_labels
    with atomic_directory(report.run_dir) as tmp:
        (tmp / "config.toml").write_text(config_to_toml(cfg))
        (tmp / "metrics.json").write_text(json.dumps(metrics_document(report, cfg, ground_truth, source),
                                                     indent=2, default=float))
        coords = np.asarray(adata.obsm["spatial"], dtype=float)
        table = pd.DataFrame({"spot_id": adata.obs_names.astype(str), "x": coords[:, 0], "y": coords[:, 1],
                              "ground_truth": ground_truth.astype("string").to_numpy(), "domain": main})
        for seed, labels in report.labels.items():
            table[f"domain_seed{seed}"] = labels
        table.to_parquet(tmp / "domains.parquet", index=False)
        np.savez_compressed(tmp / "embedding.npz", **{f"seed{s}": z for s, z in report.latents.items()})
        out = adata.copy()
        out.obs["semst_domain"] = pd.Categorical(main.astype(str))
        out.obsm["X_semst"] = report.latents[cfg.seeds[0]]
        out.uns["semst"] = {"config": config_to_toml(cfg), "summary": json.dumps(report.summary),
                            "embedding": json.dumps(source)}
        out.write_h5ad(tmp / "semst.h5ad")
        sub = ""
        scores = report.consensus_metrics or (report.per_seed[0] if len(report.per_seed) == 1 else {})
        if "ARI" in scores:
            sub = f" (ARI {scores['ARI']:.1f}, NMI {scores['NMI']:.1f})"
        k_text = f"{report.n_domains} domains" + (" (auto)" if report.auto is not None else "")
        plot_domain_maps(tmp / "domains.png", coords, ground_truth, [(f"SemST, {k_text}{sub}", main)],
                         title=f"{cfg.dataset}: SemST ({cfg.fusion}, {domains_title(report, cfg)})")
        plot_losses(report.histories, tmp / "loss.png", title=f"{cfg.dataset}: training losses")
        if report.auto is not None:
            from semst.cluster.autok import plot_stability

            report.auto.table().to_csv(tmp / "stability.tsv", sep="\t", index=False, float_format="%.4f")
            annotated = report.auto_comparison.get("annotated_k")
            plot_stability(report.auto, tmp / "stability.png", annotated_k=annotated,
                           title=f"{cfg.dataset}: number of domains by stability")
    return report.run_dir
