"""The shared, crash-safe embedding cache: one Zarr store, many embedding spaces, rows keyed by prompt.

Layout of a store (``data/cache/embeddings.zarr`` by default)::

    semst_cache.json                    format marker; anything else is refused
    zarr.json                           the root Zarr group
    spaces/<space_id>/vectors           Zarr array (rows x dim), grown append-only
    spaces/<space_id>/zarr.json         attrs: the space identity (model, weights, pooling, dtype, dim)
    index/<space_id>/part-*.parquet     commit records: prompt_hash, row, prompt, n_tokens
    spot_tables/<dataset>/<tag>.parquet spot_id -> prompt_hash, run metadata in the schema metadata
    .lock                               one file lock per store (filelock)

Why it is crash-safe: a writer (under the lock) writes vector rows after the last committed row,
makes them durable, and only then renames a new Parquet part into ``index/<space_id>/``. The part
file *is* the commit. Rows past the committed count are garbage of a killed run; the next writer
overwrites them and ``gc`` trims them. Part files and spot tables are written under a temporary
name and renamed, so a reader never sees half a file.

Why it never duplicates: every writer re-reads the index under the lock and skips hashes that are
already committed, so two runs on one cache can overlap freely.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from semst.shared.hashing import json_hash
from semst.shared.io import atomic_write_parquet, fsync_dir
from semst.shared.paths import DEFAULT_MODEL_NAME

FORMAT = {"format": "semst-embedding-cache", "version": 1}
MARKER = "semst_cache.json"
CHUNK_ROWS = 1024
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class CacheError(RuntimeError):
    """The cache cannot do what was asked; the message says what is wrong and what to do."""


class SpaceMismatchError(CacheError):
    """A store or space holds embeddings of another identity than the one asked for."""


@dataclass(frozen=True)
class EmbeddingSpace:
    """Identity of one embedding space: vectors from different spaces are never mixed."""

    model: str  # human label, e.g. "SmolLM2-135M-Instruct"
    weights: str  # SHA-256 fingerprint of the weight files (or another exact identity)
    pooling: str  # "mean" | "last" | e.g. "sentence" for sentence encoders
    dtype: str  # "float32"
    dim: int

    @property
    def space_id(self) -> str:
        return json_hash(dataclasses.asdict(self))


def model_label(model: str | Path) -> str:
    """The human label of a model: "SmolLM2-135M-Instruct", "Qwen3-4B-Thinking-2507", ...

    The same answer for the string a user passes ("default", a directory, an HF id) and for the
    directory it resolves to (an HF cache snapshot is labelled by its repository), computed without
    touching the disk. The label only names a space for people; the weights' hash identifies it.
    """
    if str(model) == "default":
        return DEFAULT_MODEL_NAME
    path = Path(str(model).rstrip("/"))
    # A Hugging Face cache snapshot: .../models--Owner--Name/snapshots/<revision>
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name or str(model)


def embedding_tag(cfg) -> str:
    """Name of the spot -> prompt-hash table one embed setting (an ``EmbedConfig``) writes and
    stage 2 looks up: the contract between the stages.

    Readable parts plus a short hash of everything that changes the prompts (k_g, template, which
    genes are ranked and by what -- raw counts or the preprocessed matrix --, and the preprocessing
    that picks the HVGs), so two settings never share a tag.
    """
    prompt_settings = {"k": cfg.k_genes, "template": cfg.template, "genes_from": cfg.genes_from,
                       "preprocess": dataclasses.asdict(cfg.preprocess) if cfg.genes_from == "hvg" else None}
    ranking = cfg.gene_ranking
    if ranking != "counts":  # absent for counts, so the tags of existing spot tables stay valid
        prompt_settings["ranking"] = ranking
    if prompt_settings["preprocess"] is not None:  # whether the HVG count is enforced changes no prompt
        prompt_settings["preprocess"].pop("require_top_genes", None)
    return f"{model_label(cfg.model)}.{cfg.pooling}.k{cfg.k_genes}.{cfg.template}.{json_hash(prompt_settings, 8)}"


def _safe_name(name: str, what: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        raise CacheError(f"{what} {name!r} cannot be used as a file name")
    return name


class EmbeddingCache:
    """A Zarr embedding store shared by many runs, datasets and checkouts."""

    def __init__(self, path: str | Path, create: bool = True):
        import zarr

        self.path = Path(path)
        marker = self.path / MARKER
        if self.path.exists():
            if not marker.exists():
                if self.path.is_dir() and not any(self.path.iterdir()) and create:
                    self._initialise()
                else:
                    raise CacheError(f"{self.path} exists but is not a semst embedding cache (no {MARKER}); "
                                     f"pass another --cache path")
            else:
                found = json.loads(marker.read_text())
                if found.get("format") != FORMAT["format"] or found.get("version") != FORMAT["version"]:
                    raise CacheError(f"{self.path} is a cache of format {found}, this semst reads {FORMAT}")
        elif create:
            self._initialise()
        else:
            raise CacheError(f"no embedding cache at {self.path}: run `make embed DATASET=...` "
                             f"(or `semst embed DATASET --cache {self.path}`) first")
        self._zarr = zarr
        self._root = zarr.open_group(str(self.path), mode="a")
        self._index: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {}

    # -- set-up -----------------------------------------------------------------------------------
    def _initialise(self) -> None:
        """Create the store in a temporary sibling folder and rename it into place, so a run killed
        while creating it leaves either no cache or a complete empty one (never a half-made one)."""
        import zarr

        if self.path.exists():  # an empty folder the user made for the cache
            self.path.rmdir()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".tmp-{uuid.uuid4().hex}-{self.path.name}"
        try:
            zarr.open_group(str(tmp), mode="w")
            (tmp / MARKER).write_text(json.dumps(FORMAT))
            try:
                os.rename(tmp, self.path)
            except OSError:
                if not (self.path / MARKER).exists():  # lost the race to a complete cache? fine
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(self.path.parent)

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.path / ".lock"))

    def _index_dir(self, space: EmbeddingSpace) -> Path:
        return self.path / "index" / space.space_id

    # -- spaces -----------------------------------------------------------------------------------
    def spaces(self) -> list[EmbeddingSpace]:
        out = []
        group = self._root.get("spaces")
        if group is None:
            return out
        for name in sorted(group.group_keys()):
            if name.startswith(".tmp-"):
                continue  # being created, or a killed creation's leftover
            member = group[name]
            if "vectors" not in member:
                continue  # half-made by an older writer killed while creating it: holds no committed row
            out.append(self._space_from_attrs(member.attrs.asdict(), name))
        return out

    def _space_from_attrs(self, attrs: dict, name: str) -> EmbeddingSpace:
        try:
            return EmbeddingSpace(**attrs["identity"])
        except (KeyError, TypeError) as exc:
            raise CacheError(f"space {name} in {self.path} has no readable identity ({exc}); "
                             f"run `semst cache verify`") from None

    def _vectors(self, space: EmbeddingSpace, create: bool = False):
        key = f"spaces/{space.space_id}"
        if key in self._root:
            group = self._root[key]
            if "vectors" not in group:
                # Half-made by a writer killed while creating it (before creation was atomic): no
                # row can have been committed to it, so it is the same as no space.
                if not create:
                    return None
                shutil.rmtree(self.path / "spaces" / space.space_id)
                return self._create_space(space)["vectors"]
            stored = self._space_from_attrs(group.attrs.asdict(), space.space_id)
            if stored != space:
                raise SpaceMismatchError(
                    f"space {space.space_id} in {self.path} was written for {stored}, not {space}: "
                    f"this cache was written for another embedding space; use another --cache")
            return group["vectors"]
        if not create:
            return None
        return self._create_space(space)["vectors"]

    def _create_space(self, space: EmbeddingSpace):
        """Build the space (identity + empty vectors array) in a temporary sibling folder and rename it
        into place, so a writer killed while creating it leaves either no space or a complete one: a
        half-made space (a group without its identity or its vectors) would make every later open
        fail. The caller holds the lock; ``gc`` removes the temporary folder of a killed creation."""
        self._root.require_group("spaces")
        spaces_dir = self.path / "spaces"
        tmp = spaces_dir / f".tmp-{uuid.uuid4().hex}-{space.space_id}"
        try:
            group = self._zarr.open_group(str(tmp), mode="w")
            group.attrs["identity"] = dataclasses.asdict(space)
            group.create_array("vectors", shape=(0, space.dim), chunks=(CHUNK_ROWS, space.dim),
                               dtype=space.dtype, fill_value=0)
            self._fsync_tree(tmp)
            os.rename(tmp, spaces_dir / space.space_id)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(spaces_dir)
        return self._root[f"spaces/{space.space_id}"]

    # -- index ------------------------------------------------------------------------------------
    def _parts(self, space: EmbeddingSpace) -> tuple[str, ...]:
        d = self._index_dir(space)
        if not d.is_dir():
            return ()
        return tuple(sorted(p.name for p in d.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet"))

    def _hash_rows(self, space: EmbeddingSpace) -> dict[str, int]:
        """hash -> row of every committed row; re-read only when the set of part files changed."""
        parts = self._parts(space)
        cached = self._index.get(space.space_id)
        if cached is not None and cached[0] == parts:
            return cached[1]
        rows: dict[str, int] = {}
        d = self._index_dir(space)
        for name in parts:
            t = pq.read_table(d / name, columns=["prompt_hash", "row"])
            rows.update(zip(t.column("prompt_hash").to_pylist(), t.column("row").to_pylist()))
        self._index[space.space_id] = (parts, rows)
        return rows

    def count(self, space: EmbeddingSpace) -> int:
        return len(self._hash_rows(space))

    def contains(self, space: EmbeddingSpace, hashes: Sequence[str]) -> np.ndarray:
        if self._vectors(space) is None:
            return np.zeros(len(hashes), dtype=bool)
        rows = self._hash_rows(space)
        return np.fromiter((h in rows for h in hashes), dtype=bool, count=len(hashes))

    def get(self, space: EmbeddingSpace, hashes: Sequence[str]) -> np.ndarray:
        vectors = self._vectors(space)
        rows = self._hash_rows(space) if vectors is not None else {}
        missing = [h for h in hashes if h not in rows]
        if missing:
            raise CacheError(f"{len(missing)} of {len(hashes)} prompts are not in the cache {self.path} "
                             f"for {space.model} ({space.pooling}, space {space.space_id})")
        if not hashes:
            return np.zeros((0, space.dim), dtype=space.dtype)
        idx = np.fromiter((rows[h] for h in hashes), dtype=np.int64, count=len(hashes))
        # Read the covering row range once (chunked, contiguous) and gather: far faster than
        # point selection for the 100k-spot case, and the range is bounded by the store size.
        lo, hi = int(idx.min()), int(idx.max()) + 1
        block = np.asarray(vectors[lo:hi])
        return block[idx - lo]

    # -- writing ----------------------------------------------------------------------------------
    def add(self, space: EmbeddingSpace, hashes: Sequence[str], vectors, prompts: Sequence[str],
            n_tokens: Sequence[int]) -> int:
        """Append the rows whose hash is not committed yet; returns how many were appended."""
        vectors = np.asarray(vectors)
        n = len(hashes)
        if not (vectors.shape == (n, space.dim) and len(prompts) == n and len(n_tokens) == n):
            raise CacheError(f"add() needs {n} hashes, vectors of shape ({n}, {space.dim}), {n} prompts and "
                             f"{n} token counts; got vectors {vectors.shape}, {len(prompts)} prompts, "
                             f"{len(n_tokens)} token counts")
        bad = [h for h in hashes if not _HASH_RE.match(h)]
        if bad:
            raise CacheError(f"{len(bad)} keys are not SHA-256 hex digests (e.g. {bad[0]!r})")
        if not np.isfinite(vectors).all():
            raise CacheError("refusing to cache non-finite embeddings (NaN or inf); the backend output is broken")
        with self._lock():
            array = self._vectors(space, create=True)
            committed = self._hash_rows(space)
            keep, seen = [], set()
            for i, h in enumerate(hashes):
                if h not in committed and h not in seen:
                    seen.add(h)
                    keep.append(i)
            if not keep:
                return 0
            start = len(committed)
            stop = start + len(keep)
            if array.shape[0] < stop:
                array.resize((stop, space.dim))
            array[start:stop] = vectors[keep].astype(space.dtype, copy=False)
            self._fsync_tree(self.path / "spaces" / space.space_id)
            table = pa.table({
                "prompt_hash": pa.array([hashes[i] for i in keep], pa.string()),
                "row": pa.array(np.arange(start, stop, dtype=np.int64)),
                "prompt": pa.array([prompts[i] for i in keep], pa.string()),
                "n_tokens": pa.array([int(n_tokens[i]) for i in keep], pa.int32()),
            })
            d = self._index_dir(space)
            d.mkdir(parents=True, exist_ok=True)
            # Names sort by time then randomness; the order is only cosmetic (rows are explicit).
            atomic_write_parquet(d / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet", table, durable=True)
            return len(keep)

    @staticmethod
    def _fsync_tree(path: Path) -> None:
        """Make freshly written chunk files and metadata durable before the commit record."""
        for p in path.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        for p in [path, *[q for q in path.rglob("*") if q.is_dir()]]:
            fsync_dir(p)

    # -- spot tables ------------------------------------------------------------------------------
    def _spot_path(self, dataset: str, tag: str) -> Path:
        return self.path / "spot_tables" / _safe_name(dataset, "dataset") / f"{_safe_name(tag, 'tag')}.parquet"

    def write_spot_table(self, dataset: str, tag: str, spot_ids, hashes, meta: dict) -> Path:
        spot_ids = [str(s) for s in spot_ids]
        if len(spot_ids) != len(hashes):
            raise CacheError(f"spot table needs one hash per spot: {len(spot_ids)} spots, {len(hashes)} hashes")
        meta = {**meta, "dataset": dataset, "tag": tag, "n_spots": len(spot_ids)}
        table = pa.table({"spot_id": pa.array(spot_ids, pa.string()),
                          "prompt_hash": pa.array(list(hashes), pa.string())})
        table = table.replace_schema_metadata({b"semst": json.dumps(meta, default=str).encode()})
        dest = self._spot_path(dataset, tag)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(dest, table, durable=True)
        return dest

    def read_spot_table(self, dataset: str, tag: str) -> tuple[pd.DataFrame, dict]:
        path = self._spot_path(dataset, tag)
        if not path.exists():
            existing = [m["tag"] for m in self.spot_tables(dataset)]
            hint = (f"tags that exist for {dataset}: {', '.join(existing)}" if existing
                    else f"no spot table at all for {dataset}")
            raise CacheError(f"no spot table {tag!r} for {dataset} in {self.path} ({hint})")
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"semst"])
        return table.to_pandas(), meta

    def spot_tables(self, dataset: str | None = None) -> list[dict]:
        root = self.path / "spot_tables"
        if not root.is_dir():
            return []
        dirs = [root / dataset] if dataset else sorted(p for p in root.iterdir() if p.is_dir())
        out = []
        for d in dirs:
            if not d.is_dir():
                continue
            for p in sorted(d.glob("*.parquet")):
                if p.name.startswith(".tmp-"):
                    continue
                out.append(json.loads(pq.read_schema(p).metadata[b"semst"]))
        return out

    # -- maintenance ------------------------------------------------------------------------------
    def info(self) -> dict:
        spaces = []
        for space in self.spaces():
            arr = self._vectors(space)
            d = self._index_dir(space)
            tokens = 0
            for name in self._parts(space):
                tokens += int(pq.read_table(d / name, columns=["n_tokens"]).column("n_tokens").to_numpy().sum())
            size = sum(p.stat().st_size for p in (self.path / "spaces" / space.space_id).rglob("*") if p.is_file())
            spaces.append({"space_id": space.space_id, **dataclasses.asdict(space), "rows": self.count(space),
                           "allocated_rows": int(arr.shape[0]), "tokens": tokens, "bytes": size,
                           "index_parts": len(self._parts(space))})
        return {"path": str(self.path), "format": FORMAT, "spaces": spaces, "spot_tables": self.spot_tables()}

    def verify(self) -> list[str]:
        """Every problem found, in words; an empty list means the cache is consistent."""
        problems: list[str] = []
        try:
            spaces = self.spaces()
        except CacheError as exc:
            return [str(exc)]
        known = {s.space_id for s in spaces}
        for space in spaces:
            arr = self._vectors(space)
            d = self._index_dir(space)
            row_of: dict[str, int] = {}
            hash_of: dict[int, str] = {}
            for name in self._parts(space):
                try:
                    t = pq.read_table(d / name)
                except Exception as exc:  # noqa: BLE001 - any unreadable part is a finding
                    problems.append(f"{space.space_id}: index part {name} is unreadable ({exc})")
                    continue
                for h, r in zip(t.column("prompt_hash").to_pylist(), t.column("row").to_pylist()):
                    # The same (hash, row) in two parts is harmless (a gc interrupted before it
                    # removed the parts it merged); one hash on two rows, or two hashes on one
                    # row, is not.
                    if row_of.setdefault(h, r) != r:
                        problems.append(f"{space.space_id}: prompt {h[:12]} is indexed at rows {row_of[h]} and {r}")
                    if hash_of.setdefault(r, h) != h:
                        problems.append(f"{space.space_id}: row {r} is claimed by two prompts")
                    if not 0 <= r < arr.shape[0]:
                        problems.append(f"{space.space_id}: {name} points at row {r}, past the "
                                        f"{arr.shape[0]} rows of the vectors array")
            rows_seen = set(hash_of)
            if rows_seen and rows_seen != set(range(len(rows_seen))):
                problems.append(f"{space.space_id}: committed rows are not contiguous from 0")
            n = len(rows_seen)
            if n and not problems:
                block = np.asarray(arr[:n])
                if not np.isfinite(block).all():
                    problems.append(f"{space.space_id}: committed rows hold NaN or inf")
        index_root = self.path / "index"
        if index_root.is_dir():
            for d in index_root.iterdir():
                if d.name not in known:
                    problems.append(f"index/{d.name} has no matching space")
        for meta in self.spot_tables():
            sid = meta.get("space_id")
            if sid and sid not in known:
                problems.append(f"spot table {meta.get('dataset')}/{meta.get('tag')} refers to missing space {sid}")
        return problems

    def gc(self) -> dict:
        """Compact each space's index into one part, trim uncommitted rows, remove temp files."""
        report = {"spaces": 0, "parts_merged": 0, "rows_trimmed": 0, "temp_files_removed": 0}
        with self._lock():
            # .tmp-* are ours, *.partial are zarr's own atomic-write leftovers of a killed run.
            for p in [*self.path.rglob(".tmp-*"), *self.path.rglob("*.partial")]:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                report["temp_files_removed"] += 1
            for space in self.spaces():
                report["spaces"] += 1
                arr = self._vectors(space)
                committed = self._hash_rows(space)
                if arr.shape[0] > len(committed):
                    report["rows_trimmed"] += int(arr.shape[0] - len(committed))
                    arr.resize((len(committed), space.dim))
                parts = self._parts(space)
                if len(parts) > 1:
                    d = self._index_dir(space)
                    table = pa.concat_tables([pq.read_table(d / name) for name in parts]).sort_by("row")
                    atomic_write_parquet(d / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet", table, durable=True)
                    # The merged part lists every row; until the old parts are gone each hash appears
                    # twice, which readers tolerate (same row) and a crash here leaves for the next gc.
                    for name in parts:
                        (d / name).unlink()
                    fsync_dir(d)
                    report["parts_merged"] += len(parts)
                self._index.pop(space.space_id, None)
        return report


def format_info(info: dict) -> str:
    lines = [f"cache {info['path']}"]
    if not info["spaces"]:
        lines.append("  (no embedding space yet)")
    for s in info["spaces"]:
        lines.append(f"  space {s['space_id']}: {s['model']} pooling={s['pooling']} {s['dtype']} dim={s['dim']} "
                     f"weights={s['weights'][:12]}  {s['rows']} rows, {s['tokens']} tokens, "
                     f"{s['bytes'] / 1e6:.1f} MB, {s['index_parts']} index parts")
    tables = info["spot_tables"]
    if tables:
        lines.append("  spot tables (dataset / tag: spots):")
        for m in tables:
            lines.append(f"    {m['dataset']} / {m['tag']}: {m['n_spots']} spots (space {m.get('space_id', '?')})")
    return "\n".join(lines)
