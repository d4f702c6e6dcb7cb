"""The embedding cache: keyed by prompt hash, partitioned by space, append-only, crash-safe, shared."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from semst.shared.cache import (
    CacheError,
    EmbeddingCache,
    EmbeddingSpace,
    SpaceMismatchError,
    SpotTableError,
    SpotTableMeta,
    UncoveredSpotsError,
)

REPO = Path(__file__).resolve().parents[2]
SPACE = EmbeddingSpace(model="tiny", weights="f" * 64, pooling="mean", dtype="float32", dim=4)
OTHER = EmbeddingSpace(model="tiny", weights="f" * 64, pooling="last", dtype="float32", dim=4)


def h(i) -> str:
    return hashlib.sha256(f"prompt {i}".encode()).hexdigest()


def vec(i, dim=4) -> np.ndarray:
    """A vector derived from the key alone, so any row can be checked after a crash."""
    return np.arange(dim, dtype=np.float32) + float(i)


def add(cache, ids, space=SPACE):
    ids = list(ids)
    return cache.add(space, [h(i) for i in ids], np.stack([vec(i, space.dim) for i in ids]),
                     [f"prompt {i}" for i in ids], [3] * len(ids))


@pytest.fixture
def cache(tmp_path) -> EmbeddingCache:
    return EmbeddingCache(tmp_path / "emb.zarr")


def test_get_returns_vectors_in_the_requested_order(cache):
    add(cache, range(5))
    got = cache.get(SPACE, [h(3), h(0), h(4)])
    np.testing.assert_array_equal(got, np.stack([vec(3), vec(0), vec(4)]))


def test_a_prompt_is_stored_once_within_and_across_calls(cache):
    assert add(cache, [1, 2, 2, 3]) == 3
    assert add(cache, [2, 3, 4]) == 1
    assert cache.count(SPACE) == 4


def test_contains_tells_which_hashes_are_committed(cache):
    add(cache, [1])
    assert cache.contains(SPACE, [h(1), h(2)]).tolist() == [True, False]
    assert cache.contains(OTHER, [h(1)]).tolist() == [False]


def test_missing_prompts_are_an_error_that_counts_them(cache):
    add(cache, [1])
    with pytest.raises(CacheError, match="2 of 3 prompts are not in the cache"):
        cache.get(SPACE, [h(1), h(2), h(3)])


def test_spaces_are_isolated(cache):
    add(cache, [1], SPACE)
    cache.add(OTHER, [h(1)], np.full((1, 4), 9.0, dtype=np.float32), ["p"], [1])
    np.testing.assert_array_equal(cache.get(SPACE, [h(1)])[0], vec(1))
    np.testing.assert_array_equal(cache.get(OTHER, [h(1)])[0], np.full(4, 9.0))
    assert set(cache.spaces()) == {SPACE, OTHER}


def test_a_space_written_with_another_identity_is_refused(cache):
    add(cache, [1])
    group = cache._root[f"spaces/{SPACE.space_id}"]
    group.attrs["identity"] = {**group.attrs["identity"], "dim": 8}  # as if written by another space
    with pytest.raises(SpaceMismatchError, match="another embedding space"):
        cache.get(SPACE, [h(1)])


def test_a_directory_that_is_not_a_cache_is_refused_untouched(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a semst embedding cache"):
        EmbeddingCache(other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_opening_a_missing_cache_without_create_names_make_embed(tmp_path):
    with pytest.raises(CacheError, match="make embed"):
        EmbeddingCache(tmp_path / "nothing.zarr", create=False)
    assert not (tmp_path / "nothing.zarr").exists()


def test_bad_rows_are_refused_before_anything_is_written(cache):
    with pytest.raises(CacheError, match="non-finite"):
        cache.add(SPACE, [h(1)], np.full((1, 4), np.nan, dtype=np.float32), ["p"], [1])
    with pytest.raises(CacheError, match="vectors of shape"):
        cache.add(SPACE, [h(1)], np.zeros((1, 3), dtype=np.float32), ["p"], [1])
    with pytest.raises(CacheError, match="not SHA-256"):
        cache.add(SPACE, ["abc"], np.zeros((1, 4), dtype=np.float32), ["p"], [1])
    assert cache.count(SPACE) == 0


def test_spot_table_round_trip(cache):
    cache.write_spot_table("mob", "tiny.k5", ["s1", "s2"], [h(1), h(2)], {"space_id": SPACE.space_id})
    table, meta = cache.read_spot_table("mob", "tiny.k5")
    assert table["spot_id"].tolist() == ["s1", "s2"]
    assert table["prompt_hash"].tolist() == [h(1), h(2)]
    assert meta["space_id"] == SPACE.space_id and meta["n_spots"] == 2


def test_missing_spot_table_lists_the_tags_that_exist(cache):
    cache.write_spot_table("mob", "a", ["s"], [h(1)], {})
    with pytest.raises(CacheError, match="tags that exist for mob: a"):
        cache.read_spot_table("mob", "b")


# -- the one reader: vectors_for -------------------------------------------------------------------

def spot_table_of(cache, spots, ids, meta=None):
    cache.write_spot_table("mob", "tiny.k5", spots, [h(i) for i in ids],
                           {"space": dataclasses.asdict(SPACE), "space_id": SPACE.space_id, **(meta or {})})


def test_vectors_for_gives_one_row_per_spot_asked_in_that_order_and_the_typed_metadata(cache):
    add(cache, range(3))
    spot_table_of(cache, ["s0", "s1", "s2"], [0, 1, 2], {"k_genes": 5, "template": "semst", "gene_ranking": "counts",
                                                          "new_key_of_a_later_semst": [1, 2]})
    vectors, meta = cache.vectors_for("mob", "tiny.k5", ["s2", "s0"])
    assert vectors.dtype == np.float32 and np.array_equal(vectors, np.stack([vec(2), vec(0)]))
    assert isinstance(meta, SpotTableMeta) and meta.space == SPACE and meta.space_id == SPACE.space_id
    assert (meta.dataset, meta.tag, meta.n_spots, meta.k_genes, meta.template, meta.gene_ranking) == (
        "mob", "tiny.k5", 3, 5, "semst", "counts")
    assert meta.encoder is None  # a key the table does not hold
    assert meta.extra == {"new_key_of_a_later_semst": [1, 2]}  # a key this semst does not know is kept
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.k_genes = 6


def test_vectors_for_spots_the_table_does_not_list_says_it_was_written_for_a_subset(cache):
    add(cache, range(2))
    spot_table_of(cache, ["s0", "s1"], [0, 1])
    with pytest.raises(UncoveredSpotsError, match=r"the spot table tiny.k5 covers 2 spots but 1 of mob's 3 spots "
                                                  r"are not in it \(e.g. \['s9'\]\); it was written for a subset$"):
        cache.vectors_for("mob", "tiny.k5", ["s0", "s1", "s9"])


def test_vectors_for_an_absent_or_spaceless_table_is_a_spot_table_error_and_absent_vectors_a_cache_error(cache):
    with pytest.raises(SpotTableError, match="no spot table 'tiny.k5' for mob"):
        cache.vectors_for("mob", "tiny.k5", ["s0"])
    with pytest.raises(SpotTableError, match="cannot be used as a file name"):
        cache.vectors_for("mob", "../x", ["s0"])
    cache.write_spot_table("mob", "old", ["s0"], [h(0)], {"space_id": SPACE.space_id})
    with pytest.raises(SpotTableError, match="the spot table mob/old names no embedding space"):
        cache.vectors_for("mob", "old", ["s0"])
    spot_table_of(cache, ["s0"], [0])  # its vector was never added
    with pytest.raises(CacheError, match="1 of 1 prompts are not in the cache") as raised:
        cache.vectors_for("mob", "tiny.k5", ["s0"])
    assert not isinstance(raised.value, (SpotTableError, UncoveredSpotsError))


def test_verify_accepts_a_consistent_cache(cache):
    add(cache, range(10))
    add(cache, range(5, 15))
    assert cache.verify() == []


def test_verify_reports_an_index_pointing_past_the_vectors(cache):
    add(cache, range(3))
    array = cache._root[f"spaces/{SPACE.space_id}/vectors"]
    array.resize((2, 4))
    problems = cache.verify()
    assert any("past the 2 rows" in p for p in problems)


def test_verify_reports_one_prompt_on_two_rows(cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    add(cache, range(3))
    d = cache.path / "index" / SPACE.space_id
    pq.write_table(pa.table({"prompt_hash": [h(0)], "row": pa.array([2], pa.int64()), "prompt": ["x"],
                             "n_tokens": pa.array([1], pa.int32())}), d / "part-zz.parquet")
    assert any("indexed at rows 0 and 2" in p for p in cache.verify())


def test_gc_compacts_parts_trims_garbage_and_keeps_every_committed_row(cache):
    for start in range(0, 20, 4):
        add(cache, range(start, start + 4))
    array = cache._root[f"spaces/{SPACE.space_id}/vectors"]
    array.resize((25, 4))  # trailing rows of a killed writer
    (cache.path / "index" / SPACE.space_id / ".tmp-x-part.parquet").write_text("half")
    report = cache.gc()
    assert report["parts_merged"] == 5 and report["rows_trimmed"] == 5 and report["temp_files_removed"] == 1
    fresh = EmbeddingCache(cache.path, create=False)
    np.testing.assert_array_equal(fresh.get(SPACE, [h(i) for i in range(20)]),
                                  np.stack([vec(i) for i in range(20)]))
    assert len(list((cache.path / "index" / SPACE.space_id).glob("part-*"))) == 1
    assert fresh.verify() == []


def test_a_writer_killed_while_creating_a_space_leaves_no_space_and_the_next_one_creates_it(cache, monkeypatch):
    import semst.shared.cache as cache_module

    def killed(src, dst):  # the writer dies after building the space, before it is renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.os, "rename", killed)
    monkeypatch.setattr(cache_module.shutil, "rmtree", lambda *a, **k: None)  # a dead writer cleans nothing
    with pytest.raises(KeyboardInterrupt):
        add(cache, range(3))
    monkeypatch.undo()
    assert list((cache.path / "spaces").glob(".tmp-*"))  # what the dead writer left
    reopened = EmbeddingCache(cache.path, create=False)
    assert reopened.spaces() == [] and reopened.verify() == []
    assert reopened.contains(SPACE, [h(0)]).tolist() == [False]
    assert add(reopened, range(3)) == 3
    assert reopened.gc()["temp_files_removed"] == 1
    np.testing.assert_array_equal(EmbeddingCache(cache.path).get(SPACE, [h(2)]), vec(2)[None])


def test_a_space_half_made_by_an_older_writer_counts_as_absent_and_is_rebuilt_on_write(cache):
    cache._root.require_group(f"spaces/{SPACE.space_id}")  # killed before its identity and vectors
    reopened = EmbeddingCache(cache.path, create=False)
    assert reopened.spaces() == [] and reopened.verify() == []
    assert reopened.contains(SPACE, [h(0)]).tolist() == [False]
    assert add(reopened, range(3)) == 3
    assert reopened.spaces() == [SPACE]
    np.testing.assert_array_equal(EmbeddingCache(cache.path).get(SPACE, [h(1)]), vec(1)[None])


WRITER = textwrap.dedent("""
    import hashlib, sys, numpy as np
    sys.path.insert(0, {repo!r})
    from semst.shared.cache import EmbeddingCache, EmbeddingSpace
    space = EmbeddingSpace(model="tiny", weights="f" * 64, pooling="mean", dtype="float32", dim=4)
    cache = EmbeddingCache(sys.argv[1])
    ids = list(range(int(sys.argv[2]), int(sys.argv[3])))
    for start in range(0, len(ids), 7):
        batch = ids[start:start + 7]
        hs = [hashlib.sha256(f"prompt {{i}}".encode()).hexdigest() for i in batch]
        have = cache.contains(space, hs)
        todo = [(i, x) for i, x, present in zip(batch, hs, have) if not present]
        if todo:
            cache.add(space, [x for _, x in todo],
                      np.stack([np.arange(4, dtype=np.float32) + float(i) for i, _ in todo]),
                      [f"prompt {{i}}" for i, _ in todo], [3] * len(todo))
    print("done", flush=True)
""")


def _writer(path, lo, hi) -> subprocess.Popen:
    code = WRITER.format(repo=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(lo), str(hi)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_committed_rows(path) -> int:
    if not path.exists():  # killed before it created the cache: nothing to check, nothing lost
        return 0
    cache = EmbeddingCache(path, create=False)
    assert cache.verify() == []
    if not cache.spaces():
        return 0
    rows = cache._hash_rows(SPACE)
    by_row = {r: k for k, r in rows.items()}
    ids = {h(i): i for i in range(400)}
    got = cache.get(SPACE, list(rows))
    for key, vector in zip(rows, got):
        np.testing.assert_array_equal(vector, vec(ids[key]))
    assert sorted(by_row) == list(range(len(rows)))
    return len(rows)


def test_a_writer_killed_at_any_moment_leaves_a_valid_cache_and_resumes(tmp_path):
    path = tmp_path / "emb.zarr"
    rng = np.random.default_rng(0)
    committed = []
    for delay in sorted(rng.uniform(0.5, 3.0, size=5)):
        proc = _writer(path, 0, 400)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        committed.append(_check_committed_rows(path))
    proc = _writer(path, 0, 400)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert _check_committed_rows(path) == 400
    # What was committed before a kill is never computed again: the count only grows.
    assert committed == sorted(committed)
    print("committed after each kill:", committed)


def test_two_concurrent_writers_never_duplicate_a_row(tmp_path):
    path = tmp_path / "emb.zarr"
    EmbeddingCache(path)  # created once, as `semst embed` does before its first batch
    a, b = _writer(path, 0, 150), _writer(path, 50, 200)
    for proc in (a, b):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    cache = EmbeddingCache(path, create=False)
    assert cache.count(SPACE) == 200
    assert cache.verify() == []
    np.testing.assert_array_equal(cache.get(SPACE, [h(i) for i in range(200)]),
                                  np.stack([vec(i) for i in range(200)]))


# -- an index that scales: incremental reads, bounded parts, fsync of what a commit wrote -----------

def index_parts(cache, space=SPACE) -> list[Path]:
    return sorted((cache.path / "index" / space.space_id).glob("part-*.parquet"))


def test_a_reader_reads_only_the_parts_it_has_not_read_yet(cache, monkeypatch):
    import semst.shared.cache as cache_module

    for start in range(0, 15, 3):
        add(cache, range(start, start + 3))
    reader = EmbeddingCache(cache.path, create=False)
    assert reader.contains(SPACE, [h(0)]).all()
    read = []
    original = cache_module._read_part
    monkeypatch.setattr(cache_module, "_read_part", lambda path, *a, **k: read.append(path.name) or original(path, *a, **k))
    add(cache, range(15, 18))  # another process's commit (the writer knows its own part)
    assert read == []
    assert reader.contains(SPACE, [h(i) for i in range(18)]).all()
    assert read == [index_parts(cache)[-1].name]


def test_a_reader_whose_parts_were_compacted_away_reads_the_index_again(cache):
    for start in range(0, 12, 3):
        add(cache, range(start, start + 3))
    reader = EmbeddingCache(cache.path, create=False)
    assert reader.count(SPACE) == 12
    EmbeddingCache(cache.path).gc()  # one part replaces the four the reader read
    add(EmbeddingCache(cache.path), range(12, 14))
    np.testing.assert_array_equal(reader.get(SPACE, [h(i) for i in range(14)]), np.stack([vec(i) for i in range(14)]))
    assert reader.count(SPACE) == 14


def test_a_reader_sees_what_a_repair_dropped(cache):
    add(cache, range(4))
    reader = EmbeddingCache(cache.path, create=False)
    assert reader.contains(SPACE, [h(3)]).all()
    import zarr

    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[3] = np.nan
    EmbeddingCache(cache.path).repair()
    assert reader.contains(SPACE, [h(i) for i in range(4)]).tolist() == [True, True, True, False]


def test_many_small_commits_leave_a_bounded_number_of_parts_and_every_row(cache):
    from semst.shared.cache import COMPACT_FANOUT

    for i in range(300):
        add(cache, [i])
    assert len(index_parts(cache)) < 3 * COMPACT_FANOUT  # 300 commits without compaction: 300 parts
    fresh = EmbeddingCache(cache.path, create=False)
    np.testing.assert_array_equal(fresh.get(SPACE, [h(i) for i in range(300)]), np.stack([vec(i) for i in range(300)]))
    assert fresh.verify() == []


def test_a_compaction_killed_before_it_removed_the_old_parts_loses_nothing_and_the_next_commit_finishes_it(
        cache, monkeypatch):
    from semst.shared.cache import COMPACT_FANOUT

    for i in range(COMPACT_FANOUT - 1):
        add(cache, [i])
    real_unlink = Path.unlink

    def killed(self, *a, **k):
        if self.name.startswith("part-"):
            raise KeyboardInterrupt("killed between writing the merged part and removing the old ones")
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        add(cache, [COMPACT_FANOUT - 1])  # the commit that triggers a compaction
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert len(index_parts(cache)) == COMPACT_FANOUT + 1  # the merged part and every old one
    fresh = EmbeddingCache(cache.path, create=False)
    assert fresh.verify() == [] and fresh.count(SPACE) == COMPACT_FANOUT
    add(fresh, range(COMPACT_FANOUT, COMPACT_FANOUT + 1))
    assert len(index_parts(cache)) < COMPACT_FANOUT
    again = EmbeddingCache(cache.path, create=False)
    np.testing.assert_array_equal(again.get(SPACE, [h(i) for i in range(COMPACT_FANOUT + 1)]),
                                  np.stack([vec(i) for i in range(COMPACT_FANOUT + 1)]))
    assert again.verify() == []


def test_a_commit_fsyncs_the_same_number_of_files_however_many_chunks_the_space_has(tmp_path, monkeypatch):
    import semst.shared.cache as cache_module

    big = EmbeddingCache(tmp_path / "big.zarr")
    for start in range(0, 20 * 1024, 2048):  # 20 chunk files
        add(big, range(start, start + 2048))
    small = EmbeddingCache(tmp_path / "small.zarr")
    add(small, range(10))
    calls = []
    monkeypatch.setattr(cache_module.os, "fsync", lambda fd: calls.append(fd))
    add(small, range(10, 11))
    n_small, calls[:] = len(calls), []
    add(big, range(20 * 1024, 20 * 1024 + 1))
    assert len(calls) == n_small


def test_an_older_semst_reads_a_compacted_cache_this_one_wrote(cache, tmp_path):
    """The cache module of the commit before these changes reads every row, checked, and verifies clean."""
    from semst.shared.cache import COMPACT_FANOUT

    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", "9f0458c:shared/cache.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git history with 9f0458c is not available")
    for i in range(0, 3 * COMPACT_FANOUT, 2):
        add(cache, [i, i + 1])
    (tmp_path / "old_cache.py").write_text(source)
    probe = textwrap.dedent(f"""
        import hashlib, sys, numpy as np, old_cache
        c = old_cache.EmbeddingCache(sys.argv[1], create=False)
        space = old_cache.EmbeddingSpace(model="tiny", weights="f" * 64, pooling="mean", dtype="float32", dim=4)
        n = {3 * COMPACT_FANOUT}
        got = c.get(space, [hashlib.sha256(f"prompt {{i}}".encode()).hexdigest() for i in range(n)])
        assert (got == np.arange(4, dtype=np.float32)[None] + np.arange(n, dtype=np.float32)[:, None]).all()
        print("ok", c.count(space), c.verify())
    """)
    out = subprocess.run([sys.executable, "-c", probe, str(cache.path)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"})
    assert out.stdout.strip() == f"ok {3 * COMPACT_FANOUT} []", out.stdout + out.stderr
