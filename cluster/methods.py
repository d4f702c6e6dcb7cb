"""Stage-2 methods: what turns one slide into the latent that k-means clusters, one class per method.

A method is built from the slide (:class:`semst.cluster.seeds.Slide`: the checked AnnData, its
``ClusterConfig`` as ``slide.cfg``, preprocessing and spatial graph, computed once) and its own
settings (an instance of ``settings_class``, filled from the grid's table named ``settings_key``,
e.g. ``[stagate]``); ``fit(seed)`` returns what the per-seed runner
(:func:`semst.cluster.seeds.run_seeds`) needs: an object with ``latent`` (spots x d) and,
optionally, ``history`` (per-epoch losses) and ``report`` (extras recorded per seed). Work shared
by every seed is done once in the constructor and its time put in ``fixed_seconds``.

Registered by name (``@register_method``), a method is what a grid variant's ``backbone`` names;
the grid asks the registry which methods exist, which settings each takes and whether it reads
semantic vectors. A new method -- one of ours, or an adapter that runs another tool -- is one
class and its test: here, where ``semst experiment`` sees it, or in the user's own module,
registered before they call :func:`semst.experiments.grid.run_experiment` from Python.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import numpy as np

from semst.cluster.baselines import BaselineSettings, FixedLatent, graph_adjacency, pca_embedding, smooth_over_graph
from semst.cluster.seeds import ClusterError, ClusterReport, Slide, check_neighbour_counts, load_slide, run_seeds
from semst.cluster.stagate import StagateConfig, StagateError
from semst.shared.config import ClusterConfig, ConfigError

METHODS: dict[str, type[Method]] = {}
DEFAULT_METHOD = "semst"  # what a grid variant without a backbone runs


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if (cls.settings_key is None) != (cls.settings_class is None):
        raise ValueError(f"{cls.__name__}: settings_key and settings_class go together (both set or neither)")
    if cls.settings_class is not None and not dataclasses.is_dataclass(cls.settings_class):
        raise ValueError(f"{cls.__name__}: settings_class must be a dataclass (the grid checks its fields' types)")
    METHODS[cls.name] = cls
    return cls


class UnknownMethodError(ConfigError):
    """A method name that no class is registered under."""


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


class Method:
    """Base class. Subclasses set ``name`` (and, if they take settings of their own, ``settings_key``
    and ``settings_class``, a dataclass whose defaults are the method's), and implement ``fit``."""

    name: ClassVar[str] = ""
    reads_semantic: ClassVar[bool] = False  # True: reads each spot's semantic vector unless fusion is "none"
    settings_key: ClassVar[str | None] = None  # the grid's table of this method's own settings
    settings_class: ClassVar[type | None] = None

    def __init__(self, slide: Slide, settings: Any = None, *, progress: bool = False, log=print):
        self.slide = slide
        self.cfg: ClusterConfig = slide.cfg
        self.settings = settings if settings is not None else self.configure(slide.cfg)
        self.progress = progress
        self.log = log
        self.fixed_seconds = 0.0  # work shared by every seed, added to each seed's time

    @classmethod
    def configure(cls, cfg: ClusterConfig, values: dict | None = None) -> Any:
        """This method's settings for ``cfg`` from its settings table (grid-wide < variant); raises a
        ``ValueError`` (e.g. ConfigError) saying what to change if the method cannot run ``cfg``."""
        values = dict(values or {})
        if cls.settings_class is None:
            if values:
                raise ConfigError(f"method {cls.name!r} takes no settings of its own, got {', '.join(values)}")
            settings = None
        else:
            settings = cls.settings_class(**values)
        cls.check(cfg, settings)
        return settings

    @classmethod
    def check(cls, cfg: ClusterConfig, settings: Any) -> None:
        """Refuse (raise a ``ValueError``) a config this method cannot run; the default takes any."""

    @classmethod
    def uses_semantic(cls, cfg: ClusterConfig) -> bool:
        """Whether this method reads semantic vectors with ``cfg`` (so the grid embeds them first)."""
        return cls.reads_semantic and cfg.model.fusion != "none"

    @classmethod
    def describe(cls, own: dict) -> str:
        """The method in words for the report's list of methods, given a variant's own settings table."""
        return cls.name + (f" ({_listed(own)})" if own else "")

    def fit(self, seed: int):
        """The latent of one seed: an object with ``latent`` (and optionally ``history``, ``report``)."""
        raise NotImplementedError


def _listed(values: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in values.items())


def run_method(name: str, cfg: ClusterConfig, settings: Any = None, adata=None, progress: bool = False,
               log=print) -> ClusterReport:
    """Method ``name`` on ``cfg.dataset`` (or ``adata``) for every seed of ``cfg``: k-means, metrics, a report.

    ``settings`` default to the method's own (``configure(cfg)``); they are checked against ``cfg``
    before the slide is loaded.
    """
    cls = method_class(name)
    if settings is None:
        settings = cls.configure(cfg)
    else:
        cls.check(cfg, settings)
    slide = load_slide(cfg, adata)
    method = cls(slide, settings, progress=progress, log=log)
    return run_seeds(slide, method.fit, log=log, fixed_seconds=method.fixed_seconds)


class SemanticVectors:
    """The semantic vectors a method reads, per seed: read (or taken as ``given``) once for the first
    seed; the random control (``embedding = "random"``) is drawn again for every other seed."""

    def __init__(self, cfg: ClusterConfig, spot_ids: list[str], given: np.ndarray | None = None, adata=None,
                 config_path=None):
        from semst.cluster.run import check_embed_possible, semantic_embeddings

        self.cfg, self.spot_ids, self.config_path = cfg, spot_ids, config_path
        if given is not None and cfg.model.fusion != "none":
            given = np.asarray(given, dtype=np.float32)
            if given.ndim != 2 or given.shape[0] != len(spot_ids):
                raise ClusterError(f"semantic vectors of shape {given.shape} for {len(spot_ids)} spots")
            self.first, self.source = given, {"embedding": "given", "dim": int(given.shape[1])}
        else:
            if adata is not None:  # a setting no `semst embed` could satisfy is refused, not hinted at
                check_embed_possible(cfg, adata)
            self.first, self.source = semantic_embeddings(cfg, spot_ids, cfg.clustering.seeds[0], config_path, adata)

    def for_seed(self, seed: int) -> np.ndarray | None:
        from semst.cluster.run import semantic_embeddings

        if self.cfg.model.embedding == "random" and self.first is not None and seed != self.cfg.clustering.seeds[0]:
            return semantic_embeddings(self.cfg, self.spot_ids, seed, self.config_path)[0]
        return self.first


@register_method
class SemST(Method):
    """The SemST network (:mod:`semst.cluster.train`): two GCN views, the configured fusion of each
    spot's semantic vector, ZINB reconstruction; every setting is the ClusterConfig's.

    ``semantic`` (spots x d) gives the semantic vectors directly (e.g. from ``semst.encode``) instead
    of reading them from the cache. ``source`` says where they came from (for ``metrics.json``).
    """

    name = "semst"
    reads_semantic = True

    def __init__(self, slide: Slide, settings: Any = None, *, progress: bool = False, log=print,
                 semantic: np.ndarray | None = None, config_path=None):
        from semst.cluster.graphs import expression_graph, isolated_spots
        from semst.cluster.spatial import GivenGraph
        from semst.cluster.train import resolve_minibatch
        from semst.shared.preprocess import check_gene_supply

        super().__init__(slide, settings, progress=progress, log=log)
        cfg = self.cfg
        check_neighbour_counts(slide)  # SemST's graphs: more spots than neighbours
        check_gene_supply(slide.adata, cfg.preprocess)  # a recipe the slide cannot support stops here
        try:  # a forced mini-batch larger than the slide stops here, before any work
            resolve_minibatch(cfg.train, slide.adata.n_obs)
        except ValueError as exc:
            raise ClusterError(str(exc)) from None
        # Embeddings first: their absence is the most common mistake and the cheapest to report.
        self.semantic = SemanticVectors(cfg, slide.spot_ids, semantic, slide.adata, config_path)
        prep, sgraph = slide.prep, slide.spatial_graph
        started = time.perf_counter()
        graph = cfg.graph
        self.expression_graph = expression_graph(prep.X, graph.expr_k, graph.expr_pcs, graph.expr_knn, progress=progress)
        graph_seconds = time.perf_counter() - started
        n = slide.adata.n_obs
        alone = isolated_spots(sgraph)
        log(f"{cfg.dataset}: {n} spots, {prep.n_vars} genes, {slide.n_domains} domains; spatial graph "
            f"({slide.spatial.describe(slide.coords)}) {(sgraph.num_edges() - n) / n:.1f} neighbours per spot"
            + (f" ({alone} spots have none and keep only their own edge)" if alone else "") + ", "
            f"expression graph {self.expression_graph.num_edges()} edges ({graph_seconds:.1f} s); embedding "
            f"{self.semantic.source['embedding']}; {slide.threads} thread(s)")
        self.source = {**self.semantic.source, "threads": slide.threads}
        if isinstance(slide.spatial, GivenGraph):  # not the config's rule: metrics.json says which graph
            self.source["spatial_graph"] = slide.spatial.source

    @classmethod
    def describe(cls, own: dict) -> str:
        return "SemST network"

    def fit(self, seed: int):
        from semst.cluster.train import train_semst

        cfg, prep = self.cfg, self.slide.prep
        result = train_semst(prep.X, prep.layers["counts"], prep.obs["size_factor"].to_numpy(),
                             self.slide.spatial_graph, self.expression_graph, self.semantic.for_seed(seed),
                             cfg.model, cfg.loss, cfg.train, seed, progress=self.progress)
        self.source["training"] = result.mode
        trained = sum(v for k, v in result.seconds.items() if k != "graphs")
        self.log(f"seed {seed}: {result.mode}, {cfg.train.epochs} epochs in {trained:.1f} s "
                 f"({trained / max(cfg.train.epochs, 1):.2f} s/epoch) after {result.seconds.get('graphs', 0.0):.1f} s of set-up")
        return result


@register_method
class STAGATE(Method):
    """The STAGATE graph-attention autoencoder (:mod:`semst.cluster.stagate`), alone (fusion "none")
    or with the FSM modulating its embedding (fusion "film"); its own settings: ``[stagate]``."""

    name = "stagate"
    reads_semantic = True
    settings_key = "stagate"
    settings_class = StagateConfig

    def __init__(self, slide: Slide, settings: StagateConfig | None = None, *, progress: bool = False, log=print):
        super().__init__(slide, settings, progress=progress, log=log)
        cfg = self.cfg
        self.semantic = SemanticVectors(cfg, slide.spot_ids)
        prep, graph = slide.prep, slide.spatial_graph
        log(f"{cfg.dataset}: STAGATE{' + FSM' if self.semantic.first is not None else ''} on {prep.n_vars} genes, "
            f"{graph.num_edges()} spatial edges, {slide.n_domains} domains; embedding "
            f"{self.semantic.source['embedding']}")

    @classmethod
    def configure(cls, cfg: ClusterConfig, values: dict | None = None) -> StagateConfig:
        # The FSM's hidden width follows the config's, as SemST's does, unless [stagate] sets it.
        return super().configure(cfg, {"fsm_hidden_ratio": cfg.model.fsm_hidden_ratio, **(values or {})})

    @classmethod
    def check(cls, cfg: ClusterConfig, settings: Any) -> None:
        if cfg.model.fusion not in ("film", "none"):
            raise StagateError(f"STAGATE takes the FSM or nothing: fusion must be 'film' (STAGATE + FSM) or "
                               f"'none' (STAGATE), got {cfg.model.fusion!r}")

    @classmethod
    def describe(cls, own: dict) -> str:
        return "STAGATE graph-attention autoencoder" + (f" ({_listed(own)})" if own else "")

    def fit(self, seed: int):
        from semst.cluster.stagate import train_stagate

        return train_stagate(self.slide.prep.X, self.slide.spatial_graph, self.semantic.for_seed(seed),
                             self.settings, seed, progress=self.progress)


@register_method
class PcaKmeans(Method):
    """Baseline: k-means on the first principal components of the preprocessed expression (the HVG
    matrix SemST reads): no graph, no LLM. PCA is deterministic, so seeds vary k-means alone."""

    name = "pca-kmeans"
    settings_key = "baseline"
    settings_class = BaselineSettings

    def __init__(self, slide: Slide, settings: BaselineSettings | None = None, *, progress: bool = False,
                 log=print):
        super().__init__(slide, settings, progress=progress, log=log)
        t0 = time.perf_counter()
        self.fixed = FixedLatent(self.representation())
        self.fixed_seconds = time.perf_counter() - t0
        log(f"{self.cfg.dataset}: {self.name} on {self.fixed.latent.shape[1]} PCs of {slide.prep.n_vars} genes, "
            f"{slide.n_domains} domains")

    def representation(self) -> np.ndarray:
        return pca_embedding(self.slide.prep.X, self.settings.n_pcs)

    @classmethod
    def describe(cls, own: dict) -> str:
        return f"baseline: k-means on {BaselineSettings(**own).n_pcs} PCs of the preprocessed expression"

    def fit(self, seed: int) -> FixedLatent:
        return self.fixed  # the same representation for every seed: only k-means varies


@register_method
class PcaSpatialKmeans(PcaKmeans):
    """Baseline: the same principal components averaged over each spot's spatial neighbourhood
    (``hops`` times) before k-means: the simplest way to use the tissue layout."""

    name = "pca-spatial-kmeans"

    def representation(self) -> np.ndarray:
        return smooth_over_graph(super().representation(), graph_adjacency(self.slide.spatial_graph),
                                 self.settings.hops)

    @classmethod
    def describe(cls, own: dict) -> str:
        s = BaselineSettings(**own)
        return (f"{super().describe(own)} averaged over the spatial graph "
                f"({s.hops} hop{'s' if s.hops != 1 else ''})")

