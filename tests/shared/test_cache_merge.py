"""`semst cache merge`: caches filled apart (shards, hosts without a shared lock) become one."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from semst.experiments.cli import main
from semst.shared.cache import CHECKSUM, CacheError, EmbeddingCache, EmbeddingSpace, merge_caches

SPACE = EmbeddingSpace(model="tiny", weights="f" * 64, pooling="mean", dtype="float32", dim=4)
LAST = EmbeddingSpace(model="tiny", weights="f" * 64, pooling="last", dtype="float32", dim=4)


def h(i) -> str:
    return hashlib.sha256(f"prompt {i}".encode()).hexdigest()


def vec(i, space=SPACE) -> np.ndarray:
    return np.arange(4, dtype=np.float32) + float(i) + (0.5 if space is LAST else 0.0)


def fill(path: Path, ids, space=SPACE, batch: int = 5) -> EmbeddingCache:
    cache = EmbeddingCache(path)
    ids = list(ids)
    for start in range(0, len(ids), batch):
        part = ids[start:start + batch]
        cache.add(space, [h(i) for i in part], np.stack([vec(i, space) for i in part]), [f"prompt {i}" for i in part],
                  [3] * len(part))
    return cache


def spot_table(cache: EmbeddingCache, ids, tag="tiny.mean", dataset="toy") -> None:
    cache.write_spot_table(dataset, tag, [f"spot{i}" for i in ids], [h(i) for i in ids], {"space_id": SPACE.space_id})


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.exists() else {}


def vectors_by_hash(cache: EmbeddingCache, space=SPACE) -> dict:
    rows = cache._hash_rows(space)
    return {k: v.tobytes() for k, v in zip(rows, cache.get(space, list(rows)))}


@pytest.mark.parametrize("a_ids,b_ids", [(range(0, 30), range(30, 50)), (range(0, 30), range(20, 50))],
                         ids=["disjoint", "overlapping"])
def test_two_caches_merged_equal_one_cache_filled_with_all_their_prompts(tmp_path, a_ids, b_ids):
    a, b = fill(tmp_path / "a.zarr", a_ids), fill(tmp_path / "b.zarr", b_ids)
    fill(tmp_path / "a.zarr", range(5), space=LAST)
    whole = fill(tmp_path / "whole.zarr", range(50))
    fill(tmp_path / "whole.zarr", range(5), space=LAST)
    report = merge_caches([a.path, b.path], tmp_path / "into.zarr")
    assert report["problems"] == []
    into = EmbeddingCache(tmp_path / "into.zarr", create=False)
    assert set(into.spaces()) == {SPACE, LAST}
    assert vectors_by_hash(into) == vectors_by_hash(whole)
    assert vectors_by_hash(into, LAST) == vectors_by_hash(whole, LAST)
    assert into.count(SPACE) == 50 and into.verify() == []


def test_merging_into_a_cache_that_has_some_of_the_rows_adds_only_the_others(tmp_path):
    src, dst = fill(tmp_path / "src.zarr", range(40)), fill(tmp_path / "dst.zarr", range(10, 20))
    report = merge_caches([src.path], dst.path)
    assert report["sources"][0]["spaces"][0]["added"] == 30
    fresh = EmbeddingCache(dst.path, create=False)
    assert fresh.count(SPACE) == 40 and fresh.verify() == []
    np.testing.assert_array_equal(fresh.get(SPACE, [h(i) for i in range(40)]), np.stack([vec(i) for i in range(40)]))


def test_merging_twice_changes_nothing(tmp_path):
    a, b = fill(tmp_path / "a.zarr", range(20)), fill(tmp_path / "b.zarr", range(10, 30))
    spot_table(a, range(20))
    merge_caches([a.path, b.path], tmp_path / "into.zarr")
    before = tree(tmp_path / "into.zarr")
    report = merge_caches([a.path, b.path], tmp_path / "into.zarr")
    assert [s["added"] for src in report["sources"] for s in src["spaces"]] == [0, 0]
    assert report["spot_tables_copied"] == [] and report["problems"] == []
    after = tree(tmp_path / "into.zarr")
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_checksums_are_carried_and_rows_written_before_checksums_stay_unchecked(tmp_path):
    src = fill(tmp_path / "src.zarr", range(10))
    part = next((src.path / "index" / SPACE.space_id).glob("part-*"))
    old = pq.read_table(part)  # rows 0-4 as a semst before checksums wrote them
    pq.write_table(old.drop_columns([CHECKSUM]), part, write_page_checksum=True)
    merge_caches([src.path], tmp_path / "into.zarr")
    into = EmbeddingCache(tmp_path / "into.zarr", create=False)
    entries, _, _ = into._read_entries(SPACE)
    digests = dict(zip(entries["prompt_hash"], entries[CHECKSUM]))
    src_entries, _, _ = EmbeddingCache(src.path, create=False)._read_entries(SPACE)
    assert digests == dict(zip(src_entries["prompt_hash"], src_entries[CHECKSUM]))
    assert sum(d is None for d in digests.values()) == 5
    assert into.verify() == []


def test_a_damaged_source_is_refused_before_anything_is_written(tmp_path):
    good, bad = fill(tmp_path / "good.zarr", range(20)), fill(tmp_path / "bad.zarr", range(20, 40))
    zarr.open_array(str(bad.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[3] = 7.0
    dst = fill(tmp_path / "dst.zarr", range(5))
    before = tree(dst.path)
    with pytest.raises(CacheError, match=r"merge source .*bad.zarr is damaged .*checksum mismatch.*nothing was written"):
        merge_caches([good.path, bad.path], dst.path)
    assert tree(dst.path) == before
    with pytest.raises(CacheError, match="is damaged"):
        merge_caches([bad.path], tmp_path / "new.zarr")
    assert not (tmp_path / "new.zarr").exists()


def test_conflicting_spot_tables_are_refused_before_anything_is_written(tmp_path):
    a, b = fill(tmp_path / "a.zarr", range(20)), fill(tmp_path / "b.zarr", range(20, 40))
    spot_table(a, range(20))
    spot_table(b, range(20, 40))  # the same dataset and tag, other prompts
    with pytest.raises(CacheError, match=r"spot table toy/tiny.mean of .*b.zarr.* maps other spots or prompts"):
        merge_caches([a.path, b.path], tmp_path / "into.zarr")
    assert not (tmp_path / "into.zarr").exists()


def test_identical_spot_tables_are_copied_once_and_absent_ones_are_copied(tmp_path):
    a, b = fill(tmp_path / "a.zarr", range(20)), fill(tmp_path / "b.zarr", range(10, 30))
    spot_table(a, range(30))
    spot_table(b, range(30))  # a shard writes the whole slide's spot table too
    spot_table(b, range(10, 30), tag="other")
    report = merge_caches([a.path, b.path], tmp_path / "into.zarr")
    assert sorted(report["spot_tables_copied"]) == ["toy/other", "toy/tiny.mean"]
    into = EmbeddingCache(tmp_path / "into.zarr", create=False)
    table, _ = into.read_spot_table("toy", "tiny.mean")
    np.testing.assert_array_equal(into.get(SPACE, table["prompt_hash"].tolist()), np.stack([vec(i) for i in range(30)]))


@pytest.mark.parametrize("case", ["missing", "not-a-cache", "itself"])
def test_a_bad_source_is_refused_with_exit_2_and_the_destination_untouched(tmp_path, case):
    dst = fill(tmp_path / "dst.zarr", range(5))
    good = fill(tmp_path / "good.zarr", range(10))
    source = {"missing": tmp_path / "nope.zarr", "not-a-cache": tmp_path, "itself": dst.path}[case]
    before = tree(dst.path)
    done = CliRunner().invoke(main, ["cache", "merge", str(good.path), str(source), "--into", str(dst.path)])
    assert done.exit_code == 2 and done.output.startswith("error: ") and "Traceback" not in done.output, done.output
    assert tree(dst.path) == before


def test_cli_merge_reports_rows_added_and_ok(tmp_path):
    a, b = fill(tmp_path / "a.zarr", range(20)), fill(tmp_path / "b.zarr", range(10, 30))
    done = CliRunner().invoke(main, ["cache", "merge", str(a.path), str(b.path), "--into", str(tmp_path / "i.zarr")])
    assert done.exit_code == 0, done.output
    assert "20 of its 20 rows added" in done.output and "10 of its 20 rows added, 10 already in" in done.output
    assert done.output.rstrip().endswith(": OK")
