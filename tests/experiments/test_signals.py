"""Ctrl-C and SIGTERM: a command stops at a safe point, says what it kept, exits 130 / 143, and
leaves a valid cache (rerun computes only the rest) and no half-written outputs.

The signals are real: sent to a subprocess of the CLI, or with os.kill to this process while the
CLI's handlers are installed. tests/slow_cli.py makes one step wait so a signal lands mid-step.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from toy_slides import two_domain_slide, write_slide

from semst.experiments.cli import main
from semst.shared import interrupt
from semst.shared.cache import EmbeddingCache

REPO = Path(__file__).resolve().parents[2]
SLOW_CLI = Path(__file__).resolve().parents[1] / "slow_cli.py"
EXIT = {"SIGINT": 130, "SIGTERM": 143}


@pytest.fixture
def env(tmp_path, tiny_model):
    """A 400-spot slide on the search path ('big', ~100 batches of 4), a fresh cache path, the tiny model."""
    data = tmp_path / "data"
    data.mkdir()
    write_slide(data / "big.h5ad", 400, seed=3)
    return {"data": data, "cache": tmp_path / "cache.zarr", "model": str(tiny_model),
            "vars": {**os.environ, "SEMST_DATA_PATH": str(data), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}}


def embed_args(env, backend="transformers"):
    return ["embed", "big", "--cache", str(env["cache"]), "--backend", backend, "--model", env["model"],
            "--k-genes", "8", "--batch-size", "4"]


def start(args, env_vars, script=None, ignore_sigint=False) -> subprocess.Popen:
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "semst.experiments.cli"]
    # ignore_sigint: as a job started with `&` from a script inherits it (bash sets SIGINT to ignored)
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(cmd + list(args), cwd=REPO, env=env_vars, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=pre)


def wait_for_parts(cache: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while len(list(cache.glob("index/*/part-*.parquet"))) < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no batch committed in 300 s"
        time.sleep(0.01)


def wait_for_line(stream, text: str, proc: subprocess.Popen) -> str:
    """Read ``stream`` (tqdm's \\r-updates included) until a line contains ``text``."""
    seen = []
    for line in stream:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came; rc {proc.wait()}; got {''.join(seen)[-2000:]}")


def committed_rows(cache: Path) -> int:
    c = EmbeddingCache(cache, create=False)
    return sum(c.count(s) for s in c.spaces())


def cache_verifies(cache: Path) -> bool:
    done = CliRunner().invoke(main, ["cache", "verify", "--cache", str(cache)])
    return done.exit_code == 0 and "OK" in done.output


def rerun_counts(env, backend="transformers") -> tuple[int, int, int]:
    """Run the same embed again; (prompts, cached, computed) from its last line."""
    done = subprocess.run([sys.executable, "-m", "semst.experiments.cli", *embed_args(env, backend)], cwd=REPO,
                          env=env["vars"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    m = re.search(r"(\d+) prompts: (\d+) cached, (\d+) computed", done.stdout)
    return tuple(int(x) for x in m.groups())


def interrupted_count(stderr: str, name: str) -> int:
    m = re.search(rf"interrupted by {name}: (\d+) prompts embedded and committed by this run", stderr)
    assert m, stderr[-2000:]
    return int(m.group(1))


# -- stage 1 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,ignore_sigint", [("SIGINT", False), ("SIGTERM", False), ("SIGINT", True)],
                         ids=["sigint", "sigterm", "sigint-inherited-as-ignored"])
def test_a_signal_during_embed_stops_after_the_batch_and_a_rerun_computes_only_the_rest(env, name, ignore_sigint):
    # Commits of 8 rows (2 batches): the signal comes once one is committed, maybe with rows pending.
    proc = start(embed_args(env), {**env["vars"], "SEMST_COMMIT_ROWS": "8"}, ignore_sigint=ignore_sigint)
    wait_for_parts(env["cache"], 1, proc)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT[name], err[-2000:]
    assert "Traceback" not in err and "run the same command again" in err
    kept = committed_rows(env["cache"])
    assert interrupted_count(err, name) == kept > 0
    assert cache_verifies(env["cache"])
    prompts, cached, computed = rerun_counts(env)
    assert (cached, computed) == (kept, prompts - kept) and computed > 0


def test_a_first_sigint_lets_the_batch_in_progress_finish_and_commit(env):
    proc = start(embed_args(env), {**env["vars"], "SEMST_TEST_SLOW": "batch:3:4"}, script=SLOW_CLI)
    wait_for_line(proc.stderr, "slow step: batch 3", proc)
    proc.send_signal(signal.SIGINT)
    err = wait_for_line(proc.stderr, "stopping after the current batch", proc) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert committed_rows(env["cache"]) == 12 == interrupted_count(err, "SIGINT")  # batches 1-3 of 4
    assert cache_verifies(env["cache"])


def test_a_second_sigint_stops_at_once_without_committing_the_batch_in_progress(env):
    proc = start(embed_args(env), {**env["vars"], "SEMST_TEST_SLOW": "batch:3:600"}, script=SLOW_CLI)
    wait_for_line(proc.stderr, "slow step: batch 3", proc)
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc.stderr, "stopping after the current batch", proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]  # the batch waits 600 s: only an immediate stop ends in time
    assert proc.returncode == 130, err[-2000:]
    assert committed_rows(env["cache"]) == 8 == interrupted_count(err, "SIGINT")  # batches 1-2
    assert cache_verifies(env["cache"])
    prompts, cached, computed = rerun_counts(env)
    assert (cached, computed) == (8, prompts - 8)


def test_a_signal_during_a_commit_waits_for_the_commit(env, monkeypatch):
    """Two SIGINTs inside cache.add: the batch is committed whole, then the command stops."""
    from semst.embed.run import embed_dataset
    from semst.shared.config import load_embed_config

    original = EmbeddingCache.add

    def add_hit_by_signals(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, in the middle of the commit
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingCache, "add", add_hit_by_signals)
    monkeypatch.setenv("SEMST_DATA_PATH", str(env["data"]))
    monkeypatch.setenv("SEMST_COMMIT_ROWS", "4")  # a commit per batch: the first commit is hit
    cfg = load_embed_config("big", {"cache": str(env["cache"]), "model": env["model"], "backend": "transformers",
                                    "k_genes": 8, "batch_size": 4})
    with pytest.raises(interrupt.Interrupted) as stop, interrupt.stop_on_signals():
        embed_dataset(cfg, progress=False, log=lambda *a: None)
    assert stop.value.exit_code == 130 and "4 prompts embedded and committed" in stop.value.message()
    assert committed_rows(env["cache"]) == 4 and EmbeddingCache(env["cache"], create=False).verify() == []


@pytest.mark.slow
def test_sigint_during_a_vllm_embed_stops_after_the_batch(env):
    """The default backend, vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    proc = start(embed_args(env, "vllm"), {**env["vars"], "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                            "SEMST_COMMIT_ROWS": "8"})  # commits before the run ends
    wait_for_parts(env["cache"], 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    kept = committed_rows(env["cache"])
    assert interrupted_count(err, "SIGINT") == kept > 0 and cache_verifies(env["cache"])
    prompts, cached, computed = rerun_counts(env, "vllm")
    assert (cached, computed) == (kept, prompts - kept)


# -- stage 2 ----------------------------------------------------------------------------------------

@pytest.fixture
def grid(tmp_path):
    """An 80-spot two-domain slide 'grid' with a config that trains (almost) forever."""
    data = tmp_path / "data"
    data.mkdir()
    two_domain_slide().write_h5ad(data / "grid.h5ad")
    toml = tmp_path / "grid.toml"
    toml.write_text("[preprocess]\nmin_cells = 1\n[cluster]\nradius = 1.5\nexpr_k = 5\nepochs = 1000000\n"
                    "hidden1 = 16\nhidden2 = 8\n")
    return {"toml": toml, "out": tmp_path / "results",
            "vars": {**os.environ, "SEMST_DATA_PATH": str(data), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}}


def cluster_args(grid, *extra):
    return ["cluster", "grid", "--config", str(grid["toml"]), "--fusion", "none", "--out", str(grid["out"]),
            "--run-name", "r", *extra]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_training_exits_130_or_143_and_writes_nothing(grid, name):
    proc = start(cluster_args(grid), grid["vars"])
    wait_for_line(proc.stdout, "expression graph", proc)  # logged just before training starts
    time.sleep(0.5)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT[name], err[-2000:]
    assert f"interrupted by {name}" in err and "Traceback" not in err
    assert [p for p in files_under(grid["out"]) if not Path(grid["out"], p).is_dir()] == []


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_while_outputs_are_written_leaves_no_temp_folder_and_the_old_run_intact(grid, name):
    old = grid["out"] / "grid" / "r"
    old.mkdir(parents=True)
    (old / "metrics.json").write_text("{\"an\": \"earlier run\"}")
    (old / "config.toml").write_text("")  # with metrics.json: a run folder semst wrote, so it may be replaced
    proc = start(cluster_args(grid, "--epochs", "2"), {**grid["vars"], "SEMST_TEST_SLOW": "outputs:600"},
                 script=SLOW_CLI)
    wait_for_line(proc.stderr, "slow step: outputs", proc)
    assert any(p.name.startswith(".tmp-r-") for p in old.parent.iterdir())  # mid-write
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT[name], err[-2000:]
    assert f"interrupted by {name}" in err and "Traceback" not in err
    assert files_under(grid["out"]) == ["grid", "grid/r", "grid/r/config.toml", "grid/r/metrics.json"]
    assert (old / "metrics.json").read_text() == "{\"an\": \"earlier run\"}"


# -- the handlers themselves ------------------------------------------------------------------------

def test_sigterm_becomes_interrupted_with_exit_code_143_and_the_handlers_are_put_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(interrupt.Interrupted) as stop, interrupt.stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert stop.value.exit_code == 143
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_at_step_boundaries_a_first_signal_waits_for_the_check_and_a_second_stops_at_once():
    steps = []
    with pytest.raises(interrupt.Interrupted), interrupt.stop_on_signals(), interrupt.at_boundaries():
        for step in range(3):
            steps.append(step)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            steps.append(f"{step} done")
            interrupt.check()
    assert steps == [0, "0 done"]
    with pytest.raises(interrupt.Interrupted), interrupt.stop_on_signals(), interrupt.at_boundaries():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        steps.append("first signal waits")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        steps.append("never")
    assert steps[-1] == "first signal waits"


def test_a_signal_while_stopping_lets_the_clean_up_finish_and_a_third_one_would_end_the_process():
    cleaned = []
    with pytest.raises(interrupt.Interrupted), interrupt.stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # during the clean-up
            time.sleep(0.05)
            cleaned.append(signal.getsignal(signal.SIGINT))
    assert cleaned == [signal.SIG_DFL]
