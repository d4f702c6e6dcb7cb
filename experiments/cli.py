"""The `semst` command: a thin layer over the library API (semst.shared.datasets, semst.embed.run, semst.cluster.run).

Stage modules are imported inside each command so `semst cache info` never pays for importing
vLLM or DGL. Every expected failure (bad input, missing files, wrong cache) becomes one clear
line on stderr and a non-zero exit; anything else is a bug and keeps its traceback. Ctrl-C and
SIGTERM stop any command cleanly (semst.shared.interrupt) with exit 130 and 143.
"""
from __future__ import annotations

from pathlib import Path

import click

from semst.shared.config import ConfigError
from semst.shared.errors import SemstError
from semst.shared.paths import default_cache


class SemstGroup(click.Group):
    def invoke(self, ctx):
        from semst.shared.interrupt import Interrupted, stop_on_signals

        try:
            # SIGINT and SIGTERM become Interrupted: every clean-up runs, then exit 130 / 143.
            with stop_on_signals():
                return super().invoke(ctx)
        except Interrupted as stop:
            click.echo(stop.message(), err=True)
            ctx.exit(stop.exit_code)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # only the expected ones are turned into a clean message
            if isinstance(exc, SemstError):  # expected: bad input or a missing prerequisite
                click.echo(f"error: {exc}", err=True)
                ctx.exit(2)
            raise


cache_option = click.option(
    "--cache", "cache", type=click.Path(path_type=Path), default=None,
    help="Zarr embedding cache to use (default data/cache/embeddings.zarr under $SEMST_HOME, else the current folder); "
         "share one between checkouts by pointing them at the same path.")
RECIPE_HELP = ("Defaults of every setting not given: 'semst' (this repository's) or 'paper' (the authors' "
               "code, choice by choice; see the README's recipe table).")
config_option = click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                             help="TOML config to use instead of the dataset's own.")


def set_option(sections: str):
    return click.option("--set", "assignments", multiple=True, metavar="SECTION.FIELD=VALUE",
                        help=f"Set one config field (repeatable), the value as in a TOML file, e.g. "
                             f"--set train.epochs=5 --set graph.expr_k=10. Sections: {sections}.")


CLUSTER_SET_SECTIONS = ("graph", "model", "loss", "train", "clustering", "cluster", "embed")


@click.group(cls=SemstGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """semst: spatial domains steered by what an LLM makes of each spot's top genes."""


@main.command("data")
@click.argument("dataset", required=False)
@click.option("--list", "list_only", is_flag=True, help="List known datasets and where each is found.")
@click.option("--mirror", default=None, help="Base URL replacing each source's host (e.g. a local mirror).")
def data_cmd(dataset, list_only, mirror):
    """Download DATASET from its public source into data/raw/ (verified; never half-written)."""
    from semst.shared import datasets

    if list_only or not dataset:
        for row in datasets.describe_datasets():
            click.echo("  ".join(str(v) for v in row))
        return
    from semst.shared.download import download_dataset
    path = download_dataset(dataset, mirror=mirror)
    click.echo(f"{dataset}: ready in {path}")


@main.command("embed")
@click.argument("dataset")
@cache_option
@config_option
@click.option("--model", default=None, help="'default' (converted SmolLM2), a local directory or an HF id in the local HF cache.")
@click.option("--k-genes", "k_genes", type=int, default=None, help="k_g: top expressed genes per spot (default from config, 20).")
@click.option("--pooling", type=click.Choice(["mean", "last"]), default=None)
@click.option("--backend", default=None, help="auto (the default: vllm on a GPU, transformers on a CPU), vllm, "
              "transformers or sentence (embed/backends.py BACKENDS).")
@click.option("--template", default=None, help="Prompt template: semst (the paper's) or nonbio (control).")
@click.option("--batch-size", type=int, default=None)
@click.option("--max-spots", type=int, default=None, help="Only the first N spots (quick checks).")
@click.option("--recipe", default=None, help=RECIPE_HELP)
@click.option("--gene-ranking", "gene_ranking", default=None,
              help="Rank a spot's genes by raw 'counts' (semst) or by the 'scaled' preprocessed matrix (paper).")
@click.option("--prefix-reuse/--no-prefix-reuse", "prefix_reuse", default=None,
              help="Compute the prompts' shared leading tokens once (exact, same cache; default from config: on).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Compute on vLLM replicas through Ray (pip install 'semst[distributed]'): alone, a Ray started "
                   "here; with ADDRESS (HEAD:6379, auto), an existing cluster. Put it after DATASET.")
@click.option("--workers", type=int, default=None,
              help="Engine replicas on Ray (default: one per GPU, or one per core without GPUs).")
@click.option("--shard", default=None, metavar="I/N",
              help="Compute only shard I of N (0 <= I < N) of the missing prompts, into this --cache; "
                   "merge the shards' caches with `semst cache merge`.")
@click.option("--semantic", type=click.Choice(["spot", "gene"]), default=None,
              help="spot: one prompt per spot (the paper's); gene: one prompt per gene, a spot = weighted mean.")
@click.option("--gene-weights", "gene_weights", type=click.Choice(["topk", "all"]), default=None,
              help="--semantic gene: a spot's genes that weigh, by count: its top-k_g, or all of genes_from.")
@set_option("embed")
def embed_cmd(dataset, cache, config_path, model, k_genes, pooling, backend, template, batch_size, max_spots,
              recipe, gene_ranking, prefix_reuse, ray_address, workers, shard, semantic, gene_weights,
              assignments):
    """Stage 1: embed DATASET's top-k gene prompts into the shared cache."""
    from semst.embed.run import embed_dataset
    from semst.embed.shards import parse_shard
    from semst.shared.config import config_to_toml, load_embed_config, parse_assignments, with_assignments

    assigned = parse_assignments(assignments, ("embed",))
    shard = parse_shard(shard) if shard is not None else None
    _find(dataset)
    flags = {"cache": str(cache) if cache else None, "model": model, "k_genes": k_genes, "pooling": pooling,
             "backend": backend, "template": template, "batch_size": batch_size, "recipe": recipe,
             "gene_ranking": gene_ranking, "prefix_reuse": prefix_reuse, "ray_address": ray_address,
             "workers": workers, "semantic": semantic, "gene_weights": gene_weights}
    cfg = load_embed_config(dataset, with_assignments(flags, assigned["embed"]), config_path)
    click.echo("# semst embed config\n" + config_to_toml(cfg))
    embed_dataset(cfg, max_spots=max_spots, shard=shard)


def _csv(text: str, cast=str, what: str = "values") -> list:
    """A comma-separated option as a list (empty items dropped); a clear error if an item is not a ``cast``."""
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        kind = "integers" if cast is int else "values"
        raise click.BadParameter(f"{what} must be comma-separated {kind}, got {text!r}") from None


def _parse_seeds(value: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` as a list; ConfigError (one line, exit 2) unless distinct integers >= 0."""
    from semst.shared.config import check_seeds

    if value is None:
        return None
    items = [x.strip() for x in value.split(",") if x.strip()]
    try:
        seeds = [int(x) for x in items]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {value!r}") from None
    return check_seeds(seeds, "--seeds")


def _find(dataset: str) -> None:
    """The dataset first: a typo is "unknown dataset" (with where it looked), not a config error."""
    from semst.shared.datasets import find_dataset

    find_dataset(dataset)


def _run_name(ctx, param, value: str | None) -> str | None:
    from semst.cluster.outputs import check_run_name
    from semst.cluster.seeds import ClusterError

    if value is None:
        return None
    try:
        return check_run_name(value)
    except ClusterError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("cluster")
@click.argument("dataset")
@cache_option
@config_option
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False, writable=True),
              default=Path("results"), show_default=True,
              help="Folder of the run folders (<out>/<dataset>/<run>); created if missing.")
@click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2,3,4 (mean +- sd reported).")
@click.option("--n-domains", "n_domains", default=None,
              help="Number of domains: K, 'auto' (chosen by stability in 3-15, never from labels) or 'auto:LO-HI' "
                   "(default: the number of annotated domains).")
@click.option("--fusion", default=None,
              help="A registered fusion: film (default), concat, add, cross-attention, none, or one of your own.")
@click.option("--embedding", default=None, help="llm (default), random, or an embedding tag from `semst cache info`.")
@click.option("--epochs", type=int, default=None)
@click.option("--model", default=None, help="Which model's cached embeddings to use (as given to `semst embed`).")
@click.option("--k-genes", "k_genes", type=int, default=None)
@click.option("--pooling", type=click.Choice(["mean", "last"]), default=None)
@click.option("--template", default=None)
@click.option("--run-name", default=None, callback=_run_name,
              help="Name of the run folder, one folder name (default: derived from the settings). An earlier "
                   "semst run of that name is replaced; any other folder is never touched.")
@click.option("--threads", type=int, default=None,
              help="Threads for every pool (torch, BLAS, OpenMP, DGL); default OMP_NUM_THREADS, else all cores.")
@click.option("--minibatch", type=click.Choice(["auto", "on", "off"]), default=None,
              help="Mini-batch training: auto (above minibatch_above spots), on, off.")
@click.option("--batch-spots", "batch_spots", type=int, default=None, help="Spots per mini-batch.")
@click.option("--recipe", default=None, help=RECIPE_HELP)
@click.option("--gene-ranking", "gene_ranking", default=None,
              help="Which prompts' embeddings to read: genes ranked by 'counts' or by the 'scaled' matrix.")
@click.option("--fsm-mode", "fsm_mode", default=None,
              help="FiLM start: paper | zero-init | gated (starts as the identity; the gate is reported).")
@click.option("--semantic", type=click.Choice(["spot", "gene"]), default=None,
              help="spot: one prompt per spot (the paper's); gene: one prompt per gene, a spot = weighted mean.")
@click.option("--gene-weights", "gene_weights", type=click.Choice(["topk", "all"]), default=None,
              help="--semantic gene: a spot's genes that weigh, by count: its top-k_g, or all of genes_from.")
@set_option(", ".join(CLUSTER_SET_SECTIONS))
def cluster_cmd(dataset, cache, config_path, out_dir, seeds, n_domains, fusion, embedding, epochs,
                model, k_genes, pooling, template, run_name, threads, minibatch, batch_spots, recipe,
                gene_ranking, fsm_mode, semantic, gene_weights, assignments):
    """Stage 2: train SemST on cached embeddings and find spatial domains."""
    from semst.cluster.run import cluster_dataset
    from semst.shared.config import config_to_toml, load_cluster_config, parse_assignments, with_assignments

    assigned = parse_assignments(assignments, CLUSTER_SET_SECTIONS)
    _find(dataset)
    flags = {"cache": str(cache) if cache else None, "seeds": _parse_seeds(seeds), "n_domains": n_domains,
             "fusion": fusion, "embedding": embedding, "epochs": epochs, "threads": threads,
             "minibatch": minibatch, "batch_spots": batch_spots, "recipe": recipe, "fsm_mode": fsm_mode}
    embed_flags = {"cache": str(cache) if cache else None, "model": model, "k_genes": k_genes,
                   "pooling": pooling, "template": template, "gene_ranking": gene_ranking,
                   "semantic": semantic, "gene_weights": gene_weights}
    cfg = load_cluster_config(dataset, with_assignments(flags, assigned["cluster"]), config_path,
                              embed_overrides=with_assignments(embed_flags, assigned["embed"]))
    click.echo("# semst cluster config\n" + config_to_toml(cfg))
    cluster_dataset(cfg, out_dir=out_dir, run_name=run_name, config_path=config_path)


@main.command("experiment")
@click.argument("grid", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@cache_option
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where REPORT.md, figures/ and cells/ go (default: the grid's [grid] out).")
@click.option("--rerun", is_flag=True, help="Run every cell again instead of reusing finished ones.")
@click.option("--datasets", default=None, help="Comma-separated subset of the grid's datasets to run.")
@click.option("--variants", default=None,
              help="Comma-separated subset of the grid's variants to run (a later whole run reuses their cells).")
@click.option("--report-only", is_flag=True,
              help="Run nothing: write REPORT.md from the cells finished so far (e.g. while the grid runs).")
def experiment_cmd(grid, cache, out_dir, rerun, datasets, variants, report_only):
    """Run a grid of datasets x methods x seeds (TOML) and write REPORT.md; exit 1 if a cell failed."""
    from semst.experiments.grid import load_grid, restrict_datasets, restrict_variants, run_experiment

    grid = load_grid(grid)
    if datasets:
        grid = restrict_datasets(grid, _csv(datasets))
    if variants:
        grid = restrict_variants(grid, _csv(variants))
    if report_only and rerun:
        raise click.UsageError("--report-only runs nothing, so it cannot --rerun")
    outcome = run_experiment(grid, cache=cache, out_dir=out_dir, resume=not rerun, report_only=report_only)
    click.echo(f"{len(outcome.cells)} cells ({outcome.n_failed} failed), "
               f"{len(outcome.skipped)} datasets skipped; report: {outcome.report}")
    if outcome.n_failed:
        raise SystemExit(1)


@main.command("prompt-info")
@click.argument("dataset")
@cache_option
@click.option("--recipe", "recipes", default="semst", show_default=True, help="Comma-separated recipes.")
@click.option("--gene-ranking", "rankings", default="counts,scaled", show_default=True,
              help="Comma-separated gene rankings.")
@click.option("--k-genes", "k_values", default="10,20", show_default=True, help="Comma-separated k_g values.")
@click.option("--seeds", default="0,1,2", show_default=True, help="k-means seeds.")
def prompt_info_cmd(dataset, cache, recipes, rankings, k_values, seeds):
    """How much domain information DATASET's prompt gene lists hold and how much the cached LLM embeddings keep
    (ARI of k-means on each; scoring only, nothing is chosen with the labels)."""
    from semst.experiments.prompt_information import HEADER, prompt_information

    settings = (_csv(recipes), _csv(rankings), _csv(k_values, int, "k_genes"), _parse_seeds(seeds))
    click.echo(HEADER)
    prompt_information(dataset, *settings, cache=cache, log=click.echo)


@main.group("cache")
def cache_group():
    """Inspect, check and tidy the shared embedding cache."""


def _open_cache(cache: Path | None):
    from semst.shared.cache import EmbeddingCache
    return EmbeddingCache(cache or default_cache(), create=False)


@cache_group.command("info")
@cache_option
def cache_info(cache):
    """Embedding spaces, rows, size and the datasets' spot tables."""
    from semst.shared.cache import format_info
    click.echo(format_info(_open_cache(cache).info()))


@cache_group.command("verify")
@cache_option
@click.option("--fix", is_flag=True,
              help="First record checksums for rows written before checksums (those that read back finite).")
def cache_verify(cache, fix):
    """Check every committed row against its checksum, every index part and spot table; exit 1 if anything is wrong."""
    c = _open_cache(cache)
    if fix:
        click.echo(f"recorded checksums for {c.record_checksums()} rows written before checksums")
    found = c.check()
    for note in found.notes:
        click.echo(note)
    if found.problems:
        for p in found.problems:
            click.echo(f"problem: {p}", err=True)
        click.echo(f"run `semst cache repair --cache {c.path}` to drop what is damaged, then `semst embed` again "
                   f"to recompute it", err=True)
        raise SystemExit(1)
    click.echo(f"{c.path}: OK")


@cache_group.command("repair")
@cache_option
def cache_repair(cache):
    """Drop damaged rows and unreadable index parts and spot tables, so `semst embed` recomputes them."""
    from semst.shared.cache import format_repair
    for line in format_repair(_open_cache(cache).repair()):
        click.echo(line)


@cache_group.command("gc")
@cache_option
def cache_gc(cache):
    """Compact index parts, drop uncommitted rows and temp files (never a committed row)."""
    report = _open_cache(cache).gc()
    for k, v in report.items():
        click.echo(f"{k}: {v}")


@cache_group.command("merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--into", "into", required=True, type=click.Path(path_type=Path),
              help="The cache to add the rows to (created if absent).")
def cache_merge(sources, into):
    """Add every row of the SOURCES caches not yet in --into (by prompt, per space; checksums kept), copy their
    spot tables, then verify --into; exit 1 if that finds a problem. A damaged source is refused before anything
    is written."""
    from semst.shared.cache import format_merge, merge_caches

    report = merge_caches(sources, into)
    for line in format_merge(report):
        click.echo(line)
    if report["problems"]:
        for p in report["problems"]:
            click.echo(f"problem: {p}", err=True)
        raise SystemExit(1)
    click.echo(f"{report['into']}: OK")


if __name__ == "__main__":
    main()
