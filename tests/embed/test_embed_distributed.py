"""Stage 1 on many workers or hosts, without Ray: `--shard I/N` slices and the Ray driver's commit loop
(fed by a stand-in for the replicas). The Ray run itself is tests/test_embed_ray.py (`make test-ray`)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from toy_slides import write_slide

from semst.embed import ray_engine
from semst.embed.run import EmbedError, embed_dataset
from semst.embed.shards import Shard, ShardError, parse_shard
from semst.shared import interrupt
from semst.shared.cache import EmbeddingCache, EmbeddingSpace
from semst.shared.config import ConfigError, load_cluster_config, load_embed_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    write_slide(data / "toy.h5ad", 40)  # 40 spots, (nearly) all distinct prompts
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    return {"tmp": tmp_path, "data": data, "cache": tmp_path / "cache.zarr", "model": str(tiny_model)}


def cfg(env, cache=None, **kw):
    base = {"cache": str(cache or env["cache"]), "model": env["model"], "backend": "transformers", "k_genes": 5,
            "batch_size": 4, "genes_from": "all"}
    return load_embed_config("toy", {**base, **kw})


def quiet(*a, **k):
    pass


def rows(cache_path) -> dict[str, np.ndarray]:
    """prompt hash -> vector of every row in a cache's one space."""
    cache = EmbeddingCache(cache_path, create=False)
    if not cache.spaces():
        return {}
    (space,) = cache.spaces()
    hashes = _hashes(cache_path)
    return dict(zip(hashes, cache.get(space, hashes)))


def _hashes(cache_path) -> list[str]:
    """Every committed prompt hash, from the index parts (the cache's documented format)."""
    import pyarrow.parquet as pq

    return sorted({h for part in Path(cache_path).rglob("part-*.parquet")
                   for h in pq.read_table(part, columns=["prompt_hash"]).column("prompt_hash").to_pylist()})


# --- --shard I/N --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    ("2/2", "0 <= I < N"), ("-1/3", "0 <= I < N"), ("0/0", "N >= 1"), ("1/-2", "N >= 1"),
    ("a/b", "must be I/N"), ("1", "must be I/N"), ("", "must be I/N"), ("1/2/3", "must be I/N"),
])
def test_a_shard_that_is_not_i_of_n_is_refused_with_a_reason(text, message):
    with pytest.raises(ShardError, match=message):
        parse_shard(text)
    assert issubclass(ShardError, ConfigError)  # the CLI's one-line error, exit 2


def test_the_shards_of_n_cover_every_hash_exactly_once():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]
    for n in (1, 2, 3, 7):
        slices = [Shard(i, n).select(hashes) for i in range(n)]
        assert sorted(sum(slices, [])) == sorted(hashes)  # together: all of them, none twice
        assert all(len(s) > 1000 / n / 2 for s in slices)  # and roughly evenly


def test_shard_runs_into_their_own_stores_write_disjoint_slices_covering_the_unsharded_run(env):
    whole = embed_dataset(cfg(env), progress=False, log=quiet)
    expected = rows(env["cache"])
    stores = [env["tmp"] / f"shard{i}.zarr" for i in range(3)]
    for i, store in enumerate(stores):
        embed_dataset(cfg(env, cache=store), shard=Shard(i, 3), progress=False, log=quiet)
    got = [rows(store) for store in stores]
    for i, part in enumerate(got):
        assert sorted(part) == Shard(i, 3).select(sorted(expected))  # only its slice
    assert sum(len(p) for p in got) == whole.n_prompts == len(expected)  # disjoint and complete
    for part in got:
        for h, v in part.items():
            np.testing.assert_array_equal(v, expected[h])


def test_two_shard_runs_merged_and_finished_equal_one_unsharded_run(env):
    """The route for hosts that share no lock: each shard fills its own store, `cache merge` joins them,
    and `semst embed` on the merged cache computes nothing and writes the spot table."""
    from semst.shared.cache import merge_caches

    whole = embed_dataset(cfg(env), progress=False, log=quiet)
    stores = [env["tmp"] / f"host{i}.zarr" for i in range(2)]
    for i, store in enumerate(stores):
        embed_dataset(cfg(env, cache=store), shard=Shard(i, 2), progress=False, log=quiet)
    merged = env["tmp"] / "merged.zarr"
    assert merge_caches(stores, merged)["problems"] == []
    finish = embed_dataset(cfg(env, cache=merged), progress=False, log=quiet)
    assert finish.n_computed == 0 and finish.tag == whole.tag
    expected, got = rows(env["cache"]), rows(merged)
    assert sorted(got) == sorted(expected)
    for h, v in expected.items():
        np.testing.assert_array_equal(got[h], v)
    one, _ = EmbeddingCache(env["cache"], create=False).read_spot_table("toy", whole.tag)
    two, _ = EmbeddingCache(merged, create=False).read_spot_table("toy", whole.tag)
    assert one["prompt_hash"].tolist() == two["prompt_hash"].tolist()
    assert EmbeddingCache(merged, create=False).verify() == []


def test_a_shard_slices_only_what_its_store_is_missing(env):
    embed_dataset(cfg(env), max_spots=10, progress=False, log=quiet)  # the store holds 10 prompts already
    before = rows(env["cache"])
    report = embed_dataset(cfg(env), shard=Shard(1, 2), progress=False, log=quiet)
    after = rows(env["cache"])
    new = sorted(set(after) - set(before))
    assert report.n_computed == len(new) and new == Shard(1, 2).select(new)
    assert not [h for h in Shard(1, 2).select(sorted(_all_hashes(env))) if h not in after]


def _all_hashes(env) -> set[str]:
    embed_dataset(cfg(env, cache=env["tmp"] / "all.zarr"), progress=False, log=quiet)
    return set(rows(env["tmp"] / "all.zarr"))


def test_a_shard_writes_no_spot_table_while_other_shards_prompts_are_missing(env):
    lines = []
    report = embed_dataset(cfg(env), shard=Shard(0, 2), progress=False, log=lines.append)
    assert report.spot_table is None
    assert EmbeddingCache(env["cache"], create=False).spot_tables("toy") == []
    assert "not written" in " ".join(lines) and "semst cache merge" in " ".join(lines)
    # the other shards' prompts are neither cached nor computed here, and the summary says so
    others = report.n_prompts - report.n_computed
    assert report.n_cached == 0 and f"0 cached, {report.n_computed} computed, {others} left to the other shards" in lines[-1]


def test_the_last_shard_on_a_cache_holding_the_others_writes_the_spot_table(env):
    embed_dataset(cfg(env), shard=Shard(0, 2), progress=False, log=quiet)
    report = embed_dataset(cfg(env), shard=Shard(1, 2), progress=False, log=quiet)
    assert report.spot_table is not None and report.spot_table.exists()
    one = embed_dataset(cfg(env, cache=env["tmp"] / "one.zarr"), shard=Shard(0, 1), progress=False, log=quiet)
    assert one.spot_table is not None  # 0/1 is the whole dataset


def _semst(*args, env_vars=None):
    return subprocess.run([sys.executable, "-m", "semst.experiments.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env_vars or {})}, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--shard", "2/2"], "0 <= I < N"),
    (["--shard", "x"], "must be I/N"),
    (["--workers", "0", "--ray"], "workers must be >= 1"),
])
def test_bad_shard_or_workers_exit_2_before_the_cache_is_created(env, args, message):
    out = _semst("embed", "toy", "--cache", str(env["cache"]), "--model", env["model"], *args,
                 env_vars={"SEMST_DATA_PATH": str(env["data"])})
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not env["cache"].exists()


# --- the Ray driver's commit loop, with a stand-in for the replicas -----------------------------------


def space_of(dim=8) -> EmbeddingSpace:
    return EmbeddingSpace(model="stand-in", weights="0" * 64, pooling="mean", dtype="float32", dim=dim)


def prompts(n=23):
    texts = [f"prompt number {i}" for i in range(n)]
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    return hashes, dict(zip(hashes, texts)), {h: 3 + i for i, h in enumerate(hashes)}


def vectors_of(hashes, dim=8) -> np.ndarray:
    """A fixed vector per prompt, whatever batch it arrives in."""
    return np.stack([np.random.default_rng(int(h[:8], 16)).standard_normal(dim) for h in hashes]).astype(np.float32)


def stand_in(hashes, sizes, order_seed=0, drop=()):
    """The replicas as Ray Data streams them: shuffled, in uneven pieces, the pieces in ``drop`` lost."""
    shuffled = list(np.random.default_rng(order_seed).permutation(hashes))
    pieces, start = [], 0
    for size in sizes:
        pieces.append(shuffled[start:start + size])
        start += size
    assert start == len(hashes)
    for i, piece in enumerate(pieces):
        if i not in drop:
            yield piece, vectors_of(piece)


def test_results_arriving_out_of_order_and_in_pieces_are_committed_each_to_its_prompt(tmp_path):
    cache, space = EmbeddingCache(tmp_path / "c.zarr", create=True), space_of()
    hashes, texts, tokens = prompts()
    n = ray_engine.commit_as_they_arrive(cache, space, hashes, texts, tokens, stand_in(hashes, [1, 7, 2, 9, 4]))
    assert n == len(hashes)
    np.testing.assert_array_equal(cache.get(space, hashes), vectors_of(hashes))
    assert cache.verify() == []


def test_a_batch_that_never_arrives_is_still_missing_and_the_run_says_so(tmp_path):
    cache, space = EmbeddingCache(tmp_path / "c.zarr", create=True), space_of()
    hashes, texts, tokens = prompts()
    lost = list(np.random.default_rng(0).permutation(hashes))[5:12]  # piece 1 of [5, 7, 11]
    with pytest.raises(EmbedError, match="7 of 23 prompts did not come back.*16 that did are committed"):
        ray_engine.commit_as_they_arrive(cache, space, hashes, texts, tokens,
                                         stand_in(hashes, [5, 7, 11], drop={1}))
    present = dict(zip(hashes, cache.contains(space, hashes)))
    assert [h for h in hashes if not present[h]] == [h for h in hashes if h in lost]
    rerun = [h for h in hashes if not present[h]]  # what the rerun computes: exactly the lost batch
    assert ray_engine.commit_as_they_arrive(cache, space, rerun, texts, tokens, stand_in(rerun, [7])) == 7
    assert cache.contains(space, hashes).all() and cache.verify() == []


@pytest.mark.parametrize("bad,message", [
    (lambda hs, v: (hs + ["f" * 64], np.vstack([v, v[:1]])), "did not send"),
    (lambda hs, v: (hs, v[:, :4]), "shape"),
    (lambda hs, v: (hs, np.where(np.arange(v.shape[1]) == 0, np.nan, v)), "non-finite"),
])
def test_a_malformed_batch_from_a_replica_is_refused_whole_and_the_earlier_ones_kept(tmp_path, bad, message):
    cache, space = EmbeddingCache(tmp_path / "c.zarr", create=True), space_of()
    hashes, texts, tokens = prompts()
    good, second = hashes[:10], hashes[10:]

    def results():
        yield good, vectors_of(good)
        yield bad(second, vectors_of(second))

    with pytest.raises(EmbedError, match=message):
        ray_engine.commit_as_they_arrive(cache, space, hashes, texts, tokens, results())
    assert cache.contains(space, good).all() and not cache.contains(space, second).any()


def test_a_stop_signal_ends_the_run_after_the_batch_being_committed(tmp_path):
    cache, space = EmbeddingCache(tmp_path / "c.zarr", create=True), space_of()
    hashes, texts, tokens = prompts()

    def results():
        yield hashes[:5], vectors_of(hashes[:5])
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the next batch is on its way
        yield hashes[5:9], vectors_of(hashes[5:9])
        yield hashes[9:], vectors_of(hashes[9:])

    with interrupt.stop_on_signals(), pytest.raises(interrupt.Interrupted) as stop:
        ray_engine.commit_as_they_arrive(cache, space, hashes, texts, tokens, results())
    assert cache.contains(space, hashes[:9]).all() and not cache.contains(space, hashes[9:]).any()
    assert "9 prompts embedded and committed by this run, 14 of 23 still to compute" in stop.value.detail


def test_ray_failing_mid_stream_is_one_line_and_keeps_what_arrived(tmp_path):
    cache, space = EmbeddingCache(tmp_path / "c.zarr", create=True), space_of()
    hashes, texts, tokens = prompts()

    def results():
        yield hashes[:6], vectors_of(hashes[:6])
        raise RuntimeError("ActorDiedError: the actor died unexpectedly\n(long Ray traceback)")

    with pytest.raises(EmbedError, match=r"^Ray stopped the run \(RuntimeError: ActorDiedError: the actor died "
                                         r"unexpectedly\); the rows committed so far are kept") as err:
        ray_engine.commit_as_they_arrive(cache, space, hashes, texts, tokens, results())
    assert "\n" not in str(err.value)
    assert cache.contains(space, hashes[:6]).all() and not cache.contains(space, hashes[6:]).any()


def test_ray_failing_after_a_stop_signal_is_the_users_stop(tmp_path):
    # A terminal's Ctrl-C reaches Ray's processes too; the failure that follows is the stop, exit 130.
    cache, space = EmbeddingCache(tmp_path / "c.zarr", create=True), space_of()
    hashes, texts, tokens = prompts()

    def results():
        yield hashes[:6], vectors_of(hashes[:6])
        os.kill(os.getpid(), signal.SIGINT)
        raise RuntimeError("raylet died")

    with interrupt.stop_on_signals(), pytest.raises(interrupt.Interrupted) as stop:
        ray_engine.commit_as_they_arrive(cache, space, hashes, texts, tokens, results())
    assert "6 prompts embedded and committed by this run" in stop.value.detail


def test_embed_with_ray_sends_only_missing_token_ids_and_commits_the_in_process_rows(env, monkeypatch):
    """The --ray path of embed_dataset end to end, the replicas replaced by the transformers backend."""
    from semst.embed.backends import load_backend

    reference = embed_dataset(cfg(env, cache=env["tmp"] / "ref.zarr"), progress=False, log=quiet)
    part = embed_dataset(cfg(env), max_spots=15, progress=False, log=quiet)  # some rows are there already
    sent = []

    def replicas(c, model_dir, max_tokens, missing, ids, cluster):
        backend = load_backend("transformers", str(model_dir), batch_size=4)
        assert ids == backend.token_ids([backend.tokenizer.decode(s) for s in ids])  # token ids, not text
        sent.extend(missing)
        for start in reversed(range(0, len(missing), 6)):  # backwards, in pieces of 6
            piece = missing[start:start + 6]
            yield piece, backend._embed_ids(ids[start:start + 6])

    monkeypatch.setattr(ray_engine, "check_ray_ready", lambda address: None)  # Ray need not be installed
    monkeypatch.setattr(ray_engine, "replica_results", replicas)
    monkeypatch.setattr(ray_engine, "ray_session",
                        lambda *a, **k: contextlib.nullcontext(ray_engine.Cluster(2, gpu=False, local=True)))
    report = embed_dataset(cfg(env, ray_address="local"), progress=False, log=quiet)
    assert report.n_computed == len(sent) == reference.n_prompts - part.n_prompts  # only the missing ones
    assert report.spot_table is not None
    want, got = rows(env["tmp"] / "ref.zarr"), rows(env["cache"])
    assert sorted(got) == sorted(want)
    for h in want:
        np.testing.assert_allclose(got[h], want[h], rtol=0, atol=1e-5)


def test_without_ray_installed_ray_is_a_one_line_error_before_any_work(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(EmbedError, match=r"pip install 'semst\[distributed\]'"):
        embed_dataset(cfg(env, ray_address="local"), progress=False, log=quiet)
    assert not env["cache"].exists()


def test_where_stage_1_runs_changes_no_run_name(env):
    from semst.cluster.run import default_run_name

    base = load_cluster_config("toy", {}, embed_overrides={"model": env["model"]})
    on_ray = load_cluster_config("toy", {}, embed_overrides={"model": env["model"], "ray_address": "HEAD:6379",
                                                               "workers": 8})
    assert default_run_name(base) == default_run_name(on_ray)


@pytest.mark.parametrize("field,value,message", [
    ("workers", 0, "workers must be >= 1"), ("workers", -3, "workers must be >= 1"),
    ("ray_address", "  ", "ray_address must be"),
])
def test_bad_ray_settings_are_config_errors(env, field, value, message):
    with pytest.raises(ConfigError, match=message):
        cfg(env, **{field: value})


def test_a_ray_address_where_no_cluster_answers_is_refused_before_the_cache_is_created(env, monkeypatch):
    import socket
    import types

    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))  # importable whether or not Ray is installed

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EmbedError, match=f"no Ray cluster answers at 127.0.0.1:{port}.*ray start --head"):
        embed_dataset(cfg(env, ray_address=f"127.0.0.1:{port}"), progress=False, log=quiet)
    assert not env["cache"].exists()


@pytest.mark.parametrize("address,target", [
    ("head:6379", ("head", 6379)), ("10.0.0.1:6380", ("10.0.0.1", 6380)), ("[::1]:6379", ("::1", 6379)),
    ("local", None), ("auto", None), ("ray://head:10001", None), ("head", None),
])
def test_which_ray_addresses_are_checked_for_an_answer_first(address, target):
    assert ray_engine._host_port(address) == target


def test_ray_starting_leaves_the_commands_own_signal_handlers_in_place(monkeypatch):
    """ray.init installs a SIGTERM handler that exits wherever it lands (even inside a cache commit);
    the run's own handlers (stop after the batch being committed, exit 143) must be the ones in effect."""
    import types

    def ray_init(**kwargs):  # what Ray's init does to SIGTERM
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    context = types.SimpleNamespace(enable_progress_bars=True, print_on_execution_start=True)
    fake = types.ModuleType("ray")
    fake.is_initialized, fake.init, fake.shutdown = (lambda: False), ray_init, (lambda: None)
    fake.cluster_resources = lambda: {"CPU": 3}
    fake.data = types.SimpleNamespace(DataContext=types.SimpleNamespace(get_current=lambda: context))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    with interrupt.stop_on_signals():
        ours = signal.getsignal(signal.SIGTERM)
        with ray_engine.ray_session("local", 2, log=quiet) as cluster:
            assert signal.getsignal(signal.SIGTERM) is ours
        assert cluster.replicas == 2
