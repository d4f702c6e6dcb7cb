"""Fusions: every registered fusion keeps the contract SemST relies on, and a new one is one class."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from semst.cluster.fusion import FUSIONS, Fusion, UnknownFusionError, fusion_class, register_fusion
from semst.cluster.graphs import expression_graph, spatial_graph
from semst.cluster.network import SemST
from semst.cluster.train import train_semst
from semst.shared.config import ClusterConfig


@pytest.fixture(scope="module")
def slide():
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(10), np.arange(8)), -1).reshape(-1, 2).astype(float)
    counts = rng.poisson(rng.uniform(1, 6, 20), size=(80, 20)).astype(np.float32)
    features = np.log1p(counts).astype(np.float32)
    return dict(features=features, counts=sp.csr_matrix(counts), size_factors=np.ones(80, np.float32),
                spatial=spatial_graph(coords, k=4), expression=expression_graph(features, 5),
                semantic=rng.normal(size=(80, 16)).astype(np.float32))


def train(slide, fusion: str, **kw):
    cfg = ClusterConfig.from_flat(dataset="toy", spatial={"rule": "knn", "k": 4}, hidden1=16, hidden2=8, epochs=3,
                                  fusion=fusion, **kw)
    return train_semst(slide["features"], slide["counts"], slide["size_factors"], slide["spatial"],
                       slide["expression"], slide["semantic"], cfg.model, cfg.loss, cfg.train, 0, progress=False)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_every_registered_fusion_gives_its_declared_width_and_trains(slide, name):
    fusion = fusion_class(name)(16, 8)
    z, s = torch.randn(5, 16), torch.randn(5, 8)
    assert fusion(z, s if fusion.uses_semantic else None).shape == (5, fusion.output_width)
    result = train(slide, name)
    assert result.latent.shape == (80, 8) and np.isfinite(result.history["total"]).all()


def test_an_unknown_fusion_names_the_known_ones():
    with pytest.raises(UnknownFusionError, match="unknown fusion 'sum'; known: .*film"):
        fusion_class("sum")


def test_the_fsm_reports_its_change_per_epoch_unless_it_is_the_published_one(slide):
    assert "film_change" in train(slide, "film", fsm_mode="zero-init").history
    assert "film_change" not in train(slide, "film", fsm_mode="paper").history
    assert "film_change" in train(slide, "film", fsm_mode="paper").report  # reported once per run


class ScaleFusion(Fusion):
    """A toy fusion: Z_gcn scaled per spot by a learned function of the semantic vector."""

    name = "toy-scale"

    def __init__(self, width, sem_width, **settings):
        super().__init__(width, sem_width)
        self.scale = torch.nn.Linear(sem_width, 1)

    def forward(self, z, s):
        self.last_mean = float(self.scale(s).detach().mean())
        return z * (1 + self.scale(s))

    def stat_parts(self):
        return (self.last_mean,)

    def stats_from_parts(self, parts):
        return {"toy_scale": parts[0]}


def test_a_new_fusion_is_one_registered_class(slide):
    register_fusion(ScaleFusion)
    try:
        model = SemST(20, 16, hidden1=16, hidden2=8, fusion="toy-scale")
        assert isinstance(model.fuse, ScaleFusion)
        result = train(slide, "toy-scale")
        assert np.isfinite(result.latent).all() and "toy_scale" in result.report
        blockwise = train(slide, "toy-scale", minibatch="on", batch_spots=30)
        assert np.isfinite(blockwise.latent).all() and "toy_scale" in blockwise.report
    finally:
        FUSIONS.pop("toy-scale")
