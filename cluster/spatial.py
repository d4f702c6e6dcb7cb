"""Spatial-graph rules: which spots are neighbours, one registered class per rule.

In the style of squidpy's graph builders (``squidpy.gr.neighbors``: ``KNNBuilder``, ``RadiusBuilder``):
a rule is a frozen object holding its parameters, checked when it is made, that describes itself
in words (the run log's "spatial graph (6 nearest spots)") and builds the graph:
:meth:`SpatialRule.connectivities` gives the neighbours in squidpy's layout (symmetric CSR, 1 per
neighbour, empty diagonal; what :func:`semst.experiments.gr.spatial_graph` writes to
``adata.obsp``), :meth:`SpatialRule.build` the DGL graph SemST convolves over (each neighbour both
ways, each spot's own edge ``self_loops`` times).

A config names its rule in the ``[cluster.spatial]`` table (``rule = "knn"``, ``k = 6``), which
:mod:`semst.shared.config` holds as plain data (merged source over source, the old flat keys read
as the table); :func:`spatial_rule` turns it into the rule object, and is the one place that does.
Each rule checks its own parameters (a ConfigError naming the key), so a new rule is one class here
(or in the user's own module) registered with ``@register_spatial_rule``, and its test.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from semst.cluster.graphs import (
    GraphError,
    adaptive_radius,
    connectivities_of,
    graph_from_connectivities,
    median_spacing,
    spatial_connectivities,
)
from semst.shared.config import ClusterConfig, ConfigError, check_types

MAX_MEAN_DEGREE = 100  # spatial neighbours per spot above which a graph is refused (unless allow_dense)
TABLE = "cluster.spatial"  # where a rule's parameters are written, for the messages

SPATIAL_RULES: dict[str, type[SpatialRule]] = {}


def register_spatial_rule(cls: type[SpatialRule]) -> type[SpatialRule]:
    """Class decorator: make ``cls`` (a :class:`SpatialRule` subclass) the rule ``cls.name``. Its
    annotated attributes are its parameters: the class is made a frozen, keyword-only dataclass."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if not issubclass(cls, SpatialRule):
        raise ValueError(f"{cls.__name__} must subclass SpatialRule to be registered")
    if "__dataclass_fields__" not in cls.__dict__:
        cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    SPATIAL_RULES[cls.name] = cls
    return cls


class UnknownSpatialRuleError(ConfigError):
    """A rule name that no class is registered under."""


def spatial_rule_class(name: str) -> type[SpatialRule]:
    try:
        return SPATIAL_RULES[name]
    except KeyError:
        raise UnknownSpatialRuleError(f"[{TABLE}] rule = {name!r} is not a spatial-graph rule; known: "
                                      f"{', '.join(SPATIAL_RULES)}") from None


def spatial_rule(cfg: ClusterConfig | dict[str, Any]) -> SpatialRule:
    """The rule a config's ``[cluster.spatial]`` table (or such a table itself) names, its parameters
    checked; a ConfigError naming the key otherwise. The one place a config becomes a graph rule."""
    table = dict(cfg.spatial if isinstance(cfg, ClusterConfig) else cfg)
    name = table.pop("rule", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"[{TABLE}] names no rule (rule = \"knn\", k = 6, or one of {', '.join(SPATIAL_RULES)})")
    return spatial_rule_class(name).from_params(table)


def _positive(rule: SpatialRule, key: str) -> None:
    value = getattr(rule, key)
    if not value > 0:
        raise ConfigError(f"[{TABLE}] {key} must be > 0 (rule {rule.name!r}), got {value}")


def _at_least(rule: SpatialRule, key: str, low: int) -> None:
    value = getattr(rule, key)
    if value < low:
        raise ConfigError(f"[{TABLE}] {key} must be >= {low} (rule {rule.name!r}), got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpatialRule:
    """Base class: the settings every rule takes. Subclasses set ``name``, annotate their own
    parameters, and implement ``describe`` and ``connectivities`` (``check`` to check parameters,
    ``check_spots`` to refuse a slide too small for them)."""

    name: ClassVar[str] = ""
    self_loops: int = 1  # weight of a spot's own edge in the GCN's aggregation (the paper's radius graph: 2)
    allow_dense: bool = False  # build a graph denser than MAX_MEAN_DEGREE neighbours per spot

    def __post_init__(self):
        self.check()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SpatialRule:
        """The rule with ``params`` (a ``[cluster.spatial]`` table less ``rule``), each key known and
        of its parameter's type."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"[{TABLE}] rule {cls.name!r} takes {', '.join(known)}; not {', '.join(unknown)}")
        check_types(cls, params, TABLE)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in params
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"[{TABLE}] rule {cls.name!r} needs {', '.join(missing)}")
        return cls(**params)

    def check(self) -> None:
        """Refuse (ConfigError) parameters this rule cannot build a graph with."""
        _at_least(self, "self_loops", 1)

    def check_spots(self, n_spots: int) -> None:
        """Refuse (GraphError) a slide of ``n_spots`` too small for this rule, before any work."""

    @property
    def max_mean_degree(self) -> float | None:
        return None if self.allow_dense else MAX_MEAN_DEGREE

    def table(self) -> dict[str, Any]:
        """The rule as its ``[cluster.spatial]`` table."""
        return {"rule": self.name, **dataclasses.asdict(self)}

    def describe(self, coords) -> str:
        """The rule on this slide in words, for the run log."""
        raise NotImplementedError

    def connectivities(self, coords) -> sp.csr_matrix:
        """Which spots neighbour which, as squidpy lays it out (symmetric CSR, float32 1 per neighbour,
        empty diagonal; :func:`semst.cluster.graphs.symmetric_connectivities`)."""
        raise NotImplementedError

    def build(self, coords):
        """The DGL graph: every neighbour both ways, each spot's own edge ``self_loops`` times."""
        return graph_from_connectivities(self.connectivities(coords), self.self_loops)


def _too_few_spots(rule: SpatialRule, n_spots: int) -> None:
    if rule.k >= n_spots:
        raise GraphError(f"{n_spots} spots are too few for [{TABLE}] k = {rule.k} neighbours per spot (rule "
                         f"{rule.name!r}; at most {n_spots - 1}): set a smaller k")


@register_spatial_rule
class KNearest(SpatialRule):
    """Each spot's ``k`` nearest spots (and the spots that count it among theirs)."""

    name = "knn"
    k: int

    def check(self) -> None:
        super().check()
        _at_least(self, "k", 1)

    def check_spots(self, n_spots: int) -> None:
        _too_few_spots(self, n_spots)

    def describe(self, coords) -> str:
        return f"{self.k} nearest spots"

    def connectivities(self, coords) -> sp.csr_matrix:
        return spatial_connectivities(coords, k=self.k, max_mean_degree=self.max_mean_degree)


@register_spatial_rule
class Radius(SpatialRule):
    """Spots within ``radius`` of each other, in the coordinates' own units."""

    name = "radius"
    radius: float

    def check(self) -> None:
        super().check()
        _positive(self, "radius")

    def describe(self, coords) -> str:
        return f"radius {self.radius:g}"

    def connectivities(self, coords) -> sp.csr_matrix:
        return spatial_connectivities(coords, radius=self.radius, max_mean_degree=self.max_mean_degree)


@register_spatial_rule
class RadiusInSpacings(SpatialRule):
    """Spots within ``spacings`` x the slide's median nearest-neighbour distance of each other: one
    rule for a slide in pixels, micrometres or array units alike (the paper's DLPFC radius of 560
    px is ~4.1 spot spacings)."""

    name = "radius_spacings"
    spacings: float

    def check(self) -> None:
        super().check()
        _positive(self, "spacings")

    def describe(self, coords) -> str:
        spacing = median_spacing(coords)
        return f"radius {self.spacings:g} x spacing {spacing:.4g} = {self.spacings * spacing:.4g}"

    def connectivities(self, coords) -> sp.csr_matrix:
        radius = self.spacings * median_spacing(coords)
        return spatial_connectivities(coords, radius=radius, max_mean_degree=self.max_mean_degree)


@register_spatial_rule
class AdaptiveThreshold(SpatialRule):
    """The authors' adaptive threshold (MBA / HBC; :func:`semst.cluster.graphs.adaptive_radius`):
    the smallest multiple of ``step_spacings`` spot spacings at which every spot has >= 2 neighbours
    and some spot > k - 1, as a radius."""

    name = "adaptive"
    k: int
    step_spacings: float = 5.0 / 137.0  # the authors' 5 px step, in Visium spot spacings

    def check(self) -> None:
        super().check()
        _at_least(self, "k", 1)
        _positive(self, "step_spacings")

    def check_spots(self, n_spots: int) -> None:
        _too_few_spots(self, n_spots)

    def describe(self, coords) -> str:
        return f"the authors' adaptive threshold (k {self.k})"

    def connectivities(self, coords) -> sp.csr_matrix:
        radius = adaptive_radius(coords, self.k, self.step_spacings * median_spacing(coords))
        return spatial_connectivities(coords, radius=radius, max_mean_degree=self.max_mean_degree)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GivenGraph(SpatialRule):
    """A graph built elsewhere (``squidpy.gr.spatial_neighbors``, ``semst.gr.spatial_graph``): spots
    i and j neighbour each other where ``matrix`` (n x n, sparse or dense, weights ignored) has an
    entry either way. Not registered: a config file cannot name it; ``semst.domains(...,
    connectivity_key=...)`` makes one. ``self_loops`` are the config rule's; no density guard (the
    user built this graph on purpose)."""

    name = "given"
    matrix: Any
    source: str = "a given graph"  # where it came from, for the log (e.g. adata.obsp['spatial_connectivities'])

    def check(self) -> None:
        super().check()
        if not (sp.issparse(self.matrix) or isinstance(self.matrix, np.ndarray)) or len(self.matrix.shape) != 2 \
                or self.matrix.shape[0] != self.matrix.shape[1]:
            raise ConfigError(f"{self.source} must be a square (n_spots x n_spots) matrix, got "
                              f"{type(self.matrix).__name__} of shape {getattr(self.matrix, 'shape', None)}")
        values = self.matrix.data if sp.issparse(self.matrix) else self.matrix
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool) or not np.isfinite(values).all():
            raise ConfigError(f"{self.source} must hold finite numbers (its non-zero entries are the edges)")

    def check_spots(self, n_spots: int) -> None:
        if self.matrix.shape[0] != n_spots:
            raise GraphError(f"{self.source} is {self.matrix.shape[0]} x {self.matrix.shape[1]} but the slide has "
                             f"{n_spots} spots: build the graph on this AnnData (same spots, same order)")

    def table(self) -> dict[str, Any]:
        return {"rule": self.name, "source": self.source, "self_loops": self.self_loops}

    def describe(self, coords) -> str:
        return self.source

    def connectivities(self, coords) -> sp.csr_matrix:
        self.check_spots(len(coords))
        return connectivities_of(self.matrix)
