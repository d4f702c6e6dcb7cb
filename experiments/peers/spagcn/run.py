"""SpaGCN 1.2.7 on one slide, one seed: its tutorial's pipeline without histology (no image here).

Genes in >= 3 spots, no ERCC / MT- genes, normalize_per_cell + log1p; the adjacency from the spot
coordinates; l searched for p = 0.5 (``search_l``); the resolution searched to the number of domains
(``search_res``, start 0.7, step 0.1, 20 epochs per try); SpaGCN trained (louvain start, lr 0.05, 200
epochs, tol 5e-3); its predictions refined over each spot's array neighbours (``refine``: "hexagon"
on Visium, "square" on ST; imaging slides have no array, so no refinement). The tutorial's seeds
(r_seed = t_seed = n_seed = 100) are the run's seed. Labels: the refined ones; embedding: SpaGCN's
hidden representation z (what its clustering layer assigns).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import peer_io  # noqa: E402
import scanpy as sc  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import SpaGCN as spg  # noqa: E402
import torch  # noqa: E402

SHAPES = {"visium": "hexagon", "st": "square"}


def main() -> None:
    args = peer_io.arguments()
    adata = peer_io.read_slide(args)
    if sp.issparse(adata.X):  # SpaGCN calls X.A, which recent scipy no longer has
        adata.X = adata.X.toarray()
    x, y = adata.obsm["spatial"][:, 0].tolist(), adata.obsm["spatial"][:, 1].tolist()
    adj = spg.calculate_adj_matrix(x=x, y=y, histology=False)
    adata.var_names_make_unique()
    spg.prefilter_genes(adata, min_cells=3)
    spg.prefilter_specialgenes(adata)
    sc.pp.normalize_per_cell(adata)
    sc.pp.log1p(adata)
    l = spg.search_l(0.5, adj, start=0.01, end=1000, tol=0.01, max_run=100)  # noqa: E741 - SpaGCN's name
    seed = args.seed
    res = spg.search_res(adata, adj, l, args.n_domains, start=0.7, step=0.1, tol=5e-3, lr=0.05, max_epochs=20,
                         r_seed=seed, t_seed=seed, n_seed=seed)
    clf = spg.SpaGCN()
    clf.set_l(l)
    peer_io.fix_seed(seed, args.threads)
    clf.train(adata, adj, init_spa=True, init="louvain", res=res, tol=5e-3, lr=0.05, max_epochs=200)
    pred, _ = clf.predict()
    with torch.no_grad():
        z, _ = clf.model.predict(clf.embed, clf.adj_exp)
    shape = SHAPES.get(args.platform)
    labels = np.asarray(pred)
    if shape:
        labels = np.asarray(spg.refine(sample_id=adata.obs_names.tolist(), pred=pred.tolist(), dis=adj, shape=shape))
    peer_io.write_outputs(args, labels, z.detach().numpy(), {
        "clustering": f"SpaGCN (louvain start, resolution {res:.3f} from search_res)"
                      + (f", refined ({shape})" if shape else ", no refinement (imaging)"),
        "l": l, "resolution": res, "domains_before_refinement": int(len(np.unique(pred)))})


if __name__ == "__main__":
    main()
