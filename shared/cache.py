"""The shared, crash-safe, checksummed embedding cache: one Zarr store, many embedding spaces, rows keyed by prompt.

Layout of a store (``data/cache/embeddings.zarr`` by default)::

    semst_cache.json                    format marker; anything else is refused
    zarr.json                           the root Zarr group
    spaces/<space_id>/vectors           Zarr array (rows x dim), grown append-only
    spaces/<space_id>/zarr.json         attrs: the space identity (model, weights, pooling, dtype, dim)
    index/<space_id>/part-*.parquet     commit records: prompt_hash, row, prompt, n_tokens, blake2b
    spot_tables/<dataset>/<tag>.parquet spot_id -> prompt_hash, run metadata in the schema metadata
    .lock                               one file lock per store (filelock)

Why it is crash-safe: a writer (under the lock) writes vector rows after the highest committed row,
makes them durable, and only then renames a new Parquet part into ``index/<space_id>/``. The part
file *is* the commit. Rows past the highest committed row are garbage of a killed run; the next
writer overwrites them and ``gc`` trims them. Part files and spot tables are written under a
temporary name and renamed, so a reader never sees half a file.

Why it never duplicates: every writer re-reads the index under the lock and skips hashes that are
already committed, so two runs on one cache can overlap freely.

Why a damaged byte is never used: every committed row carries, in its index part (column
``blake2b``), the BLAKE2b-128 digest of its bytes as stored (the array's dtype, little-endian).
``get`` checks every row it returns and ``verify`` every row; a mismatch is an error naming the
rows and the chunk file. Index parts and spot tables carry Parquet page checksums (CRC32, written
and checked by pyarrow) and are checked against their expected columns; the run metadata of a
spot table carries its own BLAKE2b digest (it lives in the Parquet footer, which no page checksum
covers). BLAKE2b because hashlib has it (no new dependency: xxhash is not installed); at ~0.5 GB/s of
one core (4 us for a 576-float row) it adds a fraction to what reading and decoding the chunks costs
(see tests/benchmarks/bench_cache.py).
Parts written before checksums (no ``blake2b`` column) read as before: their rows are "unchecked"
(only checked for NaN / inf) until ``verify --fix`` records their digests.

Damage is repaired by forgetting: ``repair`` writes one new index part without the damaged rows
(and without the rows of unreadable parts), so the next ``embed`` computes exactly those prompts.
The dropped rows leave holes; new rows always go after the highest committed row, never into a
hole. A semst of format version 1 (before checksums) appends at "number of committed rows", which
in a cache with holes is a committed row: so a cache with holes gets marker version 2, which such
a semst refuses with a message ("is a cache of format ... version 2"), while every cache without
holes keeps version 1 and stays usable by it. Keeping rows contiguous instead would mean moving
committed vectors under readers that do not take the lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from semst.shared.errors import SemstError
from semst.shared.hashing import json_hash
from semst.shared.io import atomic_write, fsync_dir
from semst.shared.paths import DEFAULT_MODEL_NAME

FORMAT = {"format": "semst-embedding-cache", "version": 1}
# The marker of a cache whose rows have holes (see the module docstring); only `repair` writes it.
FORMAT_WITH_HOLES = {"format": "semst-embedding-cache", "version": 2,
                     "why": "semst cache repair removed damaged rows; a semst without row checksums would write "
                            "new rows over committed ones, so it must refuse this cache: use a newer semst"}
READABLE_VERSIONS = (1, 2)
MARKER = "semst_cache.json"
CHUNK_ROWS = 1024
# Automatic compaction: a commit that leaves this many index parts of one size class (entries within a
# factor of it) merges them into one, so a space keeps a few dozen parts at most (see _parts_to_merge).
COMPACT_FANOUT = 8
MERGE_BATCH = 65536  # rows a merge reads and commits at a time
CHECKSUM = "blake2b"
CHECKSUM_BYTES = 16
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_PART_SCHEMA = pa.schema([("prompt_hash", pa.string()), ("row", pa.int64()), ("prompt", pa.string()),
                          ("n_tokens", pa.int32()), (CHECKSUM, pa.binary(CHECKSUM_BYTES))])
_PART_REQUIRED = ("prompt_hash", "row", "prompt", "n_tokens")  # CHECKSUM is absent from older parts
_SPOT_SCHEMA = pa.schema([("spot_id", pa.string()), ("prompt_hash", pa.string())])
_META = b"semst"
_META_DIGEST = b"semst.blake2b"
# What a row found by `verify` can be; all but "ok" and "unchecked" are dropped by `repair`.
_BAD_ROWS = {"checksum": "checksum mismatch", "undecodable": "chunk cannot be decoded",
             "nonfinite": "NaN or inf (written before checksums)", "past_end": "past the vectors array",
             "conflict": "claimed twice in the index"}
# Write faults a user can act on; anything else stays a traceback (a bug, or a failing disk).
_WRITE_FAULTS = {errno.ENOSPC: ("disk full", "free space or use another --cache"),
                 errno.EDQUOT: ("disk quota exceeded", "free space or use another --cache"),
                 errno.EROFS: ("read-only file system", "use another --cache, or remount it read-write"),
                 errno.EACCES: ("permission denied", "use another --cache, or get write permission on it"),
                 errno.EPERM: ("operation not permitted", "use another --cache, or get write permission on it")}


class CacheError(SemstError, RuntimeError):
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


def embedding_tag(cfg, label: str | None = None, text: str = "chat") -> str:
    """Name of the spot -> prompt-hash table one embed setting (an ``EmbedConfig``) writes and
    stage 2 looks up: the contract between the stages. The one tag function of every backend.

    Readable parts plus a short hash of everything that changes the prompts (k_g, template, which
    genes are ranked and by what -- raw counts or the preprocessed matrix --, and the preprocessing
    that picks the HVGs), so two settings never share a tag.
    ``label``: the model's name in the tag (default ``model_label(cfg.model)``; a sentence encoder
    gives its own). ``text``: "chat" (prompts in the model's chat template) or "plain" (the gene text
    alone, as a sentence encoder reads it; such tags record it and have always kept the preprocessing's
    ``require_top_genes``, so their existing tags stay valid too).
    """
    prompt_settings = {"k": cfg.k_genes, "template": cfg.template, "genes_from": cfg.genes_from,
                       "preprocess": dataclasses.asdict(cfg.preprocess) if cfg.genes_from == "hvg" else None}
    ranking = cfg.gene_ranking
    if ranking != "counts":  # absent for counts, so the tags of existing spot tables stay valid
        prompt_settings["ranking"] = ranking
    if text != "chat":
        prompt_settings["text"] = text
    elif prompt_settings["preprocess"] is not None:  # whether the HVG count is enforced changes no prompt
        prompt_settings["preprocess"].pop("require_top_genes", None)
    label = model_label(cfg.model) if label is None else label
    return f"{label}.{cfg.pooling}.k{cfg.k_genes}.{cfg.template}.{json_hash(prompt_settings, 8)}"


def _safe_name(name: str, what: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        raise CacheError(f"{what} {name!r} cannot be used as a file name")
    return name




class DamagedFileError(CacheError):
    """A Parquet file of the cache fails its checksums, its expected columns, or cannot be parsed."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is unreadable ({reason})")
        self.path, self.reason = path, reason


def row_checksums(block: np.ndarray) -> list[bytes]:
    """BLAKE2b-128 of each row's bytes as Zarr stores them (little-endian)."""
    stored = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))  # no copy on x86/ARM
    return [hashlib.blake2b(row, digest_size=CHECKSUM_BYTES).digest() for row in stored]


def _meta_digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=CHECKSUM_BYTES).hexdigest().encode()


def _few(items, n: int = 5) -> str:
    """'3, 7, 9' or '3, 7, 9, 12, 15, ... (40 in all)'."""
    items = list(items)
    head = ", ".join(str(i) for i in items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _write_parquet(path: Path, table: pa.Table) -> Path:
    """Atomically and durably, with Parquet page checksums that every read of the cache verifies."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True), durable=True)


def _read_parquet(path: Path, schema: pa.Schema, required: Sequence[str],
                  columns: Sequence[str] | None = None) -> pa.Table:
    """``path`` read with its page checksums verified and its columns checked against ``schema``
    (a bit flipped in the footer can rename or retype a column, which no page checksum sees); a
    DamagedFileError for anything wrong. A column this version does not know counts as damage too:
    a format that adds columns must come with a new marker version. FileNotFoundError passes through
    (removed meanwhile); no permission to read is a CacheError, not damage (``repair`` removes
    damaged files, never one it merely may not read)."""
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as pf:
            found = pf.schema_arrow
            names = set(found.names)
            if not set(required) <= names or not names <= set(schema.names) or len(found.names) != len(names):
                raise DamagedFileError(path, f"columns {found.names}, expected {schema.names}")
            for f in found:
                if f.type != schema.field(f.name).type:
                    raise DamagedFileError(path, f"column {f.name} is {f.type}, expected {schema.field(f.name).type}")
            wanted = None if columns is None else [c for c in columns if c in names]
            return pf.read(columns=wanted)
    except (FileNotFoundError, DamagedFileError):
        raise
    except PermissionError as exc:
        raise CacheError(f"no permission to read {path} ({_short(exc)}): run semst as a user who may read "
                         f"the cache") from None
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError (CRC mismatch, Thrift), ...: all mean damage
        raise DamagedFileError(path, _short(exc)) from None


def _read_part(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    return _read_parquet(path, _PART_SCHEMA, _PART_REQUIRED, columns)


def _spot_meta(table_or_schema, path: Path) -> dict:
    metadata = table_or_schema.schema.metadata if hasattr(table_or_schema, "schema") else table_or_schema.metadata
    raw = (metadata or {}).get(_META)
    if raw is None:
        raise DamagedFileError(path, "no semst metadata")
    digest = metadata.get(_META_DIGEST)
    if digest is not None and digest != _meta_digest(raw):  # spot tables before checksums have none
        raise DamagedFileError(path, "its run metadata fails its checksum")
    try:
        return json.loads(raw)
    except ValueError:
        raise DamagedFileError(path, "its run metadata is not JSON") from None


class SpotTableError(CacheError):
    """A spot table cannot be read: absent, damaged, or without the embedding space it keys into."""


class UncoveredSpotsError(CacheError):
    """A spot table lists only some of the spots asked for (it was written for a subset)."""


@dataclass(frozen=True)
class SpotTableMeta:
    """The run metadata of a spot table (what embed.run writes into its Parquet footer), typed.

    A key an older semst did not write is None; every key as stored, known or not, stays in ``raw``
    (the keys this class does not name: ``extra``).
    """

    dataset: str
    tag: str
    n_spots: int | None = None
    space: EmbeddingSpace | None = None  # the space its prompt hashes are rows of
    space_id: str | None = None
    model: str | None = None  # the model as given (an LLM: "default", a directory, an HF id) or the encoder
    model_dir: str | None = None
    pooling: str | None = None
    k_genes: int | None = None
    template: str | None = None
    genes_from: str | None = None
    gene_ranking: str | None = None
    n_empty_spots: int | None = None
    encoder: str | None = None  # set by a sentence encoder (embed.sentence_encoder)
    text: str | None = None  # "plain": the gene text without chat formatting (a sentence encoder)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> SpotTableMeta:
        names = {f.name for f in dataclasses.fields(cls)} - {"space", "raw"}
        known = {k: v for k, v in raw.items() if k in names}
        space = raw.get("space")
        try:
            space = EmbeddingSpace(**space) if isinstance(space, dict) else None
        except TypeError:  # not the five fields of a space: as if absent (still in ``raw``)
            space = None
        return cls(**{"dataset": "", "tag": "", **known}, space=space, raw=dict(raw))

    @property
    def extra(self) -> dict:
        """The stored keys this class does not name."""
        names = {f.name for f in dataclasses.fields(self)}
        return {k: v for k, v in self.raw.items() if k not in names}

    def embedding_space(self) -> EmbeddingSpace:
        """The space the table's prompt hashes are rows of; a SpotTableError if it names none."""
        if self.space is None:
            raise SpotTableError(f"the spot table {self.dataset}/{self.tag} names no embedding space: run "
                                 f"`semst embed {self.dataset}` with the settings of that tag again to rewrite it")
        return self.space


@contextlib.contextmanager
def _write_faults(cache_path: Path, doing: str, after: str = "the cache is unchanged") -> Iterator[None]:
    """Turn the write faults a user can fix (full disk, read-only, no permission) into a CacheError
    that says where and what to do; ``after`` says what state the cache was left in."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_FAULTS:
            raise
        fault, todo = _WRITE_FAULTS[exc.errno]
        where = f" (writing {exc.filename})" if exc.filename and Path(exc.filename) != cache_path else ""
        raise CacheError(f"{fault} while {doing} {cache_path}{where}: {todo}; {after}") from exc


def _resolve_conflicts(entries: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split checked index entries into those ``repair`` keeps and those it drops: the damaged ones;
    then, of one prompt on two rows or two prompts on one row, an unchecked entry that conflicts with
    one whose checksum matched; then every entry still in conflict (its prompt is computed again)."""
    bad = entries["status"].isin(list(_BAD_ROWS))
    kept = entries[~bad]
    ok = kept[kept["status"] == "ok"]
    loses = (kept["status"] == "unchecked") & (kept["prompt_hash"].isin(ok["prompt_hash"]) | kept["row"].isin(ok["row"]))
    dropped = [entries[bad], kept[loses].assign(status="conflict")]
    kept = kept[~loses]
    twice = kept["prompt_hash"].duplicated(keep=False) | kept["row"].duplicated(keep=False)
    dropped.append(kept[twice].assign(status="conflict"))
    return kept[~twice], pd.concat(dropped)


@dataclass
class _Index:
    """What readers need of a space's index: hash -> row, row -> digest (checked rows only), and
    the row after the highest one any part names (where the next rows go). ``parts``: the parts
    read into it, with their number of entries, in the order they were read (sorted by name)."""

    parts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    checksums: dict[int, bytes] = field(default_factory=dict)
    top: int = 0

    def take(self, name: str, table: pa.Table) -> None:
        """Add the entries of part ``name`` (read with prompt_hash, row and, if it has one, the digest)."""
        self.parts[name] = table.num_rows
        if not table.num_rows:
            return
        rows = table.column("row").to_numpy()
        self.rows.update(zip(table.column("prompt_hash").to_pylist(), rows.tolist()))
        self.top = max(self.top, int(rows.max()) + 1)
        if CHECKSUM in table.column_names:
            digests = table.column(CHECKSUM)
            if digests.null_count:
                self.checksums.update((r, c) for r, c in zip(rows.tolist(), digests.to_pylist()) if c is not None)
            else:
                self.checksums.update(zip(rows.tolist(), digests.to_pylist()))


def _level(n: int) -> int:
    """The compaction level of a part of ``n`` entries: parts within a factor COMPACT_FANOUT merge together."""
    level = 0
    while n >= COMPACT_FANOUT:
        n //= COMPACT_FANOUT
        level += 1
    return level


def _parts_to_merge(parts: dict[str, int]) -> list[str]:
    """The parts of the lowest level that holds COMPACT_FANOUT or more of them (none if no level does).
    Merging by level keeps at most COMPACT_FANOUT - 1 parts per level (so O(log rows) parts), and
    rewrites each entry only once per level it climbs: the cost of a commit stays flat."""
    by_level: dict[int, list[str]] = {}
    for name, n in parts.items():
        by_level.setdefault(_level(n), []).append(name)
    for level in sorted(by_level):
        if len(by_level[level]) >= COMPACT_FANOUT:
            return by_level[level]
    return []


def _part_entries(tables: Sequence[pa.Table]) -> pa.Table:
    """Index parts as one table of the part schema, one entry per distinct (prompt_hash, row) (the copy
    with a digest wins), sorted by row: what a merged part holds."""
    full = []
    for t in tables:
        if CHECKSUM not in t.column_names:  # a part written before checksums
            t = t.append_column(CHECKSUM, pa.nulls(t.num_rows, pa.binary(CHECKSUM_BYTES)))
        full.append(t.select(_PART_SCHEMA.names).cast(_PART_SCHEMA))
    df = pa.concat_tables(full).to_pandas()
    df["_unchecked"] = df[CHECKSUM].isna()
    df = (df.sort_values("_unchecked", kind="stable").drop_duplicates(["prompt_hash", "row"])
          .drop(columns="_unchecked").sort_values("row", kind="stable"))
    return pa.Table.from_pandas(df, schema=_PART_SCHEMA, preserve_index=False)


@dataclass
class SpaceCheck:
    """What ``check`` found in one space: one row of ``entries`` per distinct (prompt_hash, row) with
    its ``status`` ("ok", "unchecked" or a key of _BAD_ROWS) and ``actual`` digest."""

    space: EmbeddingSpace
    entries: pd.DataFrame
    readable_parts: list[str]
    unreadable_parts: dict[str, str]
    problems: list[str]
    n_unchecked: int
    undecodable_chunks: dict[int, str] = field(default_factory=dict)


@dataclass
class CacheCheck:
    problems: list[str]
    notes: list[str]
    spaces: list[SpaceCheck]
    damaged_spot_tables: dict[str, str]  # path relative to the cache -> reason

class EmbeddingCache:
    """A Zarr embedding store shared by many runs, datasets and checkouts."""

    def __init__(self, path: str | Path, create: bool = True):
        import zarr

        self.path = Path(path)
        self.version = FORMAT["version"]
        marker = self.path / MARKER
        if self.path.exists():
            if not marker.exists():
                if self.path.is_dir() and not any(self.path.iterdir()) and create:
                    self._create()
                else:
                    raise CacheError(f"{self.path} exists but is not a semst embedding cache (no {MARKER}); "
                                     f"pass another --cache path")
            else:
                self.version = self._read_marker(marker)
        elif create:
            self._create()
        else:
            raise CacheError(f"no embedding cache at {self.path}: run `make embed DATASET=...` "
                             f"(or `semst embed DATASET --cache {self.path}`) first")
        self._zarr = zarr
        self._root = zarr.open_group(str(self.path), mode="a")
        self._index: dict[str, _Index] = {}

    # -- set-up -----------------------------------------------------------------------------------
    def _read_marker(self, marker: Path) -> int:
        try:
            found = json.loads(marker.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise CacheError(f"the format marker {marker} is damaged ({_short(exc)}); it should read "
                             f"{json.dumps(FORMAT)}") from None
        if (not isinstance(found, dict) or found.get("format") != FORMAT["format"]
                or found.get("version") not in READABLE_VERSIONS):
            raise CacheError(f"{self.path} is a cache of format {found}, this semst reads {FORMAT}")
        return found["version"]

    def _write_marker(self, fmt: dict) -> None:
        atomic_write(self.path / MARKER, lambda tmp: tmp.write_text(json.dumps(fmt)), durable=True)
        self.version = fmt["version"]

    def _create(self) -> None:
        with _write_faults(self.path, "creating the cache", "no cache was created"):
            self._initialise()

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

    def check_writable(self) -> None:
        """A CacheError now if this process cannot write the cache (read-only mount, no permission):
        called before a model is loaded, so that is not found after the first batch was computed."""
        with _write_faults(self.path, "checking that it can write to", "nothing was written"):
            fd, name = tempfile.mkstemp(prefix=".tmp-writable-", dir=self.path)
            os.close(fd)
            os.unlink(name)
            for sub in ("spaces", "index", "spot_tables"):  # access() only: their times stay as they are
                d = self.path / sub
                if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "cannot write", str(d))
            with self._lock():
                pass

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.path / ".lock"))

    def _index_dir(self, space: EmbeddingSpace) -> Path:
        return self.path / "index" / space.space_id

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.path))

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

    def _chunk_file(self, space: EmbeddingSpace, array, chunk: int) -> str:
        """The chunk file holding chunk ``chunk`` of ``array``, relative to the cache."""
        try:
            return self._chunk_key(space, array, chunk)
        except AttributeError:  # not a Zarr v3 array: name the chunk by number
            return f"spaces/{space.space_id}/vectors/chunk {chunk}"

    @staticmethod
    def _chunk_key(space: EmbeddingSpace, array, chunk: int) -> str:
        return f"spaces/{space.space_id}/vectors/{array.metadata.encode_chunk_key((chunk, 0))}"

    # -- index ------------------------------------------------------------------------------------
    def _parts(self, space: EmbeddingSpace) -> tuple[str, ...]:
        d = self._index_dir(space)
        if not d.is_dir():
            return ()
        return tuple(sorted(p.name for p in d.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet"))

    def _load_index(self, space: EmbeddingSpace) -> _Index:
        """The space's index, read incrementally: parts are immutable, so only parts not read yet are
        read. A part that is gone (a gc, repair or compaction replaced it) or a new part that sorts
        before one already read makes it read again from scratch, so the result is always what reading
        every part in name order gives. A CacheError naming the part if one is damaged: nothing reads
        or writes a space whose index is unknown."""
        for _ in range(5):
            parts = self._parts(space)
            index = self._index.get(space.space_id)
            if index is not None:
                new = [name for name in parts if name not in index.parts]
                if len(index.parts) + len(new) != len(parts) or (new and index.parts and new[0] < max(index.parts)):
                    index = None  # a part read before is gone, or the order changed: read them all
            if index is None:
                index, new = _Index(), list(parts)
                self._index.pop(space.space_id, None)
            try:
                self._read_parts_into(index, space, new)
            except FileNotFoundError:  # a gc or repair replaced the parts between listing and reading
                self._index.pop(space.space_id, None)
                continue
            self._index[space.space_id] = index
            return index
        raise CacheError(f"the index of space {space.space_id} in {self.path} kept changing while being read "
                         f"(a gc or repair running?); try again")

    def _read_parts_into(self, index: _Index, space: EmbeddingSpace, names: Sequence[str]) -> None:
        d = self._index_dir(space)
        for name in names:
            try:
                t = _read_part(d / name, columns=("prompt_hash", "row", CHECKSUM))
            except DamagedFileError as exc:
                raise CacheError(f"index part {self._relative(d / name)} of space {space.space_id} in {self.path} "
                                 f"is unreadable ({exc.reason}): run `semst cache repair --cache {self.path}`, "
                                 f"then `semst embed` again to recompute what it drops") from None
            index.take(name, t)

    def _hash_rows(self, space: EmbeddingSpace) -> dict[str, int]:
        """hash -> row of every committed row."""
        return self._load_index(space).rows

    def count(self, space: EmbeddingSpace) -> int:
        return len(self._hash_rows(space))

    def contains(self, space: EmbeddingSpace, hashes: Sequence[str]) -> np.ndarray:
        if self._vectors(space) is None:
            return np.zeros(len(hashes), dtype=bool)
        rows = self._hash_rows(space)
        return np.fromiter((h in rows for h in hashes), dtype=bool, count=len(hashes))

    def get(self, space: EmbeddingSpace, hashes: Sequence[str], check: bool = True) -> np.ndarray:
        """The vectors of ``hashes``, in that order. Every row read is checked against its digest
        (rows written before checksums: against NaN / inf) unless ``check`` is False (benchmarks)."""
        vectors = self._vectors(space)
        index = self._load_index(space) if vectors is not None else _Index()
        rows = index.rows
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
        if hi > vectors.shape[0]:
            raise CacheError(f"the index of space {space.space_id} in {self.path} points at row {hi - 1}, past the "
                             f"{vectors.shape[0]} rows of its vectors array: run `semst cache repair --cache "
                             f"{self.path}`, then `semst embed` again to recompute what it drops")
        block = self._read_rows(space, vectors, lo, hi)
        if check:
            self._check_rows(space, index, vectors, block, lo, np.unique(idx))
        return block[idx - lo]

    def _read_rows(self, space: EmbeddingSpace, vectors, lo: int, hi: int) -> np.ndarray:
        try:
            return np.asarray(vectors[lo:hi])
        except Exception as exc:  # noqa: BLE001 - which chunk? read them one by one to say
            bad = self._undecodable_chunks(space, vectors, lo, hi)
            if not bad:
                raise
            raise CacheError(f"chunk file {_few(bad, 3)} of space {space.space_id} in {self.path} cannot be decoded "
                             f"({_short(exc)}): run `semst cache repair --cache {self.path}`, then `semst embed` "
                             f"again to recompute its rows") from None

    def _undecodable_chunks(self, space: EmbeddingSpace, vectors, lo: int, hi: int) -> list[str]:
        """The chunk files covering rows [lo, hi) that do not decode (read one by one to say which)."""
        step = vectors.chunks[0]
        return [self._chunk_file(space, vectors, c) for c in range(lo // step, (hi - 1) // step + 1)
                if not self._decodes(vectors, c)]

    def _check_rows(self, space: EmbeddingSpace, index: _Index, vectors, block: np.ndarray, lo: int,
                    rows: np.ndarray) -> None:
        stored = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
        digest = hashlib.blake2b
        bad, unchecked = [], []
        for r in rows.tolist():
            want = index.checksums.get(r)
            if want is None:
                unchecked.append(r)
            elif digest(stored[r - lo], digest_size=CHECKSUM_BYTES).digest() != want:
                bad.append(r)
        if unchecked:
            u = np.asarray(unchecked, dtype=np.int64)
            bad.extend(u[~np.isfinite(block[u - lo]).all(axis=1)].tolist())
        if bad:
            bad.sort()
            step = vectors.chunks[0]
            files = sorted({self._chunk_file(space, vectors, r // step) for r in bad})
            raise CacheError(f"{len(bad)} of the {len(rows)} rows read from space {space.space_id} ({space.model}, "
                             f"{space.pooling}) in {self.path} are damaged (rows {_few(bad)}; chunk file "
                             f"{_few(files, 3)}): run `semst cache repair --cache {self.path}` and then "
                             f"`semst embed` again to recompute them")

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
        with _write_faults(self.path, "adding rows to", "no committed row changed"), self._lock():
            return self._append(space, hashes, vectors, prompts, n_tokens)

    def _append(self, space: EmbeddingSpace, hashes: Sequence[str], vectors: np.ndarray, prompts: Sequence[str],
                n_tokens: Sequence[int], checksums: Sequence[bytes | None] | None = None) -> int:
        """``add`` under the lock, its input checked. ``checksums``: the digests to record (a merge carries
        its source's, None for a row written before checksums); computed from the rows if not given."""
        array = self._vectors(space, create=True)
        index = self._load_index(space)
        committed = index.rows
        keep, seen = [], set()
        for i, h in enumerate(hashes):
            if h not in committed and h not in seen:
                seen.add(h)
                keep.append(i)
        if not keep:
            return 0
        # After the highest row any part names: never over a committed row, holes or not.
        start = index.top
        stop = start + len(keep)
        block = vectors[keep].astype(space.dtype, copy=False)
        if array.shape[0] < stop:
            array.resize((stop, space.dim))
        try:
            array[start:stop] = block
        except OSError as exc:  # Zarr's store does not always say which file
            exc.filename = exc.filename or str(self.path / "spaces" / space.space_id / "vectors")
            raise
        except Exception as exc:  # noqa: BLE001 - Zarr decodes a chunk it fills in part: a damaged one?
            bad = self._undecodable_chunks(space, array, start, stop)
            if not bad:
                raise
            raise CacheError(f"cannot add rows to space {space.space_id} in {self.path}: chunk file "
                             f"{_few(bad, 3)} cannot be decoded ({_short(exc)}); run `semst cache repair "
                             f"--cache {self.path}` first; the cache is unchanged") from None
        self._fsync_rows(space, array, start, stop)
        digests = row_checksums(block) if checksums is None else [checksums[i] for i in keep]
        table = pa.table({
            "prompt_hash": pa.array([hashes[i] for i in keep], pa.string()),
            "row": pa.array(np.arange(start, stop, dtype=np.int64)),
            "prompt": pa.array([prompts[i] for i in keep], pa.string()),
            "n_tokens": pa.array([int(n_tokens[i]) for i in keep], pa.int32()),
            CHECKSUM: pa.array(digests, pa.binary(CHECKSUM_BYTES)),
        }, schema=_PART_SCHEMA)
        d = self._index_dir(space)
        d.mkdir(parents=True, exist_ok=True)
        part = _write_parquet(self._new_part_path(space), table)
        if list(index.parts) and part.name < max(index.parts):  # a clock that went back: read all next time
            self._index.pop(space.space_id, None)
        else:  # this process knows what it committed: the next _load_index reads only others' parts
            index.take(part.name, table.select(["prompt_hash", "row", CHECKSUM]))
        self._compact(space)
        return len(keep)

    def _compact(self, space: EmbeddingSpace) -> None:
        """Merge index parts of one size class while COMPACT_FANOUT of them exist (under the lock).
        Crash-safe as ``_rewrite_index``: the merged part is renamed in before the old ones are removed,
        and readers take an entry listed twice as one. A part that cannot be read now is left alone
        for ``verify`` / ``repair``: compaction never removes what it could not copy."""
        d = self._index_dir(space)
        index = self._load_index(space)
        while names := _parts_to_merge(index.parts):
            try:
                merged = _part_entries([_read_part(d / name) for name in names])
            except (FileNotFoundError, CacheError):
                return
            part = _write_parquet(self._new_part_path(space), merged)
            for name in names:
                (d / name).unlink(missing_ok=True)
            fsync_dir(d)
            for name in names:
                del index.parts[name]
            index.parts[part.name] = merged.num_rows  # the same entries: rows and digests stay as they are

    @staticmethod
    def _decodes(array, chunk: int) -> bool:
        step = array.chunks[0]
        try:
            array[chunk * step:min((chunk + 1) * step, array.shape[0])]
        except Exception:  # noqa: BLE001
            return False
        return True

    def _new_part_path(self, space: EmbeddingSpace) -> Path:
        # Names sort by time then randomness; the order is only cosmetic (rows are explicit).
        return self._index_dir(space) / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"

    @staticmethod
    def _fsync_tree(path: Path) -> None:
        """Make freshly written chunk files and metadata durable before the commit record."""
        for p in path.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        for p in [path, *[q for q in path.rglob("*") if q.is_dir()]]:
            fsync_dir(p)

    def _fsync_rows(self, space: EmbeddingSpace, array, start: int, stop: int) -> None:
        """Make the chunk files holding rows [start, stop) and the array's metadata (its shape) durable
        before the commit record: only what this commit wrote, so a commit costs the same at any size."""
        vectors_dir = self.path / "spaces" / space.space_id / "vectors"
        step = int(array.chunks[0])
        try:
            files = [self.path / self._chunk_key(space, array, c) for c in range(start // step, (stop - 1) // step + 1)]
        except AttributeError:  # not a Zarr v3 array: its chunk names are unknown here
            self._fsync_tree(self.path / "spaces" / space.space_id)
            return
        dirs = {vectors_dir}
        for p in [*files, vectors_dir / "zarr.json"]:
            try:
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:  # Zarr does not write a chunk that is all fill value
                pass
            q = p.parent
            while q != vectors_dir and vectors_dir in q.parents:
                dirs.add(q)
                q = q.parent
        for q in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
            if q.is_dir():
                fsync_dir(q)

    # -- spot tables ------------------------------------------------------------------------------
    def _spot_path(self, dataset: str, tag: str) -> Path:
        return self.path / "spot_tables" / _safe_name(dataset, "dataset") / f"{_safe_name(tag, 'tag')}.parquet"

    def write_spot_table(self, dataset: str, tag: str, spot_ids, hashes, meta: dict) -> Path:
        spot_ids = [str(s) for s in spot_ids]
        if len(spot_ids) != len(hashes):
            raise CacheError(f"spot table needs one hash per spot: {len(spot_ids)} spots, {len(hashes)} hashes")
        meta = {**meta, "dataset": dataset, "tag": tag, "n_spots": len(spot_ids)}
        raw = json.dumps(meta, default=str).encode()
        table = pa.table({"spot_id": pa.array(spot_ids, pa.string()),
                          "prompt_hash": pa.array(list(hashes), pa.string())})
        table = table.replace_schema_metadata({_META: raw, _META_DIGEST: _meta_digest(raw)})
        dest = self._spot_path(dataset, tag)
        with _write_faults(self.path, f"writing the spot table {dataset}/{tag} of"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_parquet(dest, table)
        return dest

    def read_spot_table(self, dataset: str, tag: str) -> tuple[pd.DataFrame, dict]:
        """The spot table (spot_id, prompt_hash) and its run metadata as stored; a SpotTableError if
        it is absent or unreadable (its message as any CacheError's)."""
        try:
            return self._read_spot_table(dataset, tag)
        except SpotTableError:
            raise
        except CacheError as exc:  # a tag that is no file name, no permission to read it, ...
            raise SpotTableError(str(exc)) from None

    def _read_spot_table(self, dataset: str, tag: str) -> tuple[pd.DataFrame, dict]:
        path = self._spot_path(dataset, tag)
        if not path.exists():
            existing = [m["tag"] for m in self.spot_tables(dataset)]
            hint = (f"tags that exist for {dataset}: {', '.join(existing)}" if existing
                    else f"no spot table at all for {dataset}")
            raise SpotTableError(f"no spot table {tag!r} for {dataset} in {self.path} ({hint})")
        try:
            table = _read_parquet(path, _SPOT_SCHEMA, _SPOT_SCHEMA.names)
            meta = _spot_meta(table, path)
        except DamagedFileError as exc:
            raise SpotTableError(f"the spot table {dataset}/{tag} in {self.path} is unreadable ({exc.reason}): run "
                                 f"`semst embed {dataset}` with the settings of that tag again to rewrite it") from None
        return table.to_pandas(), meta

    def spot_table_meta(self, dataset: str, tag: str) -> SpotTableMeta:
        """The typed run metadata of a spot table (the whole table is read and checked)."""
        _, meta = self.read_spot_table(dataset, tag)
        return SpotTableMeta.from_dict(meta)

    def vectors_for(self, dataset: str, tag: str, spot_ids: Sequence[str]) -> tuple[np.ndarray, SpotTableMeta]:
        """The cached vectors of ``dataset``'s spot table ``tag``: one float32 row per spot of
        ``spot_ids``, in that order, checked as ``get`` checks them; and the table's metadata.

        The one reader that joins spots to vectors (stage 2, the API and the experiments use it).
        A SpotTableError if the table is absent, unreadable or names no space; an
        UncoveredSpotsError if a spot is not in it; a CacheError if vectors are absent or damaged.
        """
        table, raw = self.read_spot_table(dataset, tag)
        meta = SpotTableMeta.from_dict(raw)
        space = meta.embedding_space()
        by_spot = pd.Series(table["prompt_hash"].to_numpy(), index=table["spot_id"].astype(str).to_numpy())
        missing = pd.Index(spot_ids).difference(by_spot.index)
        if len(missing):
            raise UncoveredSpotsError(f"the spot table {tag} covers {len(by_spot)} spots but {len(missing)} of "
                                      f"{dataset}'s {len(spot_ids)} spots are not in it (e.g. {list(missing[:3])}); "
                                      f"it was written for a subset")
        vectors = self.get(space, by_spot.loc[list(spot_ids)].tolist())
        return vectors.astype(np.float32, copy=False), meta

    def spot_tables(self, dataset: str | None = None) -> list[dict]:
        """The run metadata of every spot table; one that cannot be read is listed with its dataset,
        tag and ``unreadable`` (the reason)."""
        out = []
        for path in self._spot_table_paths(dataset):
            try:
                out.append(_spot_meta(pq.read_schema(path), path))
            except FileNotFoundError:
                continue
            except DamagedFileError as exc:
                out.append({"dataset": path.parent.name, "tag": path.stem, "unreadable": exc.reason})
            except Exception as exc:  # noqa: BLE001 - a footer that cannot be parsed
                out.append({"dataset": path.parent.name, "tag": path.stem, "unreadable": _short(exc)})
        return out

    def _spot_table_paths(self, dataset: str | None = None) -> list[Path]:
        root = self.path / "spot_tables"
        if not root.is_dir():
            return []
        dirs = [root / dataset] if dataset else sorted(p for p in root.iterdir() if p.is_dir())
        return [p for d in dirs if d.is_dir() for p in sorted(d.glob("*.parquet")) if not p.name.startswith(".tmp-")]

    # -- maintenance ------------------------------------------------------------------------------
    def info(self) -> dict:
        spaces = []
        for space in self.spaces():
            arr = self._vectors(space)
            d = self._index_dir(space)
            size = sum(p.stat().st_size for p in (self.path / "spaces" / space.space_id).rglob("*") if p.is_file())
            entry = {"space_id": space.space_id, **dataclasses.asdict(space), "allocated_rows": int(arr.shape[0]),
                     "bytes": size, "index_parts": len(self._parts(space))}
            try:
                tokens = sum(int(_read_part(d / name, columns=["n_tokens"]).column("n_tokens").to_numpy().sum())
                             for name in self._parts(space))
                entry.update(rows=self.count(space), tokens=tokens)
            except (CacheError, FileNotFoundError) as exc:
                entry.update(rows=None, tokens=None, damaged=str(exc))
            spaces.append(entry)
        return {"path": str(self.path), "format": {**FORMAT, "version": self.version}, "spaces": spaces,
                "spot_tables": self.spot_tables()}

    def _read_entries(self, space: EmbeddingSpace) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
        """Every index entry of a readable part, one per distinct (prompt_hash, row) (the same entry in
        two parts is what a gc or repair killed before it removed the old parts leaves; the copy with a
        digest wins), sorted by row; the readable parts' names and the unreadable ones' reasons."""
        d = self._index_dir(space)
        tables, readable, unreadable = [], [], {}
        for name in self._parts(space):
            try:
                t = _read_part(d / name)
            except FileNotFoundError:
                continue
            except DamagedFileError as exc:
                unreadable[name] = exc.reason
                continue
            if CHECKSUM not in t.column_names:  # a part written before checksums
                t = t.append_column(CHECKSUM, pa.nulls(t.num_rows, pa.binary(CHECKSUM_BYTES)))
            tables.append(t.select(_PART_SCHEMA.names).cast(_PART_SCHEMA)
                          .append_column("part", pa.array([name] * t.num_rows, pa.string())))
            readable.append(name)
        if tables:
            df = pa.concat_tables(tables).to_pandas()
        else:
            df = pd.DataFrame({c: pd.Series(dtype=object) for c in [*_PART_SCHEMA.names, "part"]}).astype({"row": "int64"})
        df["_unchecked"] = df[CHECKSUM].isna()
        df = (df.sort_values("_unchecked", kind="stable").drop_duplicates(["prompt_hash", "row"])
              .drop(columns="_unchecked").sort_values("row", kind="stable").reset_index(drop=True))
        return df, readable, unreadable

    def _check_space(self, space: EmbeddingSpace) -> SpaceCheck:
        """Read every index part and every committed row of ``space`` and say what is wrong."""
        sid = space.space_id
        arr = self._vectors(space)
        df, readable, unreadable = self._read_entries(space)
        problems = [f"space {sid}: index part {self._relative(self._index_dir(space) / name)} is unreadable "
                    f"({reason}); its rows are lost" for name, reason in unreadable.items()]
        rows = df["row"].to_numpy(dtype=np.int64)
        want = df[CHECKSUM].to_numpy(dtype=object)
        status = np.full(len(df), "ok", dtype=object)
        actual = np.full(len(df), None, dtype=object)
        n_alloc, step = int(arr.shape[0]), int(arr.chunks[0])
        status[(rows < 0) | (rows >= n_alloc)] = "past_end"
        undecodable: dict[int, str] = {}
        first, last = np.searchsorted(rows, 0), np.searchsorted(rows, n_alloc)  # rows are sorted
        i = first
        while i < last:  # one chunk at a time: bounded memory, and a bad chunk names itself
            chunk = int(rows[i]) // step
            j = min(int(np.searchsorted(rows, (chunk + 1) * step)), int(last))
            base = chunk * step
            try:
                block = np.asarray(arr[base:min(base + step, n_alloc)])
            except Exception as exc:  # noqa: BLE001 - zstd, truncated file, bad header: all damage
                status[i:j] = "undecodable"
                undecodable[chunk] = _short(exc)
                i = j
                continue
            digests = row_checksums(block)
            finite = np.isfinite(block).all(axis=1)
            for k in range(i, j):
                r = int(rows[k]) - base
                actual[k] = digests[r]
                if want[k] is None:
                    status[k] = "unchecked" if finite[r] else "nonfinite"
                elif digests[r] != want[k]:
                    status[k] = "checksum"
            i = j
        df["status"], df["actual"] = status, actual
        problems += self._row_problems(space, arr, df, undecodable)
        problems += self._conflict_problems(space, df)
        indexed = set(df["row"].tolist())
        holes = (max(indexed) + 1 - len(indexed)) if indexed else 0
        if holes and self.version == 1 and not unreadable:
            problems.append(f"space {sid}: {_rows(holes)} below row {max(indexed)} are not committed but the cache "
                            f"marker says version 1, so a semst without row checksums would write over committed "
                            f"rows: run `semst cache repair` (it marks the cache)")
        n_unchecked = int((status == "unchecked").sum())
        return SpaceCheck(space, df, readable, unreadable, problems, n_unchecked, undecodable)

    def _row_problems(self, space: EmbeddingSpace, arr, df: pd.DataFrame, undecodable: dict[int, str]) -> list[str]:
        sid, step = space.space_id, int(arr.chunks[0])
        out = []
        for kind in ("checksum", "undecodable", "nonfinite"):
            bad = df.loc[df["status"] == kind, "row"]
            for chunk, rows in bad.groupby(bad // step):
                where = self._chunk_file(space, arr, int(chunk))
                if kind == "undecodable":
                    out.append(f"space {sid}: chunk file {where} cannot be decoded ({undecodable[int(chunk)]}): "
                               f"its {len(rows)} committed rows (rows {_few(rows)}) are lost")
                else:
                    out.append(f"space {sid}: {_BAD_ROWS[kind]} in {_rows(len(rows))} (rows {_few(rows)}) "
                               f"of chunk file {where}")
        past = df[df["status"] == "past_end"]
        for part, rows in past.groupby("part")["row"]:
            out.append(f"space {sid}: index part {self._relative(self._index_dir(space) / part)} points at "
                       f"{len(rows)} rows past the {arr.shape[0]} rows of the vectors array (rows {_few(rows)})")
        return out

    def _conflict_problems(self, space: EmbeddingSpace, df: pd.DataFrame) -> list[str]:
        sid, out = space.space_id, []
        where = self._relative(self._index_dir(space))
        twice = df[df["prompt_hash"].duplicated(keep=False)].groupby("prompt_hash")["row"].apply(list)
        if len(twice):
            examples = "; ".join(f"prompt {h[:12]} is indexed at rows {' and '.join(map(str, rows))}"
                                 for h, rows in list(twice.items())[:3])
            out.append(f"space {sid}: {len(twice)} prompts are on more than one row in {where} ({examples})")
        shared = df[df["row"].duplicated(keep=False)].groupby("row")["prompt_hash"].size()
        if len(shared):
            out.append(f"space {sid}: {len(shared)} rows are claimed by two prompts in {where} "
                       f"(rows {_few(shared.index.tolist())})")
        return out

    def check(self) -> CacheCheck:
        """Read every index part, spot table and committed row; what is wrong (``problems``) and what
        is worth knowing (``notes``: rows written before checksums)."""
        try:
            spaces = self.spaces()
        except CacheError as exc:
            return CacheCheck([str(exc)], [], [], {})
        problems, notes, checks = [], [], []
        for space in spaces:
            found = self._check_space(space)
            checks.append(found)
            problems += found.problems
            if found.n_unchecked:
                notes.append(f"space {space.space_id}: {found.n_unchecked} rows unchecked (written before checksums); "
                             f"`semst cache verify --fix` records their checksums")
        known = {s.space_id for s in spaces}
        index_root = self.path / "index"
        if index_root.is_dir():
            for d in index_root.iterdir():
                if d.name not in known:
                    problems.append(f"index/{d.name} has no matching space")
        damaged = {}
        for path in self._spot_table_paths():
            rel = self._relative(path)
            try:
                meta = _spot_meta(_read_parquet(path, _SPOT_SCHEMA, _SPOT_SCHEMA.names), path)
            except FileNotFoundError:
                continue
            except DamagedFileError as exc:
                damaged[rel] = exc.reason
                problems.append(f"spot table {rel} is unreadable ({exc.reason}): `semst cache repair` removes it, "
                                f"`semst embed {path.parent.name}` with its settings writes it again")
                continue
            sid = meta.get("space_id")
            if sid and sid not in known:
                problems.append(f"spot table {meta.get('dataset')}/{meta.get('tag')} refers to missing space {sid}")
        return CacheCheck(problems, notes, checks, damaged)

    def verify(self) -> list[str]:
        """Every problem found, in words; an empty list means the cache is consistent."""
        return self.check().problems

    def _rewrite_index(self, space: EmbeddingSpace, entries: pd.DataFrame, old_parts: Sequence[str]) -> None:
        """Replace ``old_parts`` by one part holding ``entries``: the new part is renamed in first, so
        a crash in between leaves entries listed twice (which readers take as one), never lost."""
        d = self._index_dir(space)
        if len(entries):
            table = pa.Table.from_pandas(entries[_PART_SCHEMA.names], schema=_PART_SCHEMA, preserve_index=False)
            _write_parquet(self._new_part_path(space), table)
        for name in old_parts:
            (d / name).unlink(missing_ok=True)
        fsync_dir(d)
        self._index.pop(space.space_id, None)

    def repair(self) -> dict:
        """Drop from the index every row that is damaged (fails its checksum, is in a chunk that cannot
        be decoded, lies past the vectors, holds NaN / inf while unchecked, or is claimed twice) and
        every unreadable index part; remove unreadable spot tables. `semst embed` then recomputes
        exactly what was dropped. Returns what was dropped, and which spot tables now miss rows."""
        report = {"spaces": [], "spot_tables_removed": [], "marked_with_holes": False}
        after = "nothing committed was lost; run `semst cache repair` again once that is fixed"
        with _write_faults(self.path, "repairing", after), self._lock():
            found = self.check()
            for sc in found.spaces:
                df = sc.entries
                kept, dropped = _resolve_conflicts(df)
                holes = len(kept) and int(kept["row"].max()) + 1 != len(kept)
                if holes and self.version == 1:  # before the index shows a hole (see the module docstring)
                    self._write_marker(FORMAT_WITH_HOLES)
                    report["marked_with_holes"] = True
                if len(dropped) or sc.unreadable_parts:
                    self._rewrite_index(sc.space, kept, [*sc.readable_parts, *sc.unreadable_parts])
                top = int(kept["row"].max()) + 1 if len(kept) else 0
                removed = self._remove_undecodable_chunks(sc.space, set(sc.undecodable_chunks), top)
                if len(dropped) or sc.unreadable_parts or removed:
                    report["spaces"].append({
                        "space_id": sc.space.space_id,
                        "dropped": [{"prompt_hash": h, "row": int(r), "reason": _BAD_ROWS[s]}
                                    for h, r, s in zip(dropped["prompt_hash"], dropped["row"], dropped["status"])],
                        "unreadable_parts": dict(sc.unreadable_parts), "chunks_removed": removed})
            for rel in found.damaged_spot_tables:
                (self.path / rel).unlink(missing_ok=True)
                report["spot_tables_removed"].append(rel)
        report["to_embed_again"] = self._spot_tables_missing_rows()
        return report

    def _remove_undecodable_chunks(self, space: EmbeddingSpace, known: set[int], top: int) -> list[str]:
        """Remove the chunk files that cannot be decoded and hold no committed row (called after the index
        was rewritten without their rows): those ``check`` found, and any at or after ``top``, where
        ``add`` writes next and Zarr would have to decode a chunk to fill part of it. Zarr reads a
        missing chunk as its fill value, which no committed row points at."""
        arr = self._vectors(space)
        step = int(arr.chunks[0])
        n_chunks = -(-int(arr.shape[0]) // step)
        removed = []
        for chunk in sorted(known | set(range(top // step, n_chunks))):
            if (chunk * step < top and chunk not in known) or self._decodes(arr, chunk):
                continue
            rel = self._chunk_file(space, arr, chunk)
            (self.path / rel).unlink(missing_ok=True)
            removed.append(rel)
        return removed

    def _spot_tables_missing_rows(self) -> list[dict]:
        """Each readable spot table some of whose prompts are not (any more) in the cache."""
        out = []
        for meta in self.spot_tables():
            if "unreadable" in meta or "space" not in meta:
                continue
            try:
                table, _ = self.read_spot_table(meta["dataset"], meta["tag"])
                present = self.contains(EmbeddingSpace(**meta["space"]), table["prompt_hash"].tolist())
            except (CacheError, TypeError):
                continue
            if not present.all():
                out.append({"dataset": meta["dataset"], "tag": meta["tag"], "spots": int((~present).sum()),
                            "n_spots": len(present)})
        return out

    def record_checksums(self) -> int:
        """Record the digest of every row written before checksums that reads back finite from a chunk
        that decodes (``verify --fix``); the others stay as they are for ``repair``. Returns how many."""
        recorded = 0
        with _write_faults(self.path, "recording checksums in", "nothing committed was lost"), self._lock():
            for sc in self.check().spaces:
                df = sc.entries
                todo = ((df["status"] == "unchecked") & ~df["prompt_hash"].duplicated(keep=False)
                        & ~df["row"].duplicated(keep=False))
                if not todo.any():
                    continue
                df.loc[todo, CHECKSUM] = df.loc[todo, "actual"]
                self._rewrite_index(sc.space, df, sc.readable_parts)  # unreadable parts stay for repair
                recorded += int(todo.sum())
        return recorded

    def gc(self) -> dict:
        """Compact each space's index into one part, trim uncommitted rows, remove temp files."""
        report = {"spaces": 0, "parts_merged": 0, "rows_trimmed": 0, "temp_files_removed": 0}
        with _write_faults(self.path, "tidying", "nothing committed was lost"), self._lock():
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
                top = self._load_index(space).top  # a CacheError (run repair) if a part is unreadable
                if arr.shape[0] > top:
                    report["rows_trimmed"] += int(arr.shape[0] - top)
                    arr.resize((top, space.dim))
                parts = self._parts(space)
                if len(parts) > 1:
                    entries, readable, _ = self._read_entries(space)
                    self._rewrite_index(space, entries, readable)
                    report["parts_merged"] += len(readable)
                self._index.pop(space.space_id, None)
        return report

    # -- merging ----------------------------------------------------------------------------------
    def _merge_space(self, source: EmbeddingCache, found: SpaceCheck, batch: int = MERGE_BATCH) -> int:
        """Append every row of ``found`` (a checked space of ``source``) whose prompt is not in this cache
        yet, with its recorded digest (None stays None: the row stays "unchecked"); every row read from
        ``source`` is checked against its digest first. Returns how many rows were appended."""
        space = found.space
        entries = found.entries
        entries = entries[~self.contains(space, entries["prompt_hash"].tolist())] if len(entries) else entries
        added = 0
        with _write_faults(self.path, "merging into", "every row committed so far is valid; merge again to finish"):
            with self._lock():
                self._vectors(space, create=True)  # the space, even if it brings no new row
            for start in range(0, len(entries), batch):
                part = entries.iloc[start:start + batch]
                hashes = part["prompt_hash"].tolist()
                vectors = source.get(space, hashes, check=True)
                with self._lock():
                    added += self._append(space, hashes, vectors, part["prompt"].tolist(),
                                          part["n_tokens"].tolist(), part[CHECKSUM].tolist())
        return added


def _spot_tables_of(cache: EmbeddingCache) -> dict[tuple[str, str], tuple[Path, pd.DataFrame, dict]]:
    out = {}
    for path in cache._spot_table_paths():
        table, meta = cache.read_spot_table(path.parent.name, path.stem)
        out[(path.parent.name, path.stem)] = (path, table, meta)
    return out


def _same_spot_table(a: tuple[Path, pd.DataFrame, dict], b: tuple[Path, pd.DataFrame, dict]) -> bool:
    """The same spots mapped to the same prompts in the same space (run metadata such as the model's
    folder may differ between hosts)."""
    return (a[2].get("space_id") == b[2].get("space_id") and a[1]["spot_id"].tolist() == b[1]["spot_id"].tolist()
            and a[1]["prompt_hash"].tolist() == b[1]["prompt_hash"].tolist())


def _open_merge_source(path: Path, into: Path) -> EmbeddingCache:
    if not path.exists():
        raise CacheError(f"merge source {path} does not exist; nothing was written to {into}")
    if path.resolve() == into.resolve():
        raise CacheError(f"merge source {path} is the destination itself; pass other caches as sources")
    try:
        return EmbeddingCache(path, create=False)
    except CacheError as exc:
        raise CacheError(f"merge source {path}: {exc}; nothing was written to {into}") from None


def merge_caches(sources: Sequence[str | Path], into: str | Path) -> dict:
    """Add to the cache ``into`` (created if absent) every row of each source it does not hold yet (by
    prompt hash, per space), with its checksum, and each source's spot tables it does not have; then
    verify it. Everything that would make the merge fail is found before anything is written: a
    source that is missing, not a cache or damaged (``check`` finds a problem), a space whose identity
    differs, an index of ``into`` that cannot be read, and a spot table (dataset / tag) that maps other
    spots or prompts than one already in ``into`` or in an earlier source. Returns what was done and
    ``problems``, what ``verify`` found in ``into`` afterwards."""
    into = Path(into)
    opened, seen = [], set()
    for s in sources:
        src = _open_merge_source(Path(s), into)
        if src.path.resolve() in seen:
            continue
        seen.add(src.path.resolve())
        found = src.check()
        if found.problems:
            n = len(found.problems)
            raise CacheError(f"merge source {src.path} is damaged ({n} problem{'s' if n > 1 else ''}; the first: "
                             f"{found.problems[0]}): run `semst cache repair --cache {src.path}` first; nothing "
                             f"was written to {into}")
        opened.append((src, found))
    try:  # an empty folder becomes the cache, as with `semst embed`; anything else must be a cache
        dst = EmbeddingCache(into, create=False) if into.exists() and (not into.is_dir() or any(into.iterdir())) else None
    except CacheError as exc:
        raise CacheError(f"merge destination: {str(exc).replace('another --cache', 'another --into')}") from None
    # Everything that could refuse the merge half-way is asked now, before the first write.
    tables = _spot_tables_of(dst) if dst is not None else {}
    copies = []
    for src, found in opened:
        for sc in found.spaces:
            if dst is not None and dst._vectors(sc.space) is not None:  # SpaceMismatchError if it differs
                dst._load_index(sc.space)  # a CacheError (run repair) if an index part is unreadable
        for key, table in _spot_tables_of(src).items():
            if key not in tables:
                tables[key] = table
                copies.append((key, table[0]))
            elif not _same_spot_table(tables[key], table):
                raise CacheError(f"spot table {key[0]}/{key[1]} of {table[0]} maps other spots or prompts than the "
                                 f"one in {tables[key][0]}: the same dataset and settings were embedded from "
                                 f"different inputs; remove one of them first; nothing was written to {into}")
    dst = dst or EmbeddingCache(into, create=True)
    dst.check_writable()
    report = {"into": str(dst.path), "sources": [], "spot_tables_copied": []}
    for src, found in opened:
        spaces = [{"space_id": sc.space.space_id, "model": sc.space.model, "rows": len(sc.entries),
                   "added": dst._merge_space(src, sc)} for sc in found.spaces]
        report["sources"].append({"path": str(src.path), "spaces": spaces})
    for (dataset, tag), path in copies:
        dest = dst._spot_path(dataset, tag)
        if dest.exists():  # written meanwhile by an embed into `into`: checked below by verify
            continue
        with _write_faults(dst.path, f"copying the spot table {dataset}/{tag} into"):
            atomic_write(dest, lambda tmp, path=path: shutil.copyfile(path, tmp), durable=True)
        report["spot_tables_copied"].append(f"{dataset}/{tag}")
    report["problems"] = EmbeddingCache(dst.path, create=False).verify()
    return report


def format_merge(report: dict) -> list[str]:
    lines = []
    for s in report["sources"]:
        for sp in s["spaces"]:
            lines.append(f"{s['path']}: space {sp['space_id']} ({sp['model']}): {sp['added']} of its {sp['rows']} "
                         f"rows added, {sp['rows'] - sp['added']} already in {report['into']}")
        if not s["spaces"]:
            lines.append(f"{s['path']}: no embedding space")
    for name in report["spot_tables_copied"]:
        lines.append(f"spot table {name} copied")
    return lines


def format_info(info: dict) -> str:
    lines = [f"cache {info['path']}"]
    if not info["spaces"]:
        lines.append("  (no embedding space yet)")
    for s in info["spaces"]:
        head = (f"  space {s['space_id']}: {s['model']} pooling={s['pooling']} {s['dtype']} dim={s['dim']} "
                f"weights={s['weights'][:12]}  ")
        if s.get("damaged"):
            lines.append(head + f"index damaged: {s['damaged']}")
            continue
        lines.append(head + f"{s['rows']} rows, {s['tokens']} tokens, "
                     f"{s['bytes'] / 1e6:.1f} MB, {s['index_parts']} index parts")
    tables = info["spot_tables"]
    if tables:
        lines.append("  spot tables (dataset / tag: spots):")
        for m in tables:
            if "unreadable" in m:
                lines.append(f"    {m['dataset']} / {m['tag']}: unreadable ({m['unreadable']})")
                continue
            lines.append(f"    {m['dataset']} / {m['tag']}: {m['n_spots']} spots (space {m.get('space_id', '?')})")
    return "\n".join(lines)


def format_repair(report: dict) -> list[str]:
    """What `semst cache repair` did, one line each, and which datasets to embed again."""
    lines = []
    for s in report["spaces"]:
        if s["dropped"]:
            reasons = pd.Series([d["reason"] for d in s["dropped"]]).value_counts()
            why = "; ".join(f"{reason}: {n}" for reason, n in reasons.items())
            lines.append(f"space {s['space_id']}: dropped {_rows(len(s['dropped']))} from the index ({why}): "
                         f"rows {_few(sorted(d['row'] for d in s['dropped']))}")
        for name, reason in s["unreadable_parts"].items():
            lines.append(f"space {s['space_id']}: removed the unreadable index part {name} ({reason}); its rows "
                         f"are no longer committed")
        for rel in s.get("chunks_removed", []):
            lines.append(f"space {s['space_id']}: removed the undecodable chunk file {rel} (it holds no committed row)")
    for rel in report["spot_tables_removed"]:
        lines.append(f"removed the unreadable spot table {rel}")
    if report["marked_with_holes"]:
        lines.append("marked the cache as format version 2 (its rows now have holes): semst releases without row "
                     "checksums refuse it")
    if not lines:
        lines.append("nothing to repair")
    for t in report.get("to_embed_again", []):
        lines.append(f"to recompute: `semst embed {t['dataset']}` with the settings of tag {t['tag']} "
                     f"({t['spots']} of its {t['n_spots']} spots miss their vector)")
    return lines
