"""stDCL 1.0.1 on one slide, one seed: the settings of its tutorial for the platform, without R.

Its tutorials (tutorial/run_dlpfc.py, run_starmap.py, run_osm.py in its repository) set, per platform:

- spot arrays (Visium; ST likewise): datatype "10x" (two trainings, noise 2 and 1.5, the one with the
  better Davies-Bouldin index kept), lr 0.005, 1000 epochs, lambdas 10 / 0.5 / 0.8, 1 expression
  neighbour, refinement over 50 neighbours;
- osmFISH: datatype "osmFISH", lr 0.005, 600 epochs, lambdas 6 / 0.8 / 0.6, 3 expression neighbours,
  refinement over 28 neighbours;
- other imaging (STARmap's settings): lr 0.01, 1500 epochs, lambdas 10 / 3 / 3, 1 expression neighbour,
  refinement over 50 neighbours;

and always 500 pre-training epochs (lr 0.001), 3000 HVGs, a 64-wide latent, 3 spatial neighbours. The
tutorials cluster with R's mclust; here its own ``clustering`` with its Leiden search to the number
of domains (method "leiden"; k-means on the same components where no resolution gives k), then its
refinement, as the tutorials ask. A slide with no more genes than the 3000 HVGs keeps them all (with
the same normalisation). Labels: those domains;
embedding: the 20 principal components of its latent that were clustered ("emb_pca").
"""
import os
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import peer_io  # noqa: E402
import stDCL  # noqa: E402
import torch  # noqa: E402

# stDCL/stDCL.py imports its sibling module as `from model import Encoder`: its folder must be on the path.
sys.path.insert(0, os.path.dirname(next(iter(stDCL.__path__))))
sys.path.insert(0, next(iter(stDCL.__path__)))
from stDCL.stDCL import train  # noqa: E402
from stDCL.utils import clustering  # noqa: E402

COMMON = dict(prelr=0.001, pre_epochs=500, noise=2, input=3000, latent_dim=64, n_neighbors=3, preprocess=True,
              clustertype="leiden")
SETTINGS = {
    "10x": dict(lr=0.005, epochs=1000, lambda1=10.0, lambda2=0.5, lambda3=0.8, n_neighbors_gene=1, radius=50),
    "osmFISH": dict(lr=0.005, epochs=600, lambda1=6.0, lambda2=0.8, lambda3=0.6, n_neighbors_gene=3, radius=28),
    "STARmap": dict(lr=0.01, epochs=1500, lambda1=10.0, lambda2=3.0, lambda3=3.0, n_neighbors_gene=1, radius=50),
}


def datatype(platform: str, technology: str) -> str:
    if platform in ("visium", "st"):
        return "10x"
    return "osmFISH" if technology.lower() == "osmfish" else "STARmap"


def main() -> None:
    args = peer_io.arguments()
    adata = peer_io.read_slide(args)
    kind = datatype(args.platform, args.technology)
    settings = Namespace(**COMMON, **SETTINGS[kind], datatype=kind, seed=args.seed, n_clusters=args.n_domains,
                         device=torch.device("cpu"))
    if adata.n_vars <= settings.input:  # seurat_v3 cannot select more genes than there are: take them all,
        import scanpy as sc  # with its preprocessing's other steps

        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.scale(adata, zero_center=False, max_value=10)
        settings.preprocess = False
    adata = train(adata, settings)
    try:
        clustering(adata, settings, refinement=True)
        how = "its leiden search to k"
    except AssertionError:  # no resolution in its range gives k domains: k-means on the same components
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA
        from stDCL.utils import refine_label

        adata.obsm["emb_pca"] = PCA(n_components=20, random_state=1).fit_transform(adata.obsm["emb"])
        km = KMeans(args.n_domains, n_init=10, random_state=args.seed).fit(adata.obsm["emb_pca"])
        adata.obs["domain"] = km.labels_.astype(str)
        adata.obs["domain"] = refine_label(adata, settings.radius, key="domain")
        how = "k-means (its leiden search found no resolution giving k)"
    peer_io.write_outputs(args, adata.obs["domain"].astype(str).to_numpy(), np.asarray(adata.obsm["emb_pca"]), {
        "clustering": f"stDCL: {how} + its refinement over {settings.radius} neighbours "
                      f"(datatype {kind}; its tutorials use R's mclust)"})


if __name__ == "__main__":
    main()
