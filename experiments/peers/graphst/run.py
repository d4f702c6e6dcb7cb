"""GraphST 1.1.1 on one slide, one seed: its own model with its defaults, clustered without R.

Its tutorials: ``GraphST(adata, device=cpu, random_seed=seed)`` with its preprocessing (3000 seurat_v3
HVGs, normalize_total, log1p, scale) and defaults (600 epochs, lr 0.001, 64-wide output, datatype
"10X": the dense spatial graph of 3 neighbours; its tutorials keep "Stereo"/"Slide" for Stereo-seq and
Slide-seq, which no local slide is), then ``clustering`` of the 20 principal components of its
embedding. The tutorials cluster with R's mclust (EEE), which is not available here, so this uses
its own alternative: ``clustering(method="leiden")``, which searches the Leiden resolution from 3.0
down in steps of 0.01 until it gives the number of domains; where no resolution does (its search
then fails), k-means (10 starts, the run's seed) on the same 20 components. Its DLPFC tutorial
refines the domains over 50 neighbours (``refinement=True``); Visium slides get that, the others not
(as in its other tutorials). Labels: those domains; embedding: the 20 components ("emb_pca").

With ``--semantic FILE`` (method "graphst-fsm", Table 3): semst's FSM inside GraphST's own model. Its
encoder class is subclassed, not copied: each spot's LLM vector e goes through semst's head and
modulation MLP (e -> d/2 -> 64 -> 1.2 x 64 -> alpha, beta) and the encoder's input becomes
``(1 + alpha) * x + beta`` for the real view and, for the corrupted view GraphST contrasts against, the
vectors of the spots whose features it shuffled in. In semst the FSM acts on the GCN's output; here on
the encoder's input, because GraphST's encoder computes its hidden layer inside one ``forward`` with
no module to hook. The FSM's layers are created after GraphST's own, so its weights start as in the
plain run of the same seed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import peer_io  # noqa: E402
import torch  # noqa: E402
from GraphST import GraphST  # noqa: E402
from GraphST.utils import clustering, refine_label  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

RADIUS = 50
FSM_HIDDEN_RATIO = 1.2  # semst's fsm_hidden_ratio


def insert_fsm(semantic: np.ndarray) -> None:
    """Make GraphST build its encoder with semst's FSM in front (see the module docstring)."""
    import GraphST.GraphST as package
    from GraphST.model import Encoder
    from torch import nn

    vectors = torch.from_numpy(semantic)
    shuffled = {"ids": torch.arange(len(semantic))}

    def permutation(feature):
        # GraphST's own corruption (the same draw from numpy's generator), remembering which spot's
        # features each row got so the corrupted view carries their semantic vectors too.
        ids = np.random.permutation(np.arange(feature.shape[0]))
        shuffled["ids"] = torch.from_numpy(ids)
        return feature[ids]

    class FSMEncoder(Encoder):
        def __init__(self, in_features, out_features, graph_neigh, **kwargs):
            super().__init__(in_features, out_features, graph_neigh, **kwargs)
            d = vectors.shape[1]
            self.llm_head = nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, out_features))
            hidden = max(1, int(out_features * FSM_HIDDEN_RATIO))
            self.fsm = nn.Sequential(nn.Linear(out_features, hidden), nn.ReLU(), nn.Linear(hidden, 2 * in_features))

        def modulate(self, x, e):
            alpha, beta = torch.chunk(self.fsm(self.llm_head(e)), 2, dim=1)
            return (1 + alpha) * x + beta

        def forward(self, feat, feat_a, adj):
            return super().forward(self.modulate(feat, vectors), self.modulate(feat_a, vectors[shuffled["ids"]]), adj)

    package.Encoder = FSMEncoder
    package.permutation = permutation


def main() -> None:
    args = peer_io.arguments()
    adata = peer_io.read_slide(args)
    if adata.n_vars <= 3000:  # seurat_v3 cannot select more genes than there are: take them all
        adata.var["highly_variable"] = True
        import scanpy as sc

        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.scale(adata, zero_center=False, max_value=10)
    semantic = peer_io.read_semantic(args, adata.n_obs)
    if semantic is not None:
        insert_fsm(semantic)
    model = GraphST.GraphST(adata, device=torch.device("cpu"), random_seed=args.seed)
    adata = model.train()
    refine = args.platform == "visium"
    try:
        clustering(adata, args.n_domains, radius=RADIUS, method="leiden", refinement=refine)
        how = "its leiden search to k"
    except AssertionError:  # no resolution in its range gives k domains
        km = KMeans(args.n_domains, n_init=10, random_state=args.seed).fit(adata.obsm["emb_pca"])
        adata.obs["domain"] = km.labels_.astype(str)
        if refine:
            adata.obs["domain"] = refine_label(adata, RADIUS, key="domain")
        how = "k-means (its leiden search found no resolution giving k)"
    how += f", refined over {RADIUS} neighbours" if refine else ", no refinement"
    peer_io.write_outputs(args, adata.obs["domain"].astype(str).to_numpy(), np.asarray(adata.obsm["emb_pca"]),
                          {"clustering": f"GraphST: {how} (its tutorials use R's mclust)",
                           "fsm": "semst's FSM on the encoder's input" if semantic is not None else "none"})


if __name__ == "__main__":
    main()
