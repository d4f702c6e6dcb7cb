"""`semst experiment GRID`: the paper's tables and figures from a declared grid, on one shared cache.

A grid (TOML; the format is documented at the top of ``experiments/paper.toml``, parsed by
:mod:`experiments.schema`) declares datasets, seeds, methods ("variants": a registered method of
:mod:`semst.cluster.methods`, named by ``backbone``, plus overrides of the stage configs), and which
tables and figures compare which methods. Every (dataset, variant) cell (:mod:`experiments.cells`)

1. resolves its configs from the dataset's own config + the grid's and the variant's overrides
   (epochs and every other setting not overridden stay the dataset's),
2. makes sure its semantic embeddings are in the shared cache by calling stage 1 itself
   (:func:`semst.embed.run.embed_dataset`, or :mod:`semst.embed.sentence_encoder`), which computes only prompts
   that are not cached -- so a second run of the same grid computes no embedding,
3. runs its method for every seed (:func:`semst.cluster.methods.run_method`),
4. is written to ``<out>/cells/<dataset>/<variant>.json`` (+ its domains as Parquet; :mod:`experiments.store`)
   with its wall time. A later run reuses a cell whose settings are unchanged (``resume=False`` runs it again).

Then the figures are drawn (:mod:`experiments.figures`) and ``<out>/REPORT.md`` is written
(:mod:`experiments.assemble`, :mod:`experiments.report`). A dataset that cannot be loaded (not
available here, or refused by the count loader like seqfish-cortex's normalised values) is skipped
and the report says why; a cell that fails is reported as failed and the grid goes on.

This module runs the grid; the names other modules import from it (``load_grid``, ``cell_config``,
...) are re-exported from the modules above.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from semst.experiments.assemble import describe_variant, write_experiment_report
from semst.experiments.cells import (
    EmbedStep,
    cell_config,
    cell_method_settings,
    cell_settings,
    embedding_identity,
    encoder_name,
    now,
    run_cell,
    uses_semantic,
)
from semst.experiments.figures import draw_figure
from semst.experiments.schema import (
    FIGURE_KINDS,
    ExperimentError,
    FigureSpec,
    Grid,
    TableSpec,
    Variant,
    load_grid,
    parse_grid,
    restrict_datasets,
    restrict_variants,
)
from semst.experiments.store import load_cell, save_cell, write_spots
from semst.shared.config import ClusterConfig
from semst.shared.hashing import json_hash

__all__ = ["ExperimentError", "ExperimentOutcome", "FIGURE_KINDS", "FigureSpec", "Grid", "TableSpec", "Variant",
           "cell_config", "cell_method_settings", "cell_settings", "describe_variant", "draw_figure",
           "embedding_identity", "encoder_name", "load_available_slide", "load_grid", "parse_grid",
           "restrict_datasets", "restrict_variants", "run_cell", "run_experiment", "uses_semantic",
           "write_experiment_report"]


@dataclass
class ExperimentOutcome:
    report: Path
    cells: list
    skipped: dict[str, str]

    @property
    def n_failed(self) -> int:
        return sum(1 for c in self.cells if c.status != "ok")


def load_available_slide(dataset: str):
    """(AnnData, None) or (None, why the grid skips ``dataset``): the one place a grid loads a slide."""
    from semst.shared.datasets import DatasetError, load_dataset

    try:
        return load_dataset(dataset), None
    except DatasetError as exc:
        return None, str(exc)


def _same_embeddings(previous, cfg: ClusterConfig) -> bool:
    """A reused cell must have used the embeddings the cache holds now (same model weights, space)."""
    if previous.embedding is None:
        return True
    try:
        return embedding_identity(cfg) == previous.embedding
    except Exception:  # noqa: BLE001 - no spot table (yet): run the cell, which will make it
        return False


def run_experiment(grid: str | Path | Grid, cache: str | Path | None = None, out_dir: str | Path | None = None,
                   resume: bool = True, progress: bool = True, log=print,
                   report_only: bool = False) -> ExperimentOutcome:
    """Run every cell of ``grid`` (a path or a :class:`Grid`) and write ``<out>/REPORT.md``.

    ``cache`` overrides the grid's cache (default: the stage configs' shared cache); ``out_dir``
    overrides ``[grid] out``. With ``resume`` a cell already finished with identical settings by an
    earlier run is reused (the report says so); otherwise every cell runs again. ``report_only``:
    run nothing, write the report of the cells finished so far with identical settings (a grid of
    hours, read while it runs); the others are absent from its tables.
    """
    from semst.cluster.seeds import annotation

    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    out = Path(out_dir if out_dir is not None else grid.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache if cache is not None else grid.cache
    embed_step = EmbedStep(progress, log)
    cells: list = []
    skipped: dict[str, str] = {}
    datasets_info: dict[str, dict] = {}
    total = len(grid.datasets) * len(grid.variants)
    done = 0
    for dataset in grid.datasets:
        adata, why = load_available_slide(dataset)
        if adata is None:
            skipped[dataset] = why
            done += len(grid.variants)
            log(f"{dataset}: skipped ({why})")
            continue
        truth = annotation(adata)
        datasets_info[dataset] = {"n_spots": int(adata.n_obs), "n_domains": int(truth.dropna().nunique()) or None}
        write_spots(out, dataset, adata, truth)
        for variant in grid.variants:
            done += 1
            if report_only:
                cfg = cell_config(grid, variant, dataset, cache)
                previous = _finished_cell(out, dataset, variant, cfg, json_hash(cell_settings(grid, variant, cfg)))
                if previous is not None:
                    cells.append(previous)
                continue
            cells.append(_run_or_reuse(grid, variant, dataset, adata, out, cache, resume, embed_step,
                                       f"[{done}/{total}] {dataset} / {variant.name}", progress, log))
    report = write_experiment_report(grid, out, cells, skipped, datasets_info, cache, log=log)
    log(f"report: {report}")
    return ExperimentOutcome(report=report, cells=cells, skipped=skipped)


def _finished_cell(out: Path, dataset: str, variant: Variant, cfg: ClusterConfig, config_hash: str):
    """The cell an earlier run finished with these settings (marked reused), or None."""
    previous = load_cell(out, dataset, variant.name)
    if (previous is not None and previous.status == "ok" and previous.config_hash == config_hash
            and _same_embeddings(previous, cfg)):
        previous.reused = True
        return previous
    return None


def _run_or_reuse(grid: Grid, variant: Variant, dataset: str, adata, out: Path, cache, resume: bool,
                  embed_step: EmbedStep, head: str, progress: bool, log):
    """The cell's result: reused from an earlier run with identical settings, else run (and saved)."""
    from semst.experiments.report import CellResult

    cfg = cell_config(grid, variant, dataset, cache)
    config_hash = json_hash(cell_settings(grid, variant, cfg))
    if resume:
        previous = _finished_cell(out, dataset, variant, cfg, config_hash)
        if previous is not None:
            log(f"{head}: reused the result of {previous.finished}")
            return previous
    log(f"{head}: running")
    t0 = time.perf_counter()
    try:
        cell, labels = run_cell(grid, variant, dataset, adata, cache, embed_step, progress, log)
    except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the grid
        cell = CellResult(dataset=dataset, variant=variant.name, status="failed",
                          n_spots=int(adata.n_obs), wall_seconds=round(time.perf_counter() - t0, 2),
                          error=f"{type(exc).__name__}: {exc}", config_hash=config_hash, finished=now())
        labels = {}
        log(f"{head}: FAILED\n{traceback.format_exc()}")
    save_cell(out, cell, labels, adata.obs_names.astype(str))
    if cell.status == "ok":
        log(f"{head}: {cell.wall_seconds:.1f} s, {cell.prompts_computed} embeddings computed; "
            + ", ".join(f"{k} {v['mean']:.2f} ± {v['sd']:.2f}" for k, v in cell.summary.items()
                        if k in ("ARI", "NMI")))
    return cell
