"""`semst embed --ray [ADDRESS]`: the missing prompts on N vLLM engine replicas through Ray Data's LLM
batch API (``ray.data.llm``), the results committed by this process -- the driver, the cache's single
writer -- as they arrive.

Imported only when Ray is asked for (``pip install 'semst[distributed]'``, i.e. ``ray[data]``; never
``ray[llm]``, which pins another vLLM and CUDA-only packages). The driver tokenizes (the same token ids
as the in-process backends, see embed.backends) and sends only token ids; each replica runs the model
as a pooling model with the run's pooling and no normalisation, so its vectors are those of the
in-process vLLM backend.

The guarantees of the in-process path hold because only the driver writes: every arriving batch is one
cache commit (a SIGKILLed driver leaves a valid cache, the rerun computes only the rest); Ctrl-C /
SIGTERM stop after the batch being committed; a batch lost with a replica is simply still missing,
which the run reports as an error (no spot table) and the rerun computes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Iterator

import numpy as np

INSTALL_HINT = "pip install 'semst[distributed]'"
LOCAL = "local"  # ray_address of a Ray started for the run on this machine
CONNECT_TIMEOUT_S = 10
# A local CPU-only Ray on this kind of machine (issue 22): vLLM's CPU worker must not pin OpenMP
# threads to cores another replica uses, and binds to the loopback address; no usage reporting.
LOCAL_ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_HOST_IP": "127.0.0.1"}
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING",
              "RAY_USAGE_STATS_ENABLED": "0"}

# (hashes, vectors) of one arriving batch of results, in any order and any split.
Results = Iterable[tuple[list[str], np.ndarray]]


def check_ray_ready(address: str) -> None:
    """Before any work: Ray importable (else the install hint) and a cluster ``HOST:PORT`` reachable
    (Ray itself retries a dead address for many minutes). EmbedError, one line, exit 2."""
    from semst.embed.run import EmbedError

    try:
        import ray  # noqa: F401 - ~1 s, only with --ray; a broken install fails here too, not after the work
    except ImportError as exc:
        raise EmbedError(f"--ray needs Ray, which cannot be imported ({exc}): {INSTALL_HINT} "
                         "(or run without --ray)") from None
    target = _host_port(address)
    if target is None:
        return  # "local", "auto", ray://...: Ray resolves those itself
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EmbedError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with `ray start "
                         f"--head --port={target[1]}` on {target[0]}, or use --ray alone for a local Ray") from None


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or "://" in address or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def compute_missing_on_ray(cfg, model_dir, space, cache, missing: list[str], unique: dict[str, str],
                           progress: bool, log) -> int:
    """Embed ``missing`` on Ray replicas and commit them here; how many rows this run committed."""
    from semst.embed.backends import MAX_TOKENS, _TokenizingBackend

    # The tokenizer and config only (no weights): token ids and the space the replicas compute.
    tokens = _TokenizingBackend(model_dir, cfg.pooling, cfg.dtype, cfg.batch_size, MAX_TOKENS)
    _check_space(tokens.space(), space)
    texts = {h: unique[h] for h in missing}
    ids = tokens.token_ids([texts[h] for h in missing])  # a too-long prompt fails here, before Ray starts
    n_tokens = {h: len(seq) for h, seq in zip(missing, ids)}
    with ray_session(cfg.ray_address, cfg.workers, log) as cluster:
        results = replica_results(cfg, model_dir, tokens.max_tokens, missing, ids, cluster)
        return commit_as_they_arrive(cache, space, missing, texts, n_tokens, results, progress)


def _check_space(got, space) -> None:
    from semst.embed.run import EmbedError

    if (got.weights, got.pooling, got.dtype, got.dim) != (space.weights, space.pooling, space.dtype, space.dim):
        raise EmbedError(f"the replicas would compute embedding space {got} but the cache key was computed as "
                         f"{space}; refusing to mix them")


# --- the driver: commit what arrives -----------------------------------------------------------------


def commit_as_they_arrive(cache, space, missing: list[str], texts: dict[str, str], n_tokens: dict[str, int],
                          results: Results, progress: bool = False) -> int:
    """Commit each arriving batch of ``results`` as one cache commit; the number of rows committed.

    Batches may come in any order and any split. A batch naming a prompt that was not sent, or with
    vectors of the wrong shape or non-finite values, is refused (EmbedError) before it is committed.
    When the results end with prompts that never came back (a lost replica's batch), they are still
    missing from the cache: EmbedError says how many, and the rerun computes them.
    """
    from tqdm import tqdm

    from semst.embed.run import EmbedError, _stopped_note
    from semst.shared import interrupt

    sent = set(missing)
    computed = 0
    arrived: set[str] = set()
    bar = tqdm(total=len(missing), unit="prompt", desc="embedding (ray)", disable=not progress)
    try:
        with interrupt.at_boundaries():
            for hashes, vectors in _arrivals(results):
                hashes = list(hashes)
                vectors = _checked(hashes, vectors, sent, space.dim)
                with interrupt.critical():
                    # add() skips rows already committed (another run, or a batch Ray retried).
                    computed += cache.add(space, hashes, vectors, [texts[h] for h in hashes],
                                          [n_tokens[h] for h in hashes])
                arrived.update(hashes)
                bar.update(len(hashes))
                interrupt.check()
    except interrupt.Interrupted as stop:
        stop.detail = _stopped_note(cache, space, missing, computed)
        raise
    finally:
        bar.close()
    lost = len(sent - arrived)
    if lost:
        raise EmbedError(f"{lost} of {len(missing)} prompts did not come back from the Ray replicas; the "
                         f"{computed} that did are committed and the cache is valid: run the same command "
                         "again to compute the rest")
    return computed


def _arrivals(results: Results) -> Results:
    """``results``, with a failure of Ray itself (a replica or Ray's processes gone) as one line. A
    terminal's Ctrl-C reaches Ray's processes too: their failure then is the user's stop."""
    from semst.embed.run import EmbedError
    from semst.shared import interrupt

    iterator = iter(results)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except (interrupt.Interrupted, EmbedError):
            raise
        except Exception as exc:
            if interrupt.stop_requested():
                interrupt.check()
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise EmbedError(f"Ray stopped the run ({type(exc).__name__}: {first}); the rows committed so far are "
                             "kept and the cache is valid: run the same command again to compute the rest "
                             "(Ray's logs: /tmp/ray/session_latest/logs)") from exc
        yield item


def _checked(hashes: list[str], vectors, sent: set[str], dim: int) -> np.ndarray:
    from semst.embed.run import EmbedError

    vectors = np.asarray(vectors, dtype=np.float32)
    stray = [h for h in hashes if h not in sent]
    if stray:
        raise EmbedError(f"a Ray replica returned {len(stray)} prompt(s) this run did not send "
                         f"(first {stray[0][:12]}); nothing of that batch was committed")
    if vectors.shape != (len(hashes), dim):
        raise EmbedError(f"a Ray replica returned vectors of shape {vectors.shape}, expected {(len(hashes), dim)}; "
                         "nothing of that batch was committed")
    if not np.isfinite(vectors).all():
        raise EmbedError("a Ray replica returned non-finite hidden states; nothing of that batch was committed "
                         "(try --dtype float32)")
    return vectors


# --- Ray: the cluster, the replicas, the stream of results ------------------------------------------


class Cluster:
    """Where the replicas run: how many, and whether each takes a GPU or one CPU."""

    def __init__(self, replicas: int, gpu: bool, local: bool):
        self.replicas, self.gpu, self.local = replicas, gpu, local

    def __str__(self) -> str:
        where = "local Ray" if self.local else "Ray cluster"
        return f"{self.replicas} vLLM replica(s), one {'GPU' if self.gpu else 'CPU'} each, on a {where}"


@contextlib.contextmanager
def ray_session(address: str, workers: int | None, log=print) -> Iterator[Cluster]:
    """Ray for the run: a local one started here (``address`` "local") or an existing cluster joined;
    shut down (this driver's replicas end with it) however the run ends. A Ray the caller started
    (semst as a library) is used as it is and left running."""
    from semst.embed.run import EmbedError
    from semst.shared import interrupt

    for name, value in ENGINE_ENV.items():
        os.environ.setdefault(name, value)
    import ray
    import ray.data

    local = address == LOCAL
    owned = not ray.is_initialized()
    # Our progress bar and messages only: Ray's and Ray Data's go to Ray's log folder.
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if owned:
        # ray.init installs its own SIGTERM handler (sys.exit wherever it lands, even inside a cache
        # commit); the command's own (semst.shared.interrupt: stop after the batch) are put back.
        with interrupt.handlers_kept():
            try:
                if local:
                    for name, value in LOCAL_ENGINE_ENV.items():
                        os.environ.setdefault(name, value)
                    replicas = workers or _cores()
                    # One CPU more than the replicas take: with exactly as many, Ray Data's other
                    # operators find no CPU and the pipeline deadlocks (issue 22).
                    ray.init(num_cpus=replicas + 1, num_gpus=0, include_dashboard=False, **quiet)
                else:
                    ray.init(address=address, **quiet)
            except Exception as exc:  # ConnectionError, a timeout, a bad address
                raise EmbedError(f"cannot start or join Ray at {address!r} ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); for a cluster run `ray start "
                                 "--head` on its head node and pass --ray HEAD:6379") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    try:
        cluster = _cluster(workers, local)
        log(f"Ray: {cluster} (vLLM start-up takes minutes on CPU)")
        yield cluster
    finally:
        if owned:
            ray.shutdown()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cluster(workers: int | None, local: bool) -> Cluster:
    import ray

    from semst.embed.run import EmbedError

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:  # one replica per GPU
        replicas = workers or gpus
        if replicas > gpus:
            raise EmbedError(f"workers = {replicas} replicas need one GPU each; the Ray cluster has {gpus}")
        return Cluster(replicas, gpu=True, local=local)
    replicas = workers or max(1, cpus - 1)
    if replicas + 1 > cpus:
        raise EmbedError(f"workers = {replicas} CPU replicas need {replicas + 1} CPUs on the Ray cluster "
                         f"(one each, one for Ray Data); it has {cpus}")
    return Cluster(replicas, gpu=False, local=local)


def replica_results(cfg, model_dir, max_tokens: int, missing: list[str], ids: list[list[int]],
                    cluster: Cluster) -> Results:
    """The replicas' (hashes, vectors), one pair per finished block, as Ray Data streams them."""
    import ray

    processor = build_embed_processor(cfg, model_dir, max_tokens, cluster)
    rows = ray.data.from_items([{"hash": h, "ids": seq} for h, seq in zip(missing, ids)],
                               override_num_blocks=max(1, min(len(missing) // cfg.batch_size + 1, 1000)))
    for batch in processor(rows).iter_batches(batch_size=None, batch_format="numpy"):
        yield [str(h) for h in batch["hash"]], np.stack(list(batch["embedding"]))


def build_embed_processor(cfg, model_dir, max_tokens: int, cluster: Cluster):
    """A Ray Data processor: token ids in, the run's pooled final-layer hidden states out."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from vllm.config import PoolerConfig

    env = dict(ENGINE_ENV) | ({"OMP_NUM_THREADS": "1", **LOCAL_ENGINE_ENV} if cluster.local else {})
    engine = dict(
        pooler_config=PoolerConfig(pooling_type=cfg.pooling.upper(), use_activation=False),
        dtype=cfg.dtype,
        max_model_len=max_tokens,
        max_num_seqs=cfg.batch_size,
        enforce_eager=True,  # as in-process: no compilation, start-up in seconds rather than minutes
    )
    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        task_type="embed",
        engine_kwargs=engine,
        batch_size=cfg.batch_size,
        concurrency=(cluster.replicas, cluster.replicas),
        runtime_env={"env_vars": env},
        # Without GPUs each replica takes one CPU (Ray's default for an engine is one GPU).
        placement_group_config=None if cluster.gpu else {"bundle_per_worker": {"CPU": 1}},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,  # token ids in, vectors out
        log_engine_metrics=False,
        # At most two batches queued per replica (one running, one next): by default Ray Data queues 16 on
        # the first replica that is ready, and the others, ready later, find nothing left (measured: two
        # replicas ran as one).
        max_concurrent_batches=2,
        max_tasks_in_flight_per_actor=2,
    )
    return build_processor(
        config,
        preprocess=lambda row: {"hash": row["hash"], "tokenized_prompt": row["ids"],
                                "pooling_params": {"use_activation": False}},
        postprocess=lambda row: {"hash": row["hash"], "embedding": row["embeddings"]},
    )
