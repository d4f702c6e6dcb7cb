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
- ``.semst-run.json``  the marker: semst wrote this folder (version, dataset, run name, when)

Files are written to a temporary folder and moved into place, so a killed run never leaves a run
folder that looks complete (and the next run into the dataset's folder removes what it left). The only
thing a run ever replaces is a run folder semst wrote: the run name is one plain path component, and
an existing folder of that name is replaced only if it holds the marker, ``metrics.json`` and
``config.toml`` and is not a symbolic link. All of this is checked by :func:`prepare_run_folder`
before any work.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from semst.cluster.seeds import ClusterError
from semst.shared.config import config_to_toml
from semst.shared.io import TEMP_PREFIX, atomic_directory, clean_stale_temporaries

RUN_MARKER = ".semst-run.json"
_RUN_FILES = (RUN_MARKER, "metrics.json", "config.toml")  # a folder with all three is a semst run
_NAME_MAX = 255  # bytes in one path component on the usual file systems


def check_run_name(name: str, what: str = "run name") -> str:
    """``name`` if it is exactly one plain path component, else a ClusterError saying why."""
    reason = None
    if not isinstance(name, str) or not name:
        reason = "is empty"
    elif "\0" in name:
        reason = "contains a NUL character"
    elif any(sep and sep in name for sep in ("/", os.sep, os.altsep)):
        reason = "contains a path separator"
    elif name in (".", ".."):
        reason = "names the current or the parent folder"
    elif name.startswith("."):
        reason = f"starts with '.' (hidden; {TEMP_PREFIX}* are semst's temporary folders)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        reason = "contains a control character"
    elif len(os.fsencode(name)) > _NAME_MAX:
        reason = f"is longer than {_NAME_MAX} bytes"
    if reason:
        raise ClusterError(f"{what} {name!r} {reason}: it must be one folder name, e.g. 'film-test'")
    return name


# Every file a run folder written before the marker existed could hold: such a folder (these files
# only, metrics.json and config.toml among them) is recognised as semst's, so rerunning yesterday's
# run replaces it as before instead of stopping.
_LEGACY_RUN_FILES = frozenset({"config.toml", "metrics.json", "domains.parquet", "embedding.npz", "semst.h5ad",
                               "domains.png", "loss.png", "stability.png", "stability.tsv"})


def is_semst_run(path: Path) -> bool:
    """Whether ``path`` is a real folder (no symbolic link) holding what every semst run folder holds:
    the marker, metrics.json and config.toml, or (a run written before the marker) semst's output files
    and nothing else."""
    if path.is_symlink() or not path.is_dir():
        return False
    if not (path / RUN_MARKER).exists():
        return _is_legacy_run(path)
    if not all((path / f).is_file() and not (path / f).is_symlink() for f in _RUN_FILES):
        return False
    try:
        return isinstance(json.loads((path / RUN_MARKER).read_text()), dict)
    except (OSError, ValueError):
        return False


def _is_legacy_run(path: Path) -> bool:
    entries = list(path.iterdir())
    names = {p.name for p in entries}
    return ({"metrics.json", "config.toml"} <= names and names <= _LEGACY_RUN_FILES
            and all(p.is_file() and not p.is_symlink() for p in entries))


def check_replaceable(run_dir: Path, dataset_dir: Path) -> None:
    """Nothing at ``run_dir``, or a run folder semst wrote, inside ``dataset_dir``; else a ClusterError."""
    advice = "pick another run name (--run-name) or output folder (--out); semst replaces only run folders it wrote"
    if not os.path.lexists(run_dir):
        return
    if run_dir.is_symlink():
        raise ClusterError(f"{run_dir} is a symbolic link (to {os.readlink(run_dir)}), not a run folder "
                           f"semst wrote: {advice}")
    if run_dir.resolve().parent != dataset_dir.resolve():
        raise ClusterError(f"{run_dir} resolves to {run_dir.resolve()}, outside {dataset_dir}: {advice}")
    if not run_dir.is_dir():
        raise ClusterError(f"{run_dir} is a file, not a run folder: {advice}")
    if not is_semst_run(run_dir):
        raise ClusterError(f"{run_dir} exists and is not a run folder semst wrote (no {RUN_MARKER}, "
                           f"metrics.json and config.toml): {advice}")


def prepare_run_folder(out_dir: str | Path, dataset: str, run_name: str, log=print) -> Path:
    """Check, before any work, that this run can write ``<out_dir>/<dataset>/<run_name>``; returns it.

    The names are single path components, ``out_dir`` is (or can be made) a writable folder, and the
    destination is free or an earlier semst run. Nothing is created here (a refused run leaves no
    trace); temporary folders that killed runs left in the dataset's folder are removed.
    """
    check_run_name(run_name)
    check_run_name(dataset, "dataset name")
    out = Path(out_dir)
    dataset_dir = out / dataset
    existing = _nearest_existing(dataset_dir)
    if not existing.is_dir():
        if existing == out:
            raise ClusterError(f"the output folder {out} (--out) is not a folder: give a folder for the run folders")
        raise ClusterError(f"cannot create the output folder {dataset_dir}: {existing} is not a folder; "
                           f"give another output folder (--out)")
    try:  # an unnamed file (O_TMPFILE) where possible: nothing is left even if killed right now
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ClusterError(f"cannot write the output folder {dataset_dir}: {existing}: {exc.strerror}") from None
    if existing == dataset_dir:
        clean_stale_temporaries(dataset_dir, log)
    run_dir = dataset_dir / run_name
    check_replaceable(run_dir, dataset_dir)
    if os.path.lexists(run_dir):
        log(f"{run_dir} holds an earlier run: it will be replaced if this run finishes")
    return run_dir


def check_free_space(run_dir: Path, adata, n_seeds: int, latent_dim: int) -> None:
    """A ClusterError if the file system of ``run_dir`` clearly cannot hold the run folder.

    A rough upper estimate (the slide's arrays, the latents twice, the figures): HDF5 can crash the
    process when the disk fills while ``semst.h5ad`` is written, instead of raising an error.
    """
    arrays = [adata.X, *adata.layers.values(), *adata.obsm.values(), *adata.obsp.values()]
    if adata.raw is not None:
        arrays.append(adata.raw.X)
    latents = 2 * adata.n_obs * latent_dim * 4 * n_seeds
    names = 64 * (adata.n_obs + adata.n_vars) * 2
    needed = int(1.1 * (sum(map(_nbytes, arrays)) + latents + names)) + 4 * 2**20
    where = _nearest_existing(run_dir.parent)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < needed:
        raise ClusterError(f"not enough space for the run folder {run_dir}: it needs about "
                           f"{needed / 2**20:.0f} MB and {where} has {free / 2**20:.0f} MB free; free some "
                           f"space or give another output folder (--out)")


def _nbytes(array) -> int:
    if hasattr(array, "indptr"):  # scipy sparse
        return array.data.nbytes + array.indices.nbytes + array.indptr.nbytes
    return int(getattr(array, "nbytes", 0))


def _nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its closest existing parent (where ``mkdir -p`` starts)."""
    for part in [path, *path.parents]:
        if os.path.lexists(part):
            return part
    return Path(".")


def run_marker(cfg, run_name: str) -> dict:
    from semst import __version__

    return {"semst_version": __version__, "dataset": cfg.dataset, "run_name": run_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def domains_title(report, cfg) -> str:
    """What the main labelling is, in words: the consensus of N seeds, or the one seed."""
    if report.consensus is not None:
        return f"consensus of seeds {','.join(map(str, cfg.clustering.seeds))}"
    return f"seed {cfg.clustering.seeds[0]}"


def metrics_document(report, cfg, ground_truth: pd.Series, source: dict) -> dict:
    n_domains = cfg.clustering.n_domains
    doc = {
        "dataset": cfg.dataset, "n_spots": report.n_spots, "n_domains": report.n_domains,
        "n_domains_setting": "annotation" if n_domains is None else str(n_domains),
        "n_labelled": int(ground_truth.notna().sum()), "fusion": cfg.model.fusion, "source": source,
        "refine": cfg.clustering.refine, "domain": domains_title(report, cfg),
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
    """Write a finished :class:`semst.cluster.seeds.ClusterReport` into ``report.run_dir``, which
    :func:`prepare_run_folder` checked; an I/O failure is one ClusterError and changes nothing there."""
    run_dir = Path(report.run_dir)
    latent_dim = next(iter(report.latents.values())).shape[1] if report.latents else 0
    check_free_space(run_dir, adata, len(report.latents), latent_dim)
    try:
        with atomic_directory(run_dir, check_replace=lambda p: check_replaceable(p, run_dir.parent)) as tmp:
            _fill_run_folder(tmp, report, cfg, adata, ground_truth, source)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise ClusterError(f"could not write the run folder {run_dir}: {exc.strerror or exc}{where}; "
                           f"nothing there was changed") from None
    return run_dir


def _fill_run_folder(tmp: Path, report, cfg, adata, ground_truth: pd.Series, source: dict) -> None:
    from semst.cluster.plots import plot_domain_maps, plot_losses

    main = report.main_labels
    (tmp / RUN_MARKER).write_text(json.dumps(run_marker(cfg, Path(report.run_dir).name), indent=2))
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
    out.obsm["X_semst"] = report.latents[cfg.clustering.seeds[0]]
    out.uns["semst"] = {"config": config_to_toml(cfg), "summary": json.dumps(report.summary),
                        "embedding": json.dumps(source)}
    out.write_h5ad(tmp / "semst.h5ad")
    sub = ""
    scores = report.consensus_metrics or (report.per_seed[0] if len(report.per_seed) == 1 else {})
    if "ARI" in scores:
        sub = f" (ARI {scores['ARI']:.1f}, NMI {scores['NMI']:.1f})"
    k_text = f"{report.n_domains} domains" + (" (auto)" if report.auto is not None else "")
    plot_domain_maps(tmp / "domains.png", coords, ground_truth, [(f"SemST, {k_text}{sub}", main)],
                     title=f"{cfg.dataset}: SemST ({cfg.model.fusion}, {domains_title(report, cfg)})")
    plot_losses(report.histories, tmp / "loss.png", title=f"{cfg.dataset}: training losses")
    if report.auto is not None:
        from semst.cluster.autok import plot_stability

        report.auto.table().to_csv(tmp / "stability.tsv", sep="\t", index=False, float_format="%.4f")
        annotated = report.auto_comparison.get("annotated_k")
        plot_stability(report.auto, tmp / "stability.png", annotated_k=annotated,
                       title=f"{cfg.dataset}: number of domains by stability")
