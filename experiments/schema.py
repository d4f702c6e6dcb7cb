"""The grid file (TOML): its format, parsing and validation, and restricting a grid to some of it.

The format is documented at the top of ``experiments/paper.toml``. A variant's ``backbone`` names a
method of :mod:`semst.cluster.methods`; which methods exist, which settings table each reads (e.g.
``[stagate]``, a variant's ``baseline = {...}``) and whether it reads semantic vectors is asked of
that registry, so a new method needs no change here. Every cell's configs are resolved while
parsing, so a mistake is reported before anything runs, never hours into the grid.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semst.cluster.methods import DEFAULT_METHOD, METHODS, Method, method_class
from semst.experiments import peers as _peers  # noqa: F401 - registers the peer tools as methods
from semst.shared.config import ClusterConfig, ConfigError, EmbedConfig, available_configs, fits_type, section_hints
from semst.shared.errors import SemstError


class ExperimentError(SemstError, ValueError):
    """The grid cannot be run as written; the message says what is wrong and what to change."""


FIGURE_KINDS = ("domains", "umap", "k_genes")

_SECTIONS = {"grid", "embed", "cluster", "variant", "table", "figure"}  # + the methods' settings tables
_GRID_KEYS = {"name", "title", "description", "datasets", "seeds", "out", "cache", "dataset_configs"}
_VARIANT_KEYS = {"name", "label", "description", "backbone", "embed", "cluster", "encoder"}  # + its method's table
_TABLE_KEYS = {"name", "title", "caption", "variants"}
_FIGURE_KEYS = {"name", "title", "caption", "kind", "variants", "datasets"}
# Set by the grid itself, never by a variant: the dataset, the one shared cache, the seeds.
_FIXED = {"dataset", "cache", "preprocess", "embed", "seeds"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Variant:
    name: str
    label: str
    backbone: str = DEFAULT_METHOD  # the method's name in semst.cluster.methods.METHODS
    description: str = ""
    embed: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)
    method_settings: dict = field(default_factory=dict)  # its method's own table (e.g. stagate = {...})
    encoder: str | None = None  # the sentence encoder, with cluster.embedding = "sentence"

    @property
    def embedding(self) -> str:
        return self.cluster.get("embedding", "llm")

    @property
    def method(self) -> type[Method]:
        return method_class(self.backbone)


@dataclass
class TableSpec:
    name: str
    title: str
    variants: list[str]
    caption: str = ""


@dataclass
class FigureSpec:
    name: str
    kind: str
    title: str
    variants: list[str]
    datasets: list[str] | None = None  # None = every dataset that was run
    caption: str = ""


@dataclass
class Grid:
    path: Path
    name: str
    title: str
    datasets: list[str]
    seeds: list[int]
    variants: list[Variant]
    tables: list[TableSpec] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    out: str = "results/report"
    cache: str | None = None
    description: str = ""
    dataset_configs: dict[str, Path] = field(default_factory=dict)
    embed: dict = field(default_factory=dict)  # overrides for every variant
    cluster: dict = field(default_factory=dict)
    method_settings: dict[str, dict] = field(default_factory=dict)  # methods' tables for every variant, by key

    @property
    def stagate(self) -> dict:
        """The grid-wide ``[stagate]`` table."""
        return self.method_settings.get("stagate", {})

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


# -- parsing ------------------------------------------------------------------------------------------

def _where(path) -> str:
    return f"grid {path}"


def _check_keys(found: dict, allowed: set, what: str, path) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise ExperimentError(f"{_where(path)}: unknown key(s) in {what}: {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(allowed))}")


def _check_overrides(values: Any, cls, what: str, path) -> dict:
    """``values`` as a table of ``cls``'s fields (a dataclass), each of its field's type."""
    if not isinstance(values, dict):
        raise ExperimentError(f"{_where(path)}: {what} must be a table of settings, got {values!r}")
    hints = section_hints(cls)  # for [cluster], the old spatial-graph keys too (read as [cluster.spatial])
    allowed = set(hints) - _FIXED
    fixed = sorted(set(values) & _FIXED)
    if fixed:
        raise ExperimentError(f"{_where(path)}: {what} cannot set {', '.join(fixed)}: the grid sets the "
                              f"dataset, seeds ([grid] seeds) and the one shared cache ([grid] cache)")
    _check_keys(values, allowed, what, path)
    for key, value in values.items():
        if not fits_type(value, hints[key]):
            raise ExperimentError(f"{_where(path)}: {what}.{key} = {value!r} is not a valid "
                                  f"{getattr(hints[key], '__name__', hints[key])}")
    return dict(values)


def _str_list(value, what: str, path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ExperimentError(f"{_where(path)}: {what} must be a list of names, got {value!r}")
    return list(value)


def _name(value, what: str, path) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ExperimentError(f"{_where(path)}: {what} needs a name of letters, digits, '.', '_' or '-' "
                              f"(it names files), got {value!r}")
    return value


def _settings_tables(path) -> dict[str, list[type[Method]]]:
    """The methods' own settings tables a grid may hold: table name -> the registered methods reading it."""
    tables: dict[str, list[type[Method]]] = {}
    for cls in METHODS.values():
        if cls.settings_key:
            tables.setdefault(cls.settings_key, []).append(cls)
    clash = sorted(set(tables) & (_SECTIONS | _VARIANT_KEYS | _GRID_KEYS))
    if clash:
        raise ExperimentError(f"{_where(path)}: a registered method names its settings table {', '.join(clash)}, "
                              f"which the grid file uses for something else; give the method another settings_key")
    return tables


def _method_of(rv: dict, what: str, path) -> type[Method]:
    backbone = rv.get("backbone", DEFAULT_METHOD)
    if backbone not in METHODS:
        raise ExperimentError(f"{_where(path)}: {what} has backbone {backbone!r}; known methods: {', '.join(METHODS)}")
    return METHODS[backbone]


def _own_settings(rv: dict, method: type[Method], tables: dict, what: str, path) -> dict:
    """The variant's table of its method's own settings, type-checked; another method's table is refused."""
    for key in sorted(set(rv) & set(tables)):
        if key != method.settings_key:
            readers = ", ".join(repr(c.name) for c in tables[key])
            raise ExperimentError(f"{_where(path)}: {what}: '{key}' settings only apply to backbone {readers}, "
                                  f"not {method.name!r}")
    if method.settings_key is None:
        return {}
    return _check_overrides(rv.get(method.settings_key, {}), method.settings_class,
                            f"{what} {method.settings_key}", path)


def _grid_settings(data: dict, tables: dict, path) -> dict[str, dict]:
    """The grid-wide settings tables (e.g. ``[stagate]``), type-checked against every method reading them."""
    out = {}
    for key, readers in tables.items():
        if key in data:
            for kind in {c.settings_class for c in readers}:
                _check_overrides(data[key], kind, f"[{key}]", path)
            out[key] = dict(data[key])
    return out


def parse_grid(data: dict, path: str | Path = "<grid>") -> Grid:
    """A validated :class:`Grid` from parsed TOML; :class:`ExperimentError` says what is wrong."""
    path = Path(path)
    settings_tables = _settings_tables(path)
    _check_keys(data, _SECTIONS | set(settings_tables), "the file (top level)", path)
    g = data.get("grid")
    if not isinstance(g, dict):
        raise ExperimentError(f"{_where(path)}: no [grid] section (datasets, seeds, out)")
    _check_keys(g, _GRID_KEYS, "[grid]", path)
    dataset_configs = _dataset_configs(g, path)
    datasets = _datasets(g, dataset_configs, path)
    seeds = _seeds(g, path)
    embed = _check_overrides(data.get("embed", {}), EmbedConfig, "[embed]", path)
    cluster = _check_overrides(data.get("cluster", {}), ClusterConfig, "[cluster]", path)
    per_method = sorted({"fusion", "embedding"} & set(cluster))
    if per_method:
        raise ExperimentError(f"{_where(path)}: [cluster] sets {', '.join(per_method)} for every method; "
                              f"these define the methods, so set them in each [[variant]]'s cluster table")
    method_settings = _grid_settings(data, settings_tables, path)
    variants = _variants(data.get("variant", []), settings_tables, path)
    tables = _tables(data.get("table", []), variants, path)
    figures = _figures(data.get("figure", []), variants, datasets, path)
    grid = Grid(path=path, name=str(g.get("name", path.stem)), title=str(g.get("title", f"semst experiment: {path.stem}")),
                datasets=datasets, seeds=seeds, variants=variants, tables=tables, figures=figures,
                out=str(g.get("out", "results/report")), cache=g.get("cache"),
                description=str(g.get("description", "")), dataset_configs=dataset_configs,
                embed=embed, cluster=cluster, method_settings=method_settings)
    _resolve_every_cell(grid)
    return grid


def _dataset_configs(g: dict, path: Path) -> dict[str, Path]:
    raw = g.get("dataset_configs", {})
    if not isinstance(raw, dict):
        raise ExperimentError(f"{_where(path)}: [grid] dataset_configs must map dataset names to config files")
    configs = {}
    for ds, p in raw.items():
        cfg_path = (path.parent / p) if not Path(p).is_absolute() else Path(p)
        if not cfg_path.is_file():
            raise ExperimentError(f"{_where(path)}: the config of dataset {ds!r} ({cfg_path}) does not exist")
        configs[ds] = cfg_path
    return configs


def _datasets(g: dict, dataset_configs: dict, path: Path) -> list[str]:
    datasets = _str_list(g.get("datasets"), "[grid] datasets", path)
    if not datasets:
        raise ExperimentError(f"{_where(path)}: [grid] datasets is empty; list at least one dataset")
    known = set(available_configs()) | set(dataset_configs)
    unknown = [d for d in datasets if d not in known]
    if unknown:
        raise ExperimentError(f"{_where(path)}: unknown dataset(s) {', '.join(unknown)}: every dataset needs a "
                              f"config (shared/configs/<name>.toml or [grid] dataset_configs); known: "
                              f"{', '.join(sorted(known))}")
    if len(set(datasets)) != len(datasets):
        raise ExperimentError(f"{_where(path)}: a dataset is listed twice in [grid] datasets")
    return datasets


def _seeds(g: dict, path: Path) -> list[int]:
    seeds = g.get("seeds")
    if (not isinstance(seeds, list) or not seeds or
            not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ExperimentError(f"{_where(path)}: [grid] seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{_where(path)}: [grid] seeds repeats a seed: {seeds}")
    return list(seeds)


def _variants(raw_variants, settings_tables: dict, path: Path) -> list[Variant]:
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ExperimentError(f"{_where(path)}: no [[variant]] declared; a grid needs at least one method")
    variants: list[Variant] = []
    for i, rv in enumerate(raw_variants):
        if not isinstance(rv, dict):
            raise ExperimentError(f"{_where(path)}: [[variant]] #{i + 1} is not a table")
        _check_keys(rv, _VARIANT_KEYS | set(settings_tables), f"[[variant]] #{i + 1}", path)
        name = _name(rv.get("name"), f"[[variant]] #{i + 1}", path)
        what = f"variant {name!r}"
        if any(v.name == name for v in variants):
            raise ExperimentError(f"{_where(path)}: two variants are named {name!r}")
        method = _method_of(rv, what, path)
        v = Variant(name=name, label=str(rv.get("label", name)), backbone=method.name,
                    description=str(rv.get("description", "")),
                    embed=_check_overrides(rv.get("embed", {}), EmbedConfig, f"{what} embed", path),
                    cluster=_check_overrides(rv.get("cluster", {}), ClusterConfig, f"{what} cluster", path),
                    method_settings=_own_settings(rv, method, settings_tables, what, path),
                    encoder=rv.get("encoder"))
        _check_variant(v, path)
        variants.append(v)
    return variants


def _tables(raw_tables, variants: list[Variant], path: Path) -> list[TableSpec]:
    names = {v.name for v in variants}
    tables = []
    for i, rt in enumerate(raw_tables):
        _check_keys(rt, _TABLE_KEYS, f"[[table]] #{i + 1}", path)
        tname = _name(rt.get("name"), f"[[table]] #{i + 1}", path)
        tv = _str_list(rt.get("variants"), f"table {tname!r} variants", path)
        _known_variants(tv, names, f"table {tname!r}", path)
        tables.append(TableSpec(tname, str(rt.get("title", tname)), tv, str(rt.get("caption", ""))))
    _unique_names(tables, "table", path)
    return tables


def _figures(raw_figures, variants: list[Variant], datasets: list[str], path: Path) -> list[FigureSpec]:
    by_name = {v.name: v for v in variants}
    figures = []
    for i, rf in enumerate(raw_figures):
        _check_keys(rf, _FIGURE_KEYS, f"[[figure]] #{i + 1}", path)
        fname = _name(rf.get("name"), f"[[figure]] #{i + 1}", path)
        kind = rf.get("kind")
        if kind not in FIGURE_KINDS:
            raise ExperimentError(f"{_where(path)}: figure {fname!r} has kind {kind!r}; known: {', '.join(FIGURE_KINDS)}")
        fv = _str_list(rf.get("variants"), f"figure {fname!r} variants", path)
        _known_variants(fv, set(by_name), f"figure {fname!r}", path)
        fds = rf.get("datasets")
        if fds is not None:
            fds = _str_list(fds, f"figure {fname!r} datasets", path)
            outside = [d for d in fds if d not in datasets]
            if outside:
                raise ExperimentError(f"{_where(path)}: figure {fname!r} shows dataset(s) {', '.join(outside)} "
                                      f"that are not in [grid] datasets")
        spec = FigureSpec(fname, kind, str(rf.get("title", fname)), fv, fds, str(rf.get("caption", "")))
        _check_figure(spec, by_name, path)
        figures.append(spec)
    _unique_names(figures, "figure", path)
    return figures


def _unique_names(specs: list, what: str, path: Path) -> None:
    seen = [s.name for s in specs]
    if len(set(seen)) != len(seen):
        raise ExperimentError(f"{_where(path)}: two {what}s share a name")


def _resolve_every_cell(grid: Grid) -> None:
    """Every cell's configs and method settings must resolve now, not hours into the run."""
    from semst.cluster.fusion import fusion_class
    from semst.cluster.spatial import spatial_rule
    from semst.experiments.cells import cell_config, cell_method_settings

    for v in grid.variants:
        for ds in grid.datasets:
            try:
                cfg = cell_config(grid, v, ds)
                fusion_class(cfg.model.fusion)  # a registered fusion (the registry's names)
                spatial_rule(cfg)  # the [cluster.spatial] table is checked by its rule's class
                cell_method_settings(grid, v, cfg)
            except (ConfigError, ValueError) as exc:
                if isinstance(exc, ExperimentError):
                    raise
                raise ExperimentError(f"{_where(grid.path)}: variant {v.name!r} on {ds}: {exc}") from None


def _known_variants(listed: list[str], names: set[str], what: str, path) -> None:
    if not listed:
        raise ExperimentError(f"{_where(path)}: {what} lists no variants")
    missing = [n for n in listed if n not in names]
    if missing:
        raise ExperimentError(f"{_where(path)}: {what} lists undeclared variant(s) {', '.join(missing)}")


def _check_variant(v: Variant, path) -> None:
    what = f"{_where(path)}: variant {v.name!r}"
    method = v.method
    if v.embedding == "sentence":
        if not method.reads_semantic:
            raise ExperimentError(f"{what}: embedding 'sentence' needs a backbone that reads semantic vectors; "
                                  f"{v.backbone!r} reads none")
        if v.encoder is not None and not isinstance(v.encoder, str):
            raise ExperimentError(f"{what}: encoder must be a name or a directory, got {v.encoder!r}")
    elif v.encoder is not None:
        raise ExperimentError(f"{what}: 'encoder' is only used with cluster.embedding = \"sentence\"")
    if not method.reads_semantic:
        set_keys = (["embed"] if v.embed else []) + sorted(k for k in ("fusion", "embedding") if k in v.cluster)
        if set_keys:
            raise ExperimentError(f"{what}: backbone {v.backbone!r} uses no semantic embedding; drop "
                                  f"{', '.join(set_keys)}")


def _check_figure(spec: FigureSpec, variants: dict[str, Variant], path) -> None:
    what = f"{_where(path)}: figure {spec.name!r}"
    for name in spec.variants:
        v = variants[name]
        if spec.kind == "umap":
            if not v.method.reads_semantic or v.cluster.get("fusion", "film") == "none":
                raise ExperimentError(f"{what}: a UMAP shows a variant's semantic embeddings, and {name!r} has none")
        if spec.kind == "k_genes" and not v.method.reads_semantic:
            raise ExperimentError(f"{what}: the k_g sweep compares variants that read the prompts' embeddings; "
                                  f"{name!r} is {v.backbone}, which reads none")


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"grid file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"grid {path} is not valid TOML: {exc}") from None
    return parse_grid(data, path)


def restrict_datasets(grid: Grid, datasets: list[str]) -> Grid:
    """The same grid on a subset of its datasets (e.g. only the one a user cares about)."""
    outside = [d for d in datasets if d not in grid.datasets]
    if not datasets or outside:
        raise ExperimentError(f"{_where(grid.path)}: --datasets must name datasets of the grid "
                              f"({', '.join(grid.datasets)}); not in it: {', '.join(outside) or '(none given)'}")
    figures = [dataclasses.replace(f, datasets=None if f.datasets is None else
                                   [d for d in f.datasets if d in datasets]) for f in grid.figures]
    return dataclasses.replace(grid, datasets=[d for d in grid.datasets if d in datasets], figures=figures)


def restrict_variants(grid: Grid, names: list[str]) -> Grid:
    """The same grid with a subset of its variants, e.g. the cheap ones first on a busy machine.

    Cells are kept per (dataset, variant), so a later run of the whole grid reuses what this one
    finished. Tables and figures keep the variants that are left; one left with none is dropped.
    """
    known = [v.name for v in grid.variants]
    outside = [n for n in names if n not in known]
    if not names or outside:
        raise ExperimentError(f"{_where(grid.path)}: --variants must name variants of the grid "
                              f"({', '.join(known)}); not in it: {', '.join(outside) or '(none given)'}")
    kept = [v for v in grid.variants if v.name in names]
    tables = [dataclasses.replace(t, variants=[n for n in t.variants if n in names]) for t in grid.tables]
    figures = [dataclasses.replace(f, variants=[n for n in f.variants if n in names]) for f in grid.figures]
    return dataclasses.replace(grid, variants=kept, tables=[t for t in tables if t.variants],
                               figures=[f for f in figures if f.variants])
