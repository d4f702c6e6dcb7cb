"""BANKSY (pybanksy 1.3.5) on one slide, one seed: its domain-segmentation setting.

As its Python tutorials: normalize_total + log1p, the 2000 most variable genes (seurat flavour; every
gene when fewer); ``initialize_banksy`` with the scaled-Gaussian neighbour decay, max_m = 1 and k_geom
= 6 on spot arrays (Visium, ST: the immediate ring) or 15 on imaging slides (its default);
``generate_banksy_matrix`` with lambda = 0.8 (its setting for domains; 0.2 is for cell types); PCA to
20 dimensions (``pca_umap``); its Leiden partition (50 shared nearest neighbours) at the resolution its
own ``find_resolutions`` search matches to the number of domains, seeded with the run's seed.
Labels: that partition; embedding: the 20 BANKSY principal components it partitioned.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import peer_io  # noqa: E402
import scanpy as sc  # noqa: E402
from banksy.cluster_methods import run_Leiden_partition  # noqa: E402
from banksy.embed_banksy import generate_banksy_matrix  # noqa: E402
from banksy.initialize_banksy import initialize_banksy  # noqa: E402
from banksy_utils.umap_pca import pca_umap  # noqa: E402

LAMBDA = 0.8
PCA_DIMS = 20


def main() -> None:
    args = peer_io.arguments()
    adata = peer_io.read_slide(args)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    if adata.n_vars > 2000:
        sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat")
        adata = adata[:, adata.var["highly_variable"]].copy()
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    adata.obs["xcoord"], adata.obs["ycoord"] = xy[:, 0], xy[:, 1]
    adata.obsm["coord_xy"] = xy
    k_geom = 15 if args.platform == "imaging" else 6
    banksy_dict = initialize_banksy(adata, ("xcoord", "ycoord", "coord_xy"), k_geom,
                                    nbr_weight_decay="scaled_gaussian", max_m=1, plt_edge_hist=False,
                                    plt_nbr_weights=False, plt_agf_angles=False, plt_theta=False)
    banksy_dict, _ = generate_banksy_matrix(adata, banksy_dict, [LAMBDA], 1, verbose=False)
    pca_umap(banksy_dict, pca_dims=[PCA_DIMS], add_umap=False, plt_remaining_var=False)
    results, _ = run_Leiden_partition(banksy_dict, [], num_nn=50, num_iterations=-1, partition_seed=args.seed,
                                      match_labels=False, max_labels=args.n_domains)
    row = results.iloc[0]
    banksy_adata = banksy_dict["scaled_gaussian"][LAMBDA]["adata"]
    labels = np.asarray(row["labels"].dense)
    embedding = np.asarray(banksy_adata.obsm[f"reduced_pc_{PCA_DIMS}"])
    if list(banksy_adata.obs_names) != list(adata.obs_names):
        raise RuntimeError("BANKSY reordered or dropped spots")
    peer_io.write_outputs(args, labels, embedding, {
        "clustering": f"BANKSY Leiden, resolution {row['resolution']:.2f} from its find_resolutions "
                      f"(lambda {LAMBDA}, k_geom {k_geom}, {PCA_DIMS} PCs)",
        "resolution": float(row["resolution"]), "domains": int(row["num_labels"])})


if __name__ == "__main__":
    main()
