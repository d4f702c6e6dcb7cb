"""The embedding cache against damage: every committed row carries a checksum, every damaged byte is
found (by `verify`, and by `get` before stage 2 could use it), `repair` forgets exactly what is damaged
so `embed` recomputes it, and a full or read-only disk is a message, not a traceback."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

import semst.shared.cache as cache_module
from semst.experiments.cli import main
from semst.shared.cache import FORMAT, CacheError, EmbeddingCache, EmbeddingSpace

REPO = Path(__file__).resolve().parents[2]
DIM = 16
SPACE = EmbeddingSpace(model="tiny", weights="e" * 64, pooling="mean", dtype="float32", dim=DIM)
N = 2500  # three chunks of 1024 rows: damage in the middle one leaves rows on both sides
RNG_VECTORS = np.random.default_rng(7).normal(size=(N + 100, DIM)).astype(np.float32)  # incompressible


def h(i) -> str:
    return hashlib.sha256(f"prompt {i}".encode()).hexdigest()


def add(cache, ids) -> int:
    ids = list(ids)
    return cache.add(SPACE, [h(i) for i in ids], RNG_VECTORS[ids], [f"prompt {i}" for i in ids], [3] * len(ids))


def fill(path: Path, n: int = N, batch: int = 500) -> EmbeddingCache:
    cache = EmbeddingCache(path)
    for start in range(0, n, batch):
        add(cache, range(start, min(start + batch, n)))
    cache.write_spot_table("toy", "tiny.mean", [f"spot{i}" for i in range(n)], [h(i) for i in range(n)],
                           {"space_id": SPACE.space_id, "space": SPACE.__dict__})
    return cache


@pytest.fixture
def cache(tmp_path) -> EmbeddingCache:
    return fill(tmp_path / "emb.zarr")


def chunk_file(cache, chunk: int = 1) -> Path:
    return cache.path / "spaces" / SPACE.space_id / "vectors" / "c" / str(chunk) / "0"


def index_parts(cache) -> list[Path]:
    return sorted((cache.path / "index" / SPACE.space_id).glob("part-*.parquet"))


def spot_table(cache) -> Path:
    return cache.path / "spot_tables" / "toy" / "tiny.mean.parquet"


def fresh(cache) -> EmbeddingCache:
    """The cache as another process opens it (no in-memory index)."""
    return EmbeddingCache(cache.path, create=False)


def flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def decoded(cache) -> np.ndarray | None:
    """The vectors as Zarr decodes them today (None if it cannot)."""
    try:
        return np.asarray(zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r")[:N])
    except Exception:  # noqa: BLE001
        return None


def all_rows(cache) -> np.ndarray:
    return fresh(cache).get(SPACE, [h(i) for i in range(N)])


def assert_damage_found_and_never_used(cache, where: str) -> list[str]:
    problems = fresh(cache).verify()
    assert problems and all(SPACE.space_id in p for p in problems), problems
    assert any(where in p for p in problems), problems
    with pytest.raises(CacheError, match="semst cache repair"):
        all_rows(cache)
    return problems


def write_parts_without_checksums(cache) -> None:
    """Turn the index into what a semst before checksums wrote (no blake2b column, no page CRCs)."""
    for part in index_parts(cache):
        table = pq.read_table(part).drop_columns(["blake2b"])
        pq.write_table(table, part)


def zero_rows_of_chunk_1(cache) -> list[int]:
    """Damage part of chunk 1; the rows that now fail their checksum."""
    with open(chunk_file(cache), "r+b") as f:
        f.seek(8000)
        f.write(b"\0" * 2048)
    after = decoded(cache)
    return np.flatnonzero((after != RNG_VECTORS[:N]).any(axis=1)).tolist()


# -- a damaged chunk is found and never used ------------------------------------------------------

def test_a_block_of_zeros_in_a_chunk_is_a_problem_naming_the_space_rows_and_chunk_file(cache):
    damaged = zero_rows_of_chunk_1(cache)
    problems = assert_damage_found_and_never_used(cache, f"spaces/{SPACE.space_id}/vectors/c/1/0")
    assert problems == [f"space {SPACE.space_id}: checksum mismatch in {len(damaged)} rows (rows "
                        f"{', '.join(map(str, damaged[:5]))}, ... ({len(damaged)} in all)) of chunk file "
                        f"spaces/{SPACE.space_id}/vectors/c/1/0"]


@pytest.mark.parametrize("seed", range(10))
def test_a_bit_flipped_at_a_random_offset_of_a_chunk_is_found_or_changes_nothing(cache, seed):
    rng = np.random.default_rng(seed)
    path = chunk_file(cache)
    flip_bit(path, int(rng.integers(0, path.stat().st_size)), int(rng.integers(0, 8)))
    after = decoded(cache)
    if after is not None and np.array_equal(after, RNG_VECTORS[:N]):
        assert fresh(cache).verify() == []  # a flip Zarr decodes to the same numbers harms nothing
        return
    assert_damage_found_and_never_used(cache, "vectors/c/1/0")


def test_a_truncated_chunk_is_a_problem_line_not_a_traceback(cache):
    os.truncate(chunk_file(cache), chunk_file(cache).stat().st_size // 2)
    problems = assert_damage_found_and_never_used(cache, "vectors/c/1/0")
    assert any("cannot be decoded" in p and "1024 committed rows" in p for p in problems), problems


def test_a_chunk_with_a_damaged_header_is_a_problem_line_not_a_traceback(cache):
    with open(chunk_file(cache), "r+b") as f:
        f.write(b"\xff\xff\xff\xff")  # the zstd frame's magic number
    problems = assert_damage_found_and_never_used(cache, "vectors/c/1/0")
    assert any("cannot be decoded" in p for p in problems), problems


def test_a_deleted_chunk_file_is_found(cache):
    chunk_file(cache).unlink()  # Zarr reads it as zeros
    assert_damage_found_and_never_used(cache, "vectors/c/1/0")


def test_nan_written_through_zarr_into_a_committed_row_is_found(cache):
    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[1500] = np.nan
    problems = assert_damage_found_and_never_used(cache, "vectors/c/1/0")
    assert any("(rows 1500)" in p for p in problems), problems


def test_get_checks_only_the_rows_it_returns(cache):
    with open(chunk_file(cache), "r+b") as f:
        f.seek(8000)
        f.write(b"\0" * 2048)
    reader = fresh(cache)
    np.testing.assert_array_equal(reader.get(SPACE, [h(0), h(2400)]), RNG_VECTORS[[0, 2400]])


# -- damaged index parts and spot tables ----------------------------------------------------------

def test_a_damaged_index_part_is_a_problem_and_every_reader_and_writer_says_run_repair(cache):
    part = index_parts(cache)[1]
    flip_bit(part, part.stat().st_size // 3, 2)
    problems = fresh(cache).verify()
    assert any(f"index part index/{SPACE.space_id}/{part.name} is unreadable" in p for p in problems), problems
    for use in (lambda c: c.get(SPACE, [h(0)]), lambda c: c.contains(SPACE, [h(0)]),
                lambda c: add(c, [N]), lambda c: c.gc()):
        with pytest.raises(CacheError, match=f"{part.name}.*semst cache repair"):
            use(fresh(cache))


def test_a_damaged_spot_table_is_a_problem_and_reading_it_says_what_to_do(cache):
    flip_bit(spot_table(cache), spot_table(cache).stat().st_size // 2, 4)
    problems = fresh(cache).verify()
    assert any("spot table spot_tables/toy/tiny.mean.parquet is unreadable" in p for p in problems), problems
    with pytest.raises(CacheError, match="spot table toy/tiny.mean .* is unreadable .*semst embed toy"):
        fresh(cache).read_spot_table("toy", "tiny.mean")


def test_a_spot_table_column_renamed_in_the_footer_is_found(cache):
    data = spot_table(cache).read_bytes()
    assert data.count(b"spot_id") >= 1
    spot_table(cache).write_bytes(data.replace(b"spot_id", b"spot_ie"))  # no page checksum covers the footer
    assert any("spot_tables/toy/tiny.mean.parquet is unreadable" in p for p in fresh(cache).verify())
    with pytest.raises(CacheError, match="unreadable"):
        fresh(cache).read_spot_table("toy", "tiny.mean")


def test_a_changed_digit_in_a_spot_table_s_run_metadata_is_found(cache):
    data = spot_table(cache).read_bytes()
    assert data.count(b'"n_spots": 2500') == 1
    spot_table(cache).write_bytes(data.replace(b'"n_spots": 2500', b'"n_spots": 2501'))
    with pytest.raises(CacheError, match="run metadata fails its checksum"):
        fresh(cache).read_spot_table("toy", "tiny.mean")


def test_stage_2_gets_a_cluster_error_saying_repair_then_embed(cache):
    from semst.cluster.run import cached_vectors
    from semst.cluster.seeds import ClusterError

    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[7] = np.nan
    with pytest.raises(ClusterError, match="semst cache repair.*semst embed"):
        cached_vectors(cache.path, "toy", "tiny.mean", [f"spot{i}" for i in range(N)])


# -- repair ----------------------------------------------------------------------------------------

def test_repair_drops_exactly_the_damaged_rows_and_embed_recomputes_exactly_them(cache):
    damaged = zero_rows_of_chunk_1(cache)
    assert 0 < len(damaged) < 1024
    report = fresh(cache).repair()
    assert sorted(d["row"] for d in report["spaces"][0]["dropped"]) == damaged
    assert report["to_embed_again"] == [{"dataset": "toy", "tag": "tiny.mean", "spots": len(damaged), "n_spots": N}]
    again = fresh(cache)
    assert again.verify() == []
    present = again.contains(SPACE, [h(i) for i in range(N)])
    assert np.flatnonzero(~present).tolist() == damaged
    assert add(again, range(N)) == len(damaged)  # what `semst embed` does: only the missing prompts
    np.testing.assert_array_equal(all_rows(cache), RNG_VECTORS[:N])
    assert fresh(cache).verify() == []


def test_rows_added_after_a_repair_go_after_the_highest_committed_row_never_into_a_hole(cache):
    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[10] = np.nan
    fresh(cache).repair()
    writer = fresh(cache)
    assert add(writer, [10, N, N + 1]) == 3
    rows = writer._hash_rows(SPACE)
    assert [rows[h(10)], rows[h(N)], rows[h(N + 1)]] == [N, N + 1, N + 2]
    ids = [*range(N + 2)]
    np.testing.assert_array_equal(fresh(cache).get(SPACE, [h(i) for i in ids]), RNG_VECTORS[ids])
    assert fresh(cache).verify() == []
    assert fresh(cache).gc()["rows_trimmed"] == 0


def test_a_repair_that_leaves_holes_marks_the_cache_so_a_semst_before_checksums_refuses_it(cache):
    assert json.loads((cache.path / "semst_cache.json").read_text()) == FORMAT
    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[10] = np.nan
    assert fresh(cache).repair()["marked_with_holes"]
    marker = json.loads((cache.path / "semst_cache.json").read_text())
    assert marker == cache_module.FORMAT_WITH_HOLES and marker["version"] != 1  # what format version 1 requires
    assert fresh(cache).get(SPACE, [h(11)]).shape == (1, DIM)  # this semst reads it


OLD_SEMST = "901e1c8"  # the last commit before row checksums


def test_a_semst_before_checksums_refuses_a_cache_with_holes_and_uses_one_without(cache, tmp_path):
    """Runs the cache module of the commit before checksums on the same store."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_SEMST}:shared/cache.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with {OLD_SEMST} is not available")
    (tmp_path / "old_cache.py").write_text(source)
    probe = ("import sys, old_cache\n"
             "try:\n    old_cache.EmbeddingCache(sys.argv[1], create=False)\n"
             "except old_cache.CacheError as exc:\n    print('refused:', exc)\nelse:\n    print('opened')\n")
    run = lambda: subprocess.run([sys.executable, "-c", probe, str(cache.path)], capture_output=True, text=True,
                                 cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"})
    assert run().stdout.startswith("opened")  # checksums alone keep the cache usable by an older semst
    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[10] = np.nan
    fresh(cache).repair()
    out = run()
    assert out.stdout.startswith("refused:") and "version': 2" in out.stdout, out.stdout + out.stderr


def test_a_repair_that_drops_only_the_last_rows_leaves_no_hole_and_keeps_version_1(cache):
    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[N - 1] = np.nan
    report = fresh(cache).repair()
    assert [d["row"] for d in report["spaces"][0]["dropped"]] == [N - 1] and not report["marked_with_holes"]
    assert json.loads((cache.path / "semst_cache.json").read_text()) == FORMAT
    assert add(fresh(cache), [N - 1]) == 1
    np.testing.assert_array_equal(all_rows(cache), RNG_VECTORS[:N])


def test_repair_removes_an_unreadable_index_part_and_embed_recomputes_its_rows(cache):
    part = index_parts(cache)[1]  # rows 500..999
    flip_bit(part, part.stat().st_size // 3, 2)
    report = fresh(cache).repair()
    assert list(report["spaces"][0]["unreadable_parts"]) == [part.name]
    assert not part.exists()
    again = fresh(cache)
    assert again.verify() == [] and again.count(SPACE) == N - 500
    assert add(again, range(N)) == 500
    np.testing.assert_array_equal(all_rows(cache), RNG_VECTORS[:N])


def test_a_chunk_that_cannot_be_decoded_is_removed_by_repair_so_rows_can_be_added_again(cache):
    os.truncate(chunk_file(cache, 2), 100)  # the last, partly filled chunk: adding rows must decode it
    with pytest.raises(CacheError, match="cannot be decoded.*semst cache repair"):
        add(fresh(cache), [N])
    report = fresh(cache).repair()
    assert report["spaces"][0]["chunks_removed"] == [f"spaces/{SPACE.space_id}/vectors/c/2/0"]
    assert add(fresh(cache), range(N)) == N - 2048
    np.testing.assert_array_equal(all_rows(cache), RNG_VECTORS[:N])


def test_repair_removes_an_unreadable_spot_table(cache):
    flip_bit(spot_table(cache), spot_table(cache).stat().st_size // 2, 4)
    assert fresh(cache).repair()["spot_tables_removed"] == ["spot_tables/toy/tiny.mean.parquet"]
    assert fresh(cache).verify() == []
    with pytest.raises(CacheError, match="no spot table 'tiny.mean' for toy"):
        fresh(cache).read_spot_table("toy", "tiny.mean")


def test_repair_of_a_healthy_cache_changes_nothing(cache):
    before = {p: p.read_bytes() for p in cache.path.rglob("*") if p.is_file()}
    report = fresh(cache).repair()
    assert report["spaces"] == [] and not report["marked_with_holes"]
    assert {p: p.read_bytes() for p in cache.path.rglob("*") if p.is_file()} == before


def test_a_repair_killed_before_it_removed_the_old_parts_loses_nothing_and_a_rerun_finishes(cache, monkeypatch):
    damaged = zero_rows_of_chunk_1(cache)
    old_parts = index_parts(cache)

    def killed(self, missing_ok=False):  # the repair dies right after renaming its new part into place
        if self in old_parts:
            raise KeyboardInterrupt
        return original(self, missing_ok=missing_ok)

    original = Path.unlink
    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        fresh(cache).repair()
    monkeypatch.undo()
    assert len(index_parts(cache)) == len(old_parts) + 1
    reader = fresh(cache)  # every healthy row still reads
    healthy = [i for i in range(N) if i not in set(damaged)]
    np.testing.assert_array_equal(reader.get(SPACE, [h(i) for i in healthy]), RNG_VECTORS[healthy])
    fresh(cache).repair()
    assert fresh(cache).verify() == [] and fresh(cache).count(SPACE) == N - len(damaged)


# -- caches written before checksums --------------------------------------------------------------

def test_a_cache_written_before_checksums_reads_as_before_and_verify_notes_its_unchecked_rows(cache):
    write_parts_without_checksums(cache)
    reader = fresh(cache)
    np.testing.assert_array_equal(reader.get(SPACE, [h(i) for i in range(N)]), RNG_VECTORS[:N])
    found = reader.check()
    assert found.problems == []
    assert found.notes == [f"space {SPACE.space_id}: {N} rows unchecked (written before checksums); "
                           f"`semst cache verify --fix` records their checksums"]
    out = CliRunner().invoke(main, ["cache", "verify", "--cache", str(cache.path)])
    assert out.exit_code == 0 and f"{N} rows unchecked (written before checksums)" in out.output


def test_nan_in_a_row_written_before_checksums_is_still_found(cache):
    write_parts_without_checksums(cache)
    zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[1500] = np.nan
    problems = assert_damage_found_and_never_used(cache, "vectors/c/1/0")
    assert any("NaN or inf" in p and "(rows 1500)" in p for p in problems), problems


def test_verify_fix_records_checksums_for_old_rows_after_which_damage_is_found(cache):
    write_parts_without_checksums(cache)
    add(fresh(cache), [N])  # a new-style part next to the old ones
    out = CliRunner().invoke(main, ["cache", "verify", "--fix", "--cache", str(cache.path)])
    assert out.exit_code == 0 and f"recorded checksums for {N} rows" in out.output, out.output
    assert fresh(cache).check().notes == [] and len(index_parts(cache)) == 1
    with open(chunk_file(cache), "r+b") as f:
        f.seek(8000)
        f.write(b"\0" * 2048)
    assert_damage_found_and_never_used(cache, "vectors/c/1/0")


def test_gc_merges_parts_written_before_and_after_checksums(cache):
    write_parts_without_checksums(cache)
    add(fresh(cache), [N])
    assert len(index_parts(cache)) == 6
    assert fresh(cache).gc()["parts_merged"] == 6
    assert len(index_parts(cache)) == 1
    found = fresh(cache).check()
    assert found.problems == [] and "2500 rows unchecked" in found.notes[0]
    np.testing.assert_array_equal(fresh(cache).get(SPACE, [h(i) for i in range(N + 1)]), RNG_VECTORS[:N + 1])


# -- the command line -------------------------------------------------------------------------------

def test_cli_verify_prints_problem_lines_and_exits_1_then_repair_and_verify_is_ok(cache):
    damaged = zero_rows_of_chunk_1(cache)
    bad = CliRunner().invoke(main, ["cache", "verify", "--cache", str(cache.path)])
    assert bad.exit_code == 1 and bad.output.startswith(f"problem: space {SPACE.space_id}: checksum mismatch in "
                                                        f"{len(damaged)} rows")
    assert "Traceback" not in bad.output
    fixed = CliRunner().invoke(main, ["cache", "repair", "--cache", str(cache.path)])
    assert fixed.exit_code == 0
    assert f"dropped {len(damaged)} rows from the index (checksum mismatch: {len(damaged)})" in fixed.output
    assert f"to recompute: `semst embed toy` with the settings of tag tiny.mean ({len(damaged)} of its" in fixed.output
    ok = CliRunner().invoke(main, ["cache", "verify", "--cache", str(cache.path)])
    assert ok.exit_code == 0 and "OK" in ok.output


def test_cli_verify_reports_an_undecodable_chunk_as_a_problem_line(cache):
    os.truncate(chunk_file(cache), 10)
    out = CliRunner().invoke(main, ["cache", "verify", "--cache", str(cache.path)])
    assert out.exit_code == 1 and "problem: " in out.output and "cannot be decoded" in out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)


# -- write faults are messages ---------------------------------------------------------------------

def test_atomic_write_keeps_the_first_error_when_its_clean_up_fails_too(tmp_path, monkeypatch):
    from semst.shared.io import atomic_write

    def full(tmp):
        tmp.write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "f.txt", full)
    assert caught.value.errno == errno.ENOSPC


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somewhere/in/the/cache")


@pytest.mark.parametrize("operation,target", [
    ("add", "semst.shared.cache.pq.write_table"),
    ("add", "semst.shared.cache.os.fsync"),
    ("spot table", "semst.shared.cache.pq.write_table"),
    ("gc", "semst.shared.cache.pq.write_table"),
    ("repair", "semst.shared.cache.pq.write_table"),
    ("verify --fix", "semst.shared.cache.pq.write_table"),
    ("create", "semst.shared.cache.os.rename"),
])
def test_a_full_disk_is_a_cache_error_that_says_what_to_do_and_loses_nothing(tmp_path, monkeypatch, operation, target):
    cache = fill(tmp_path / "emb.zarr", n=600, batch=300)
    if operation == "repair":
        zarr.open_array(str(cache.path / "spaces" / SPACE.space_id / "vectors"), mode="r+")[5] = np.nan
    if operation == "verify --fix":
        write_parts_without_checksums(cache)
    do = {"add": lambda: add(fresh(cache), range(600, 700)), "gc": lambda: fresh(cache).gc(),
          "spot table": lambda: fresh(cache).write_spot_table("toy", "other", ["s"], [h(0)], {}),
          "repair": lambda: fresh(cache).repair(), "verify --fix": lambda: fresh(cache).record_checksums(),
          "create": lambda: EmbeddingCache(tmp_path / "new.zarr")}[operation]
    monkeypatch.setattr(target, enospc)
    with pytest.raises(CacheError, match="disk full while .*free space or use another --cache"):
        do()
    monkeypatch.undo()
    assert fresh(cache).count(SPACE) == 600
    np.testing.assert_array_equal(fresh(cache).get(SPACE, [h(i) for i in range(600) if i != 5]),
                                  RNG_VECTORS[[i for i in range(600) if i != 5]])
    assert not (tmp_path / "new.zarr").exists()


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                         (errno.EPERM, "operation not permitted")])
def test_check_writable_names_the_fault_before_anything_is_computed(cache, monkeypatch, code, words):
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(cache.path / ".tmp-writable-x"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(CacheError, match=f"{words} while checking that it can write to {cache.path}"):
        fresh(cache).check_writable()


def test_embed_reports_a_read_only_cache_before_it_loads_any_model(tmp_path, monkeypatch):
    from toy_slides import two_domain_slide

    from semst.embed.run import embed_dataset
    from semst.shared.config import load_embed_config

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "emb.zarr" / ".tmp-writable-x"))

    def no_model(*args, **kwargs):
        raise AssertionError("the tokenizer or model was loaded before the cache was checked")

    EmbeddingCache(tmp_path / "emb.zarr")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr("semst.embed.checkpoints.resolve_model", lambda model: tmp_path / "some-model")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_model)
    monkeypatch.setattr("semst.embed.backends.load_backend", no_model)
    cfg = load_embed_config("toy", {"cache": str(tmp_path / "emb.zarr"), "model": "default", "k_genes": 5,
                                    "genes_from": "all", "backend": "transformers"})
    with pytest.raises(CacheError, match="read-only file system"):
        embed_dataset(cfg, adata=two_domain_slide(), progress=False, log=lambda *a, **k: None)


def test_a_model_that_does_not_exist_leaves_no_new_cache_behind(tmp_path):
    from toy_slides import two_domain_slide

    from semst.embed.checkpoints import ModelNotFoundError
    from semst.embed.run import embed_dataset
    from semst.shared.config import load_embed_config

    cfg = load_embed_config("toy", {"cache": str(tmp_path / "new.zarr"), "model": str(tmp_path / "no-such-model"),
                                    "k_genes": 5, "genes_from": "all", "backend": "transformers"})
    with pytest.raises(ModelNotFoundError):
        embed_dataset(cfg, adata=two_domain_slide(), progress=False, log=lambda *a, **k: None)
    assert not (tmp_path / "new.zarr").exists()


# -- real file systems: a read-only mount and a full tmpfs (root in a sandbox that can mount) -------

@contextlib.contextmanager
def mounted(*args: str, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    except OSError as exc:
        pytest.skip(f"cannot mount here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()})")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def remount_read_only(target: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only here ({done.stderr.strip()})")


def test_a_cache_on_a_read_only_mount_is_read_normally_and_refused_for_writing_with_a_message(cache, tmp_path):
    with mounted("--bind", str(cache.path), target=tmp_path / f"ro-{uuid.uuid4().hex[:6]}") as ro:
        remount_read_only(ro)
        reader = EmbeddingCache(ro, create=False)
        np.testing.assert_array_equal(reader.get(SPACE, [h(i) for i in range(N)]), RNG_VECTORS[:N])
        assert reader.verify() == []
        with pytest.raises(CacheError, match=f"read-only file system while checking that it can write to {ro}"):
            reader.check_writable()
        with pytest.raises(CacheError, match="read-only file system while adding rows to .*no committed row changed"):
            add(reader, [N])
        with pytest.raises(CacheError, match="read-only file system while writing the spot table"):
            reader.write_spot_table("toy", "other", ["s"], [h(0)], {})
        for command in (["repair"], ["gc"], ["verify", "--fix"]):
            out = CliRunner().invoke(main, ["cache", *command, "--cache", str(ro)])
            assert out.exit_code == 2 and "error: read-only file system while" in out.output, out.output


def test_a_full_tmpfs_while_adding_is_a_disk_full_message_and_every_committed_row_survives(tmp_path):
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=tmp_path / f"full-{uuid.uuid4().hex[:6]}") as disk:
        cache = EmbeddingCache(disk / "emb.zarr")
        big = EmbeddingSpace(model="tiny", weights="e" * 64, pooling="mean", dtype="float32", dim=512)
        rng = np.random.default_rng(0)
        committed = 0
        with pytest.raises(CacheError, match="disk full while adding rows to .*vectors.*: free space or use another --cache; no committed row changed"):
            for start in range(0, 10_000, 100):
                ids = range(start, start + 100)
                committed += cache.add(big, [h(i) for i in ids], rng.normal(size=(100, 512)).astype(np.float32),
                                       [f"prompt {i}" for i in ids], [3] * 100)
        assert committed > 0
        reader = EmbeddingCache(disk / "emb.zarr", create=False)
        assert reader.count(big) == committed and reader.verify() == []
        assert reader.get(big, [h(i) for i in range(committed)]).shape == (committed, 512)


def test_repair_keeps_the_checked_entry_of_a_conflict_and_drops_the_unchecked_one(cache):
    part = cache.path / "index" / SPACE.space_id / "part-zz.parquet"  # as an older writer's bug could leave
    pq.write_table(pa.table({"prompt_hash": [h(0)], "row": pa.array([2], pa.int64()), "prompt": ["x"],
                             "n_tokens": pa.array([1], pa.int32())}), part)
    problems = fresh(cache).verify()
    assert any("indexed at rows 0 and 2" in p for p in problems) and any("claimed by two prompts" in p for p in problems)
    dropped = fresh(cache).repair()["spaces"][0]["dropped"]
    assert dropped == [{"prompt_hash": h(0), "row": 2, "reason": "claimed twice in the index"}]
    assert fresh(cache).verify() == []
    np.testing.assert_array_equal(all_rows(cache), RNG_VECTORS[:N])


def test_repair_never_removes_a_part_it_merely_may_not_read(cache, monkeypatch):
    part = index_parts(cache)[1]
    opened = pq.ParquetFile

    def denied(source, *args, **kwargs):
        if Path(source) == part:
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
        return opened(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", denied)
    with pytest.raises(CacheError, match=f"no permission to read .*{part.name}"):
        fresh(cache).repair()
    with pytest.raises(CacheError, match="no permission to read"):
        fresh(cache).verify()
    monkeypatch.undo()
    assert part.exists() and fresh(cache).verify() == []
