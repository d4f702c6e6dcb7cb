"""CellCharter on one slide, one seed: its spatial-clustering recipe, with PCA for the reduction.

Its tutorials reduce each spot's expression with scVI (scvi-tools, not installed with cellcharter);
here with PCA (normalize_total, log1p, 50 components; fewer on slides with fewer genes). Then as the
tutorials: the spatial graph (``squidpy.gr.spatial_neighbors``: the hexagonal grid, 6 neighbours, on
Visium; Delaunay triangulation with CellCharter's ``remove_long_links`` elsewhere), the
representation aggregated over ``n_layers = 3`` neighbourhood layers (``cc.gr.aggregate_neighbors``)
and its Gaussian mixture (``cc.tl.Cluster``) with the number of domains and the run's seed.
Labels: the mixture's domains; embedding: the aggregated representation it clustered.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cellcharter as cc  # noqa: E402
import numpy as np  # noqa: E402
import peer_io  # noqa: E402
import scanpy as sc  # noqa: E402
import squidpy as sq  # noqa: E402

N_LAYERS = 3


def main() -> None:
    args = peer_io.arguments()
    adata = peer_io.read_slide(args)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_pcs = min(50, adata.n_vars - 1, adata.n_obs - 1)
    sc.pp.pca(adata, n_comps=n_pcs, random_state=args.seed)
    if args.platform == "visium":
        sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=6)
        graph = "hexagonal grid, 6 neighbours"
    else:
        sq.gr.spatial_neighbors(adata, coord_type="generic", delaunay=True)
        cc.gr.remove_long_links(adata)
        graph = "Delaunay, long links removed"
    cc.gr.aggregate_neighbors(adata, n_layers=N_LAYERS, use_rep="X_pca", out_key="X_cellcharter")
    model = cc.tl.Cluster(n_clusters=args.n_domains, random_state=args.seed)
    model.fit(adata, use_rep="X_cellcharter")
    labels = np.asarray(model.predict(adata, use_rep="X_cellcharter"))
    peer_io.write_outputs(args, labels, np.asarray(adata.obsm["X_cellcharter"]), {
        "clustering": f"CellCharter Gaussian mixture on {n_pcs} PCs aggregated over {N_LAYERS} layers ({graph}); "
                      "its tutorials reduce with scVI"})


if __name__ == "__main__":
    main()
