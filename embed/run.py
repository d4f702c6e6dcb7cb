"""Stage 1 end to end: dataset -> top-k gene prompts -> LLM hidden states -> shared cache.

Everything that can be wrong with the input (dataset, genes, k, model, cache identity) is checked
before the cache is opened for writing, so bad input never touches the cache. Prompts already in the
cache are never computed again: not within a run, not across runs, datasets or k_g settings.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semst.shared.cache import model_label
from semst.shared.config import EmbedConfig
from semst.shared.errors import SemstError
from semst.shared.hashing import prompt_hash


class EmbedError(SemstError, RuntimeError):
    """Stage 1 cannot run as asked; the message says why and what to do."""


@dataclass
class EmbedReport:
    dataset: str
    tag: str
    space_id: str
    n_spots: int
    n_prompts: int  # distinct prompts
    n_cached: int
    n_computed: int
    seconds: float
    spot_table: Path | None  # None: a --shard run whose store lacks other shards' prompts


def spot_gene_lists(cfg: EmbedConfig, adata, preprocessed=None) -> list[list[str]]:
    """Top-k_g genes of each spot, in descending raw count or preprocessed value (``gene_ranking``;
    see shared.preprocess.top_k_genes). ``preprocessed``: ``preprocess(adata, cfg.preprocess)`` if
    the caller has it already (several k_g or rankings on one slide), else it is computed here."""
    from semst.shared.preprocess import preprocess, top_k_genes

    if cfg.genes_from != "hvg":
        source = adata
    else:
        source = preprocessed if preprocessed is not None else preprocess(adata, cfg.preprocess)
    return top_k_genes(source, cfg.k_genes, cfg.gene_ranking)


def embedding_space(model_dir: Path, cfg: EmbedConfig):
    """The cache partition these settings write to, computed without loading the model."""
    import json

    from semst.shared.cache import EmbeddingSpace
    from semst.shared.hashing import weights_fingerprint

    model_cfg = json.loads((model_dir / "config.json").read_text())
    dim = model_cfg.get("hidden_size") or model_cfg.get("text_config", {}).get("hidden_size")
    if not dim:
        raise EmbedError(f"{model_dir}/config.json has no hidden_size; is this a causal LM checkpoint?")
    return EmbeddingSpace(model=model_label(cfg.model), weights=weights_fingerprint(model_dir), pooling=cfg.pooling,
                          dtype=cfg.dtype, dim=int(dim))


def embed_dataset(cfg: EmbedConfig, adata=None, max_spots: int | None = None,
                  progress: bool = True, log=print, shard=None) -> EmbedReport:
    """Fill the cache with the embeddings of every spot of ``cfg.dataset`` and write its spot table.

    ``shard`` (an :class:`semst.embed.shards.Shard`): compute only that deterministic slice of the
    missing prompts; the spot table is then written only if every prompt of the dataset is in this
    cache (a shard's own store holds a slice: merge the shards, then run without --shard on the
    merged cache to write it)."""
    from semst.embed.backends import backend_class
    from semst.shared.cache import EmbeddingCache
    from semst.shared.datasets import check_slide, load_dataset

    if cfg.semantic == "gene":  # one prompt per gene, not per spot (embed.gene_prompts)
        from semst.embed.gene_prompts import embed_genes
        return embed_genes(cfg, adata, max_spots, progress, log)
    t0 = time.perf_counter()
    # 1. Input: everything checked before the model is loaded or the cache touched.
    if max_spots is not None and max_spots < 1:
        raise EmbedError(f"--max-spots must be >= 1, got {max_spots}")
    _commit_every()  # bad SEMST_COMMIT_* settings are refused before any work
    kind = backend_class(cfg.backend)  # the class: its class methods need no weights
    if cfg.ray_address:
        from semst.embed.ray_engine import check_ray_ready
        check_ray_ready(cfg.ray_address)
    if adata is None:
        adata = load_dataset(cfg.dataset)
    # Prompts from "all" genes never run the preprocessing, so only the slide itself is checked then.
    check_slide(adata, cfg.dataset, cfg.preprocess if cfg.genes_from == "hvg" else None)
    # Genes are chosen on the whole slide (gene filter and HVGs depend on all spots), so the
    # prompts of a --max-spots run are exactly those of a full run and stay in the cache for it.
    gene_lists = spot_gene_lists(cfg, adata)
    if max_spots is not None:
        adata = adata[:max_spots]
        gene_lists = gene_lists[:max_spots]
    # The model is only looked up here (a bad --model must not leave a new empty cache behind); the
    # cache is opened (refused if it is not a semst cache) and its writability checked before the
    # tokenizer or any weights load: a read-only cache is not found after the first batch.
    model_dir = kind.locate(cfg.model)
    cache = EmbeddingCache(cfg.cache, create=True)
    cache.check_writable()
    prompts = kind.render(gene_lists, model_dir, cfg.template)
    spot_hashes = [prompt_hash(p) for p in prompts]
    unique: dict[str, str] = {}
    for h, p in zip(spot_hashes, prompts):
        unique.setdefault(h, p)
    space = kind.expected_space(model_dir, cfg)
    tag = kind.tag(cfg)

    # 2. What is missing (the cache refuses a space of another identity here).
    hashes = list(unique)
    missing = [h for h, present in zip(hashes, cache.contains(space, hashes)) if not present]
    log(f"{cfg.dataset}: {len(adata)} spots, {len(hashes)} distinct prompts: "
        f"{len(hashes) - len(missing)} cached, {len(missing)} to compute ({space.model}, {space.pooling})")
    n_other_shards = 0
    if shard is not None:
        all_missing = len(missing)
        missing = shard.select(missing)
        n_other_shards = all_missing - len(missing)
        log(f"shard {shard}: {len(missing)} of the {all_missing} missing prompts are this shard's")

    # 3. Compute only what is missing, committing in blocks (a killed run keeps what it committed).
    n_computed = 0
    if missing:
        n_computed = _compute_missing(cfg, model_dir, space, cache, missing, unique, progress, log)

    if shard is not None and not cache.contains(space, hashes).all():
        table = None
        log(f"spot table {tag} not written: this cache holds only shard {shard}'s prompts; merge the shards "
            "(semst cache merge SRC... --into DST), then `semst embed` on DST writes it without computing")
    else:
        table = _write_spot_table(cfg, kind, cache, adata, gene_lists, spot_hashes, tag, space, model_dir)
    seconds = time.perf_counter() - t0
    n_cached = len(hashes) - n_computed - n_other_shards  # including rows another run committed meanwhile
    by_others = len(missing) - n_computed
    meanwhile = f"{by_others} of them committed meanwhile by another run; " if by_others else ""
    written = f"spot table {tag}" if table is not None else "no spot table"
    elsewhere = f", {n_other_shards} left to the other shards" if n_other_shards else ""
    log(f"{len(hashes)} prompts: {n_cached} cached, {n_computed} computed{elsewhere} "
        f"({meanwhile}{written}, {seconds:.1f} s)")
    return EmbedReport(cfg.dataset, tag, space.space_id, len(adata), len(hashes), n_cached, n_computed,
                       seconds, table)


def _write_spot_table(cfg, kind, cache, adata, gene_lists, spot_hashes, tag, space, model_dir) -> Path:
    return cache.write_spot_table(cfg.dataset, tag, list(adata.obs_names), spot_hashes, {
        "dataset": cfg.dataset, "tag": tag, "space": dataclasses.asdict(space), "space_id": space.space_id,
        "model": cfg.model, "model_dir": str(model_dir), "k_genes": cfg.k_genes, "template": cfg.template,
        "genes_from": cfg.genes_from, "gene_ranking": cfg.gene_ranking, "pooling": cfg.pooling, "n_spots": len(adata),
        "n_empty_spots": sum(1 for g in gene_lists if not g), **kind.table_meta(cfg)})


# Rows are committed in blocks of COMMIT_ROWS, or every COMMIT_SECONDS if that comes first (a slow
# model): a commit costs the same for 64 rows or thousands, so few large ones keep the cache's index
# small; a SIGKILL loses at most the block being gathered. The environment variables override them
# (a shared file system that wants fewer commits, a test that wants many).
COMMIT_ROWS = 4096
COMMIT_SECONDS = 60.0


def _commit_every() -> tuple[int, float]:
    import os

    rows, seconds = os.environ.get("SEMST_COMMIT_ROWS"), os.environ.get("SEMST_COMMIT_SECONDS")
    try:
        rows_n = int(rows) if rows else COMMIT_ROWS
        seconds_n = float(seconds) if seconds else COMMIT_SECONDS
    except ValueError:
        raise EmbedError(f"SEMST_COMMIT_ROWS={rows!r} / SEMST_COMMIT_SECONDS={seconds!r}: both must be numbers "
                         f"(rows >= 1, seconds > 0)") from None
    if rows_n < 1 or not seconds_n > 0:
        raise EmbedError(f"SEMST_COMMIT_ROWS={rows_n} / SEMST_COMMIT_SECONDS={seconds_n}: rows must be >= 1 "
                         f"and seconds > 0")
    return rows_n, seconds_n


class _Pending:
    """Computed rows not committed yet, and when the last commit was."""

    def __init__(self, cache, space):
        self.cache, self.space = cache, space
        self.hashes, self.texts, self.vectors, self.tokens = [], [], [], []
        self.since = time.monotonic()
        self.committed = 0  # rows this run appended

    def __len__(self) -> int:
        return len(self.hashes)

    def append(self, hashes, texts, vectors, tokens) -> None:
        self.hashes += hashes
        self.texts += texts
        self.vectors.append(vectors)
        self.tokens += list(tokens)

    def due(self, rows: int, seconds: float) -> bool:
        return len(self) >= rows or (len(self) > 0 and time.monotonic() - self.since >= seconds)

    def commit(self) -> None:
        """Commit what is pending (no signal cuts it) and count what this run appended (add() skips rows
        another run committed while these were computed); counted inside the critical region, as a
        signal received in it is raised when it ends."""
        from semst.shared import interrupt

        if not self.hashes:
            return
        with interrupt.critical():
            self.committed += self.cache.add(self.space, self.hashes, np.concatenate(self.vectors), self.texts,
                                             self.tokens)
            self.hashes, self.texts, self.vectors, self.tokens = [], [], [], []
            self.since = time.monotonic()


def _compute_missing(cfg, model_dir, space, cache, missing, unique, progress, log) -> int:
    """Embed ``missing`` batch by batch and commit them in blocks (see COMMIT_ROWS); how many rows
    this run committed.

    Ctrl-C / SIGTERM (under the CLI, see semst.shared.interrupt): a first signal stops at the end of
    the batch in progress; a second stops at once, dropping that batch. Either way the rows computed
    before are committed before the command stops, and a commit itself is never cut. The cache stays
    valid and a rerun computes the rest; a SIGKILL loses at most the rows not committed yet.
    """
    if cfg.ray_address:  # vLLM replicas on Ray; this process commits what they return
        from semst.embed.ray_engine import compute_missing_on_ray
        return compute_missing_on_ray(cfg, model_dir, space, cache, missing, unique, progress, log)

    from tqdm import tqdm

    from semst.embed.backends import AUTO, load_backend
    from semst.shared import interrupt

    commit_rows, commit_seconds = _commit_every()
    backend = load_backend(cfg.backend, str(model_dir), pooling=cfg.pooling, dtype=cfg.dtype,
                           batch_size=cfg.batch_size, prefix_reuse=cfg.prefix_reuse)
    reuse = getattr(backend, "prefix_reuse", False)
    why_not = " (not available for this backend and pooling)" if cfg.prefix_reuse and not reuse else ""
    chosen = f" (auto: {'a GPU' if backend.name == 'vllm' else 'no GPU'})" if cfg.backend == AUTO else ""
    log(f"{backend.name} backend{chosen}, {cfg.pooling} pooling, prefix reuse {'on' if reuse else 'off'}{why_not}")
    # The label is ours (derived from the model string); everything else must agree exactly.
    got = backend.space()
    if (got.weights, got.pooling, got.dtype, got.dim) != (space.weights, space.pooling, space.dtype, space.dim):
        raise EmbedError(f"backend reports embedding space {got} but the cache key was computed as "
                         f"{space}; refusing to mix them")
    pending = _Pending(cache, space)
    bar = tqdm(total=len(missing), unit="prompt", desc="embedding", disable=not progress)
    try:
        with interrupt.at_boundaries():
            for start in range(0, len(missing), cfg.batch_size):
                batch = missing[start:start + cfg.batch_size]
                # Another run on the same cache may have committed some of these meanwhile.
                batch = [h for h, present in zip(batch, cache.contains(space, batch)) if not present]
                if batch:
                    texts = [unique[h] for h in batch]
                    pending.append(batch, texts, np.asarray(backend.embed(texts), dtype=np.float32),
                                   backend.count_tokens(texts))
                if pending.due(commit_rows, commit_seconds):
                    pending.commit()
                bar.update(len(missing[start:start + cfg.batch_size]))
                interrupt.check()
            pending.commit()
    except interrupt.Interrupted as stop:
        pending.commit()  # what was computed before the signal is kept
        stop.detail = _stopped_note(cache, space, missing, pending.committed)
        raise
    finally:
        bar.close()
    return pending.committed


def _stopped_note(cache, space, missing, computed: int) -> str:
    """What an interrupted run kept and what is left, for the one-line message."""
    try:
        left = int((~cache.contains(space, missing)).sum())
    except Exception:  # noqa: BLE001 - the note must not hide the interruption
        left = None
    rest = f", {left} of {len(missing)} still to compute" if left is not None else ""
    return (f"{computed} prompts embedded and committed by this run{rest}; the cache is valid, "
            f"run the same command again to finish")
