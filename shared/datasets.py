"""Named datasets: where they come from, where they are found, and one loader that checks them.

Every loader returns an AnnData with
- ``X``: raw counts (CSR float32; integers, non-negative),
- ``var_names``: unique gene symbols,
- ``obs_names``: spot ids; ``obs["ground_truth"]``: annotated domain (NaN = unlabeled),
- ``obsm["spatial"]``: (n, 2) coordinates.

A dataset ``NAME`` is looked up on the search path (:func:`data_search_path`): ``data/raw/`` first,
then each folder of ``SEMST_DATA_PATH`` (``os.pathsep``-separated; default ``../shared/data`` beside
the repo). In each folder it is ``NAME.h5ad`` or a folder ``NAME/`` holding either ``NAME.h5ad`` /
``data.h5ad`` or a 10x Space Ranger output (``filtered_feature_bc_matrix.h5`` + ``spatial/``) with an
annotation table (``annotation.csv``/``.tsv``: barcode, domain). Any name found this way loads, so
your own slides need no registration; registered names also know their public source
(``semst data NAME`` downloads them, see :mod:`semst.shared.download`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from semst.shared import paths
from semst.shared.errors import SemstError


class DatasetError(SemstError, ValueError):
    """A dataset cannot be found or is not usable; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    url: str
    path: str  # where it goes inside data/raw/<name>/
    sha256: str | None = None  # None: no published checksum; verified by parsing instead
    size: int | None = None
    extract: bool = False  # a .tar.gz to unpack in place (Space Ranger's spatial/ folder)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    platform: str
    citation: str
    files: tuple[RemoteFile, ...] = ()
    annotation: str | None = None  # annotation table inside the dataset folder (Space Ranger datasets)
    annotation_columns: tuple[str, str] = ("barcode", "ground_truth")
    note: str = ""
    extra: dict = field(default_factory=dict)


_10X = "https://cf.10xgenomics.com/samples/spatial-exp/1.1.0"
_LIBD = "https://spatial-dlpfc.s3.us-east-2.amazonaws.com/h5"
_LIBD_ANN = "https://raw.githubusercontent.com/LieberInstitute/HumanPilot/master/10X"
DLPFC_SLICES = ("151507", "151508", "151509", "151510", "151669", "151670", "151671", "151672",
                "151673", "151674", "151675", "151676")


def _visium_10x(name, sample, title, citation, annotation_url, note=""):
    return DatasetSpec(
        name=name, title=title, platform="10x Visium", citation=citation,
        files=(RemoteFile(f"{_10X}/{sample}/{sample}_filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix.h5"),
               RemoteFile(f"{_10X}/{sample}/{sample}_spatial.tar.gz", "spatial.tar.gz", extract=True),
               RemoteFile(annotation_url, "annotation.tsv")),
        annotation="annotation.tsv", note=note)


def _dlpfc(slice_id: str) -> DatasetSpec:
    return DatasetSpec(
        name=f"dlpfc-{slice_id}", title=f"Human DLPFC slice {slice_id} (spatialLIBD)", platform="10x Visium",
        citation="Maynard et al. 2021, Nat Neurosci 24:425 (spatialLIBD)",
        files=(RemoteFile(f"{_LIBD}/{slice_id}_filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix.h5"),
               RemoteFile(f"{_LIBD_ANN}/{slice_id}/tissue_positions_list.txt", "spatial/tissue_positions_list.csv"),
               RemoteFile(f"{_LIBD_ANN}/{slice_id}/{slice_id}_truth.txt", "annotation.tsv")),
        annotation="annotation.tsv", annotation_columns=("barcode", "ground_truth"),
        note="layer annotation of Maynard et al.; spots without a layer are unlabeled")


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    # The paper's datasets (SemST Table 1), from their public sources.
    _visium_10x("mba", "V1_Mouse_Brain_Sagittal_Anterior", "Mouse brain, sagittal anterior",
                "10x Genomics V1_Mouse_Brain_Sagittal_Anterior; annotation as used by SEDR/Spatial-MGCN",
                "https://raw.githubusercontent.com/JinmiaoChenLab/SEDR_analyses/master/data/MBA_metadata.tsv"),
    _visium_10x("hbc", "V1_Breast_Cancer_Block_A_Section_1", "Human breast cancer, block A section 1",
                "10x Genomics V1_Breast_Cancer_Block_A_Section_1; annotation of Xu et al. (SEDR)",
                "https://raw.githubusercontent.com/JinmiaoChenLab/SEDR_analyses/master/data/BRCA1/metadata.tsv"),
    *[_dlpfc(s) for s in DLPFC_SLICES],
    DatasetSpec(name="me", title="Mouse embryo E9.5 (MOSTA, Stereo-seq)", platform="Stereo-seq",
                citation="Chen et al. 2022, Cell 185:1777 (MOSTA)",
                files=(RemoteFile("https://ftp.cngb.org/pub/SciRAID/stomics/STDS0000058/stomics/E9.5_E1S1.MOSTA.h5ad",
                                  "me.h5ad"),),
                note="h5ad with obs['annotation'] and obsm['spatial'], read by the h5ad reader"),
    DatasetSpec(name="mvc", title="Mouse visual cortex (STARmap, 1207 cells)", platform="STARmap",
                citation="Wang et al. 2018, Science 361:eaat5691",
                files=(RemoteFile("https://raw.githubusercontent.com/cs-wangbo/Spatial-MGCN/master/data/MVC/data.h5ad",
                                  "mvc.h5ad"),)),
    # Local datasets (../shared/data here): registered for their description; found on the path.
    DatasetSpec(name="mob", title="Mouse olfactory bulb (Stahl 2016)", platform="ST", citation="Stahl et al. 2016, Science 353:78"),
    DatasetSpec(name="starmap-mpfc", title="Mouse mPFC", platform="STARmap", citation="Wang et al. 2018, Science"),
    DatasetSpec(name="osmfish", title="Mouse somatosensory cortex", platform="osmFISH", citation="Codeluppi et al. 2018, Nat Methods"),
    DatasetSpec(name="seqfish-cortex", title="Mouse visual cortex", platform="seqFISH",
                citation="Lubeck/Zhu et al. (via Banksy)", note="holds normalised values, not counts: refused by the count loader"),
)}


def data_search_path() -> list[Path]:
    """Folders searched for datasets, in order: data/raw/, then SEMST_DATA_PATH (default ../shared/data)."""
    env = os.environ.get("SEMST_DATA_PATH")
    extra = [Path(p) for p in env.split(os.pathsep) if p] if env is not None else [paths.default_external_data()]
    return [paths.raw_dir(), *extra]


def _candidates(folder: Path, name: str) -> list[Path]:
    return [folder / f"{name}.h5ad", folder / name]


def find_dataset(name: str) -> Path:
    """The first ``NAME.h5ad`` or ``NAME/`` on the search path; a clear error listing every place looked."""
    if not name or "/" in name or name.startswith("."):
        raise DatasetError(f"{name!r} is not a dataset name")
    looked = []
    for folder in data_search_path():
        for cand in _candidates(folder, name):
            looked.append(str(cand))
            if cand.is_file() or (cand.is_dir() and _dataset_file(cand, name) is not None):
                return cand
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: it is not a known name and was not found on the search "
                           f"path. Known datasets: {', '.join(sorted(DATASETS))}. Looked for: {', '.join(looked)}")
    how = (f"run `semst data {name}` to download it from its public source"
           if DATASETS[name].files else f"put {name}.h5ad in {paths.raw_dir()}")
    raise DatasetError(f"dataset {name!r} is not available locally. Looked for: {', '.join(looked)}. To get it: "
                       f"{how}, or put {name}.h5ad in {paths.raw_dir()}, or add its folder to SEMST_DATA_PATH.")


def _dataset_file(folder: Path, name: str) -> Path | None:
    for cand in (folder / f"{name}.h5ad", folder / "data.h5ad", folder / "filtered_feature_bc_matrix.h5"):
        if cand.is_file():
            return cand
    return None


def load_dataset(name: str, path: str | Path | None = None) -> anndata.AnnData:  # noqa: F821
    """Load and check a dataset by name (see the module docstring for what is returned).

    ``path`` loads that file or folder instead of searching (e.g. a download being verified)."""
    path = Path(path) if path is not None else find_dataset(name)
    if path.is_file():
        adata = read_h5ad_dataset(path)
    else:
        f = _dataset_file(path, name)
        if f is None:
            raise DatasetError(f"{path} holds neither {name}.h5ad, data.h5ad nor a Space Ranger output")
        if f.suffix == ".h5ad":
            adata = read_h5ad_dataset(f)
        else:
            spec = DATASETS.get(name)
            ann = path / (spec.annotation if spec and spec.annotation else "annotation.tsv")
            if not ann.exists():
                alt = path / "annotation.csv"
                ann = alt if alt.exists() else None
            adata = read_spaceranger(path, ann, spec.annotation_columns if spec else ("barcode", "ground_truth"))
    adata.uns["dataset"] = name
    adata.uns["dataset_path"] = str(path)
    check_slide(adata, name)
    return adata


def read_h5ad_dataset(path: str | Path):
    """An ``.h5ad`` as a dataset: counts in X (or layers["counts"]), symbols in var_names."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DatasetError(f"cannot read {path} as .h5ad: {exc}") from None
    if "counts" in adata.layers:  # a processed file that kept its counts
        adata.X = adata.layers["counts"]
    for key in ("ground_truth", "annotation", "layer_guess", "celltype", "Region"):
        if key in adata.obs:
            if key != "ground_truth":
                adata.obs["ground_truth"] = adata.obs[key]
            break
    else:
        adata.obs["ground_truth"] = pd.Series(np.nan, index=adata.obs_names, dtype="object")
    return _as_counts_anndata(adata, str(path))


def read_spaceranger(folder: str | Path, annotation: str | Path | None = None,
                     annotation_columns: tuple[str, str] = ("barcode", "ground_truth")):
    """A 10x Space Ranger output folder (+ an optional barcode -> domain table) as a dataset.

    10x symbols are not unique (a few genes share one symbol; their Ensembl ids differ). Those are
    made unique the way scanpy does (``GENE``, ``GENE-1``), which keeps every count and is said in
    ``uns["renamed_genes"]``; a user's own .h5ad with duplicates is refused instead.
    """
    import scanpy as sc

    folder = Path(folder)
    h5 = folder / "filtered_feature_bc_matrix.h5"
    try:
        adata = sc.read_10x_h5(h5)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"cannot read {h5} as a 10x feature-barcode matrix: {exc}") from None
    dup = adata.var_names[adata.var_names.duplicated()].unique()
    if len(dup):
        adata.var_names_make_unique()
        adata.uns["renamed_genes"] = [str(g) for g in dup]
    positions = _read_positions(folder / "spatial")
    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise DatasetError(f"{len(missing)} barcodes of {h5} have no position in {folder / 'spatial'}")
    pos = positions.loc[adata.obs_names]
    in_tissue = pos["in_tissue"].astype(int).to_numpy() == 1
    adata = adata[in_tissue].copy()
    pos = pos[in_tissue]
    adata.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy(dtype=np.float64)
    adata.obs["ground_truth"] = pd.Series(np.nan, index=adata.obs_names, dtype="object")
    if annotation is not None:
        ann = pd.read_csv(annotation, sep=None, engine="python")
        bc, label = annotation_columns
        if bc not in ann.columns or label not in ann.columns:
            bc, label = ann.columns[0], ann.columns[-1]
        ann = ann.set_index(ann[bc].astype(str))[label]
        adata.obs["ground_truth"] = ann.reindex(adata.obs_names).to_numpy(dtype=object)
    return _as_counts_anndata(adata, str(folder))


def _read_positions(spatial: Path) -> pd.DataFrame:
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]
    for name, header in (("tissue_positions.csv", 0), ("tissue_positions_list.csv", None),
                         ("tissue_positions_list.txt", None)):
        p = spatial / name
        if p.exists():
            df = pd.read_csv(p, header=header)
            df.columns = cols
            return df.set_index(df["barcode"].astype(str))
    raise DatasetError(f"no tissue_positions(.csv|_list.csv) in {spatial}: is this a Space Ranger output?")


def _as_counts_anndata(adata, where: str):
    X = adata.X
    if not sp.issparse(X):
        X = np.asarray(X)
        if X.dtype.kind not in "biuf":
            raise DatasetError(f"{where}: expression values are not numeric (dtype {X.dtype})")
        X = sp.csr_matrix(X)
    X = sp.csr_matrix(X)
    if X.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: expression values are not numeric (dtype {X.dtype})")
    adata.X = X.astype(np.float32)
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    gt = adata.obs["ground_truth"]
    adata.obs["ground_truth"] = pd.Categorical(
        [None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in gt])
    return adata


def checked_dataset(adata, name: str):
    """A checked copy of an in-memory AnnData, in the form every loader returns (CSR float32 counts,
    string names, ``obs["ground_truth"]`` categorical or all-NaN), or a DatasetError saying what is
    wrong: the same checks and messages as a dataset found on disk (:func:`check_slide`)."""
    adata = adata.copy()
    check_coordinates(adata, name)  # before the conversion, which keeps obsm as it is
    if "ground_truth" not in adata.obs:
        adata.obs["ground_truth"] = pd.Series(np.nan, index=adata.obs_names, dtype="object")
    adata = _as_counts_anndata(adata, name)
    adata.uns["dataset"] = name
    check_slide(adata, name)
    return adata


def check_slide(adata, name: str, preprocess=None) -> np.ndarray:
    """The one input check of every entry point (``semst embed``, ``semst cluster``, ``semst.encode``,
    ``semst.domains``, the grid), run before any model is loaded, anything trained or the cache
    opened; returns the (n_spots, 2) coordinates.

    Refuses, each with a DatasetError saying what to do: an empty slide; coordinates missing, not
    numeric, not finite or not exactly 2 columns; spot or gene names that occur twice; expression
    that is not raw counts. With ``preprocess`` (a PreprocessConfig) also a slide too small for that
    preprocessing (:func:`semst.shared.preprocess.check_preprocessable`: fewer than 2 spots, no gene
    left by ``min_cells``, a seurat_v3 HVG selection that cannot run on it).
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DatasetError(f"{name}: empty dataset ({adata.n_obs} spots x {adata.n_vars} genes)")
    coords = check_coordinates(adata, name)
    check_unique_names(adata, name)
    validate_dataset(adata, name)
    if preprocess is not None:
        from semst.shared.preprocess import check_preprocessable
        check_preprocessable(adata, preprocess, name)
    return coords


def check_unique_names(adata, name: str) -> None:
    """Spots are matched to their cached prompts, graphs and results by name, genes to their counts."""
    for what, names, fix in (("spot", adata.obs_names, "adata.obs_names_make_unique()"),
                             ("gene", adata.var_names, "make them unique or sum them")):
        dup = names[names.duplicated()].unique()
        if len(dup):
            raise DatasetError(f"{name}: {len(dup)} {what} names occur more than once (e.g. "
                               f"{', '.join(map(str, dup[:5]))}); {fix} before using semst")


def validate_dataset(adata, name: str = "dataset") -> None:
    """Raise DatasetError unless X holds raw counts and genes are uniquely named symbols."""
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X).ravel()
    if data.size and not np.isfinite(data).all():
        raise DatasetError(f"{name}: expression holds NaN or infinite values; semst needs raw counts")
    if data.size and data.min() < 0:
        raise DatasetError(f"{name}: expression holds negative values (min {data.min():.3g}): these look "
                           f"normalised or scaled, but the ZINB model needs raw integer counts")
    if data.size and not np.allclose(data, np.round(data)):
        frac = float(np.mean(data != np.round(data)))
        raise DatasetError(f"{name}: {frac:.0%} of the non-zero values are not integers: these look "
                           f"normalised, but the ZINB model needs raw integer counts")
    dup = adata.var_names[adata.var_names.duplicated()].unique()
    if len(dup):
        raise DatasetError(f"{name}: {len(dup)} gene names occur more than once (e.g. {', '.join(map(str, dup[:5]))}); "
                           f"make them unique or sum them before using semst")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DatasetError(f"{name}: empty dataset ({adata.n_obs} spots x {adata.n_vars} genes)")


def check_coordinates(adata, name: str | None = None) -> np.ndarray:
    """The (n, 2) spot coordinates (float64), or a clear error when they are missing, not numeric,
    not finite or not exactly two columns (x, y)."""
    name = name or adata.uns.get("dataset", "dataset")
    if "spatial" not in adata.obsm:
        raise DatasetError(f"{name}: no spot coordinates (obsm['spatial'] is missing)")
    try:
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{name}: obsm['spatial'] holds values that are not numbers; semst needs "
                           f"(n_spots, 2) numeric x, y coordinates") from None
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs:
        raise DatasetError(f"{name}: obsm['spatial'] must be (n_spots, 2) = ({adata.n_obs}, 2), got {coords.shape}")
    if coords.shape[1] == 3:
        raise DatasetError(f"{name}: obsm['spatial'] has 3 columns, but semst's spatial graph is 2-D: keep the "
                           f"two in-plane ones, e.g. adata.obsm['spatial'] = adata.obsm['spatial'][:, :2] "
                           f"(and one section at a time for serial sections)")
    if coords.shape[1] != 2:
        raise DatasetError(f"{name}: obsm['spatial'] must have 2 columns (x, y), got {coords.shape[1]}")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise DatasetError(f"{name}: {int(bad.sum())} spots have NaN or infinite coordinates "
                           f"(e.g. {list(adata.obs_names[bad][:3])})")
    return coords


def describe_datasets() -> list[tuple[str, str, str]]:
    """(name, where it is found or 'not downloaded', source) for every known dataset."""
    rows = [("name", "found at", "source")]
    for name, spec in sorted(DATASETS.items()):
        try:
            where = str(find_dataset(name))
        except DatasetError:
            where = "not downloaded" if spec.files else "not found"
        rows.append((name, where, f"{spec.platform}: {spec.title}"))
    return rows
