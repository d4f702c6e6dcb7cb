"""Stage 2's output folder: a run replaces only a run folder semst wrote, and says so before any work.

`<out>/<dataset>/<run>` is written through a temporary folder that names its owner; the run name is
one folder name; an existing destination is replaced only if it holds semst's marker; temporaries of
killed runs are removed by the next run, those of live ones are not; modes follow the umask.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from toy_slides import two_domain_slide

from semst.cluster.outputs import RUN_MARKER, check_run_name, is_semst_run, prepare_run_folder
from semst.cluster.run import cluster_dataset
from semst.cluster.seeds import ClusterError
from semst.experiments.cli import main
from semst.shared import io
from semst.shared.config import load_cluster_config
from semst.shared.io import OWNER_FILE, atomic_directory, clean_stale_temporaries

SMALL = "[preprocess]\nmin_cells = 1\n[cluster]\nradius = 1.5\nexpr_k = 5\nepochs = 2\nhidden1 = 8\nhidden2 = 4\n"
BAD_NAMES = ["", ".", "..", "/tmp/elsewhere", "a/b", "../mob", ".hidden", ".tmp-x", "a\0b", "tab\there",
             "x" * 256]


def quiet(*a, **k):
    pass


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A 10 x 8 two-domain slide on the search path as 'toy', with a config that trains in a second."""
    data = tmp_path / "data"
    data.mkdir()
    adata = two_domain_slide()
    adata.write_h5ad(data / "toy.h5ad")
    (tmp_path / "toy.toml").write_text(SMALL)
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    cfg = load_cluster_config("toy", {"fusion": "none"}, path=tmp_path / "toy.toml")
    return {"cfg": cfg, "adata": adata, "toml": tmp_path / "toy.toml", "out": tmp_path / "results"}


@pytest.fixture
def no_work(monkeypatch):
    """Any attempt to load the slide (the first piece of work) fails the test."""
    def started(*a, **k):
        raise AssertionError("the run started working before refusing")
    monkeypatch.setattr("semst.cluster.run.load_slide", started)


def run(toy, **kw):
    return cluster_dataset(toy["cfg"], out_dir=kw.pop("out", toy["out"]), adata=toy["adata"], progress=False,
                           log=kw.pop("log", quiet), **kw)


def cli(toy, *args):
    return CliRunner().invoke(main, ["cluster", "toy", "--config", str(toy["toml"]), "--fusion", "none",
                                     "--out", str(toy["out"]), *args])


def earlier_run(folder: Path) -> Path:
    """What an earlier semst run left: the marker, metrics.json, config.toml."""
    folder.mkdir(parents=True)
    (folder / RUN_MARKER).write_text(json.dumps({"semst_version": "0.1.0", "run_name": folder.name}))
    (folder / "metrics.json").write_text("{}")
    (folder / "config.toml").write_text("")
    return folder


def precious(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    return folder


# --- the run name ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_run_name_that_is_not_one_folder_name_is_refused_before_any_work(toy, no_work, name):
    with pytest.raises(ClusterError, match="it must be one folder name"):
        run(toy, run_name=name)


@pytest.mark.parametrize("name", ["film-test", "run 2", "seed=3,k=7", "ärger"])
def test_plain_folder_names_are_run_names(name):
    assert check_run_name(name) == name


def test_run_name_dot_dot_on_the_command_line_is_a_usage_error_and_deletes_nothing(toy):
    other = earlier_run(toy["out"] / "mob" / "film-llm-1234")
    out = cli(toy, "--run-name", "..")
    assert out.exit_code == 2 and "'..' names the current or the parent folder" in out.output
    assert "Traceback" not in out.output and is_semst_run(other)


def test_an_absolute_run_name_on_the_command_line_does_not_touch_that_folder(toy, tmp_path):
    victim = precious(tmp_path / "victim")
    out = cli(toy, "--run-name", str(victim))
    assert out.exit_code == 2 and "contains a path separator" in out.output
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_a_dataset_name_that_is_not_one_folder_name_is_refused(tmp_path):
    with pytest.raises(ClusterError, match="dataset name '../up'"):
        prepare_run_folder(tmp_path, "../up", "run", quiet)


# --- what is at the destination --------------------------------------------------------------------

def test_an_existing_folder_semst_did_not_write_is_refused_before_any_work(toy, no_work):
    mine = precious(toy["out"] / "toy" / "mine")
    with pytest.raises(ClusterError, match=r"mine exists and is not a run folder semst wrote .*pick another run name"):
        run(toy, run_name="mine")
    assert (mine / "thesis.tex").read_text() == "years of work"


def legacy_run(folder: Path, *extra: str) -> Path:
    """A run folder as semst wrote it before the marker existed (its output files, no marker)."""
    folder.mkdir(parents=True)
    for name in ("config.toml", "metrics.json", "domains.parquet", "embedding.npz", "semst.h5ad", "domains.png",
                 "loss.png", *extra):
        (folder / name).write_text("x")
    return folder


def test_a_run_folder_written_before_the_marker_existed_is_still_replaced(toy):
    old = legacy_run(toy["out"] / "toy" / "yesterday")
    report = run(toy, run_name="yesterday")
    assert report.run_dir == old and (old / RUN_MARKER).is_file()


def test_a_folder_with_semsts_file_names_and_a_file_of_its_own_is_not_a_run(toy, no_work):
    legacy_run(toy["out"] / "toy" / "mixed", "thesis.tex")
    with pytest.raises(ClusterError, match="mixed exists and is not a run folder semst wrote"):
        run(toy, run_name="mixed")
    assert (toy["out"] / "toy" / "mixed" / "thesis.tex").exists()


def test_a_file_at_the_destination_is_refused_before_any_work(toy, no_work):
    (toy["out"] / "toy").mkdir(parents=True)
    (toy["out"] / "toy" / "notes").write_text("mine")
    with pytest.raises(ClusterError, match="notes is a file, not a run folder"):
        run(toy, run_name="notes")
    assert (toy["out"] / "toy" / "notes").read_text() == "mine"


def test_a_symlinked_run_folder_is_not_followed_even_if_its_target_looks_like_a_run(toy, tmp_path, no_work):
    target = earlier_run(tmp_path / "elsewhere" / "a-run")
    (toy["out"] / "toy").mkdir(parents=True)
    (toy["out"] / "toy" / "linked").symlink_to(target)
    with pytest.raises(ClusterError, match="linked is a symbolic link"):
        run(toy, run_name="linked")
    assert is_semst_run(target) and (toy["out"] / "toy" / "linked").is_symlink()


def test_an_earlier_run_is_replaced_and_the_new_one_carries_the_marker(toy):
    old = earlier_run(toy["out"] / "toy" / "again")
    (old / "stale.txt").write_text("from the earlier run")
    lines = []
    report = run(toy, run_name="again", log=lines.append)
    assert report.run_dir == old and not (old / "stale.txt").exists()
    marker = json.loads((old / RUN_MARKER).read_text())
    assert marker["run_name"] == "again" and marker["dataset"] == "toy" and marker["semst_version"]
    assert any("holds an earlier run: it will be replaced if this run finishes" in line for line in lines)
    assert [p.name for p in old.parent.iterdir()] == ["again"]  # no temporary left


def test_a_run_folder_of_semst_cluster_holds_the_marker(toy):
    report = run(toy)
    assert is_semst_run(report.run_dir) and report.run_dir.parent == toy["out"] / "toy"


def test_a_folder_turned_into_a_non_run_during_training_is_not_replaced(toy, monkeypatch):
    """The check runs again just before the swap (another process may have put something there)."""
    from semst.cluster import outputs

    dest = toy["out"] / "toy" / "race"
    real_fill = outputs._fill_run_folder

    def fill_then_someone_writes_there(tmp, *a):
        real_fill(tmp, *a)
        precious(dest)
    monkeypatch.setattr(outputs, "_fill_run_folder", fill_then_someone_writes_there)
    with pytest.raises(ClusterError, match="race exists and is not a run folder semst wrote"):
        run(toy, run_name="race")
    assert (dest / "thesis.tex").exists() and sorted(p.name for p in dest.parent.iterdir()) == ["race"]


def test_the_api_checks_the_run_name_and_the_destination_as_the_cli_does(tmp_path, no_work):
    import semst

    with pytest.raises(ClusterError, match="'..' names the current or the parent folder"):
        semst.domains(two_domain_slide(), fusion="none", out_dir=tmp_path, run_name="..", progress=False, log=quiet)
    mine = precious(tmp_path / "toy" / "mine")
    with pytest.raises(ClusterError, match="mine exists and is not a run folder semst wrote"):
        semst.domains(two_domain_slide(), dataset="toy", fusion="none", out_dir=tmp_path, run_name="mine",
                      progress=False, log=quiet)
    assert (mine / "thesis.tex").exists()


def test_the_api_refuses_a_run_name_without_out_dir():
    import semst
    from semst.shared.config import ConfigError

    with pytest.raises(ConfigError, match="only written with out_dir="):
        semst.domains(two_domain_slide(), fusion="none", run_name="mine", progress=False, log=quiet)


# --- --out -----------------------------------------------------------------------------------------

def test_out_pointing_at_a_file_is_refused_before_any_work(toy, no_work, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ClusterError, match=r"the output folder .*file \(--out\) is not a folder"):
        run(toy, out=tmp_path / "file")
    with pytest.raises(ClusterError, match=r"cannot create the output folder .*below/toy: .*file is not a folder"):
        run(toy, out=tmp_path / "file" / "below")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_out_pointing_at_a_file_on_the_command_line_is_exit_2(toy, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = CliRunner().invoke(main, ["cluster", "toy", "--config", str(toy["toml"]), "--fusion", "none",
                                    "--out", str(tmp_path / "file")])
    assert out.exit_code == 2 and "is a file" in out.output and "Traceback" not in out.output


def test_an_unwritable_out_is_refused_before_any_work(toy, no_work, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr("semst.cluster.outputs.tempfile.TemporaryFile", read_only)
    with pytest.raises(ClusterError, match=r"cannot write the output folder .*toy: .*: Read-only file system"):
        run(toy)
    assert not toy["out"].exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_write_failure_is_one_error_naming_the_folder_and_keeps_the_earlier_run(toy, monkeypatch, code):
    import pandas as pd

    old = earlier_run(toy["out"] / "toy" / "kept")

    def fails(self, path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(pd.DataFrame, "to_parquet", fails)
    with pytest.raises(ClusterError, match=rf"could not write the run folder .*kept: {os.strerror(code)} "
                                           rf"\(.*domains.parquet\); nothing there was changed"):
        run(toy, run_name="kept")
    assert is_semst_run(old) and sorted(p.name for p in old.parent.iterdir()) == ["kept"]


# --- temporary folders -----------------------------------------------------------------------------

def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def temporary(parent: Path, name: str, owner: dict | None) -> Path:
    work = parent / f".tmp-{name}-abcd1234"
    (work / "content").mkdir(parents=True)
    if owner is not None:
        (work / OWNER_FILE).write_text(json.dumps({"destination": name, **owner}))
    return work


def test_a_killed_cluster_leaves_no_run_folder_and_the_next_run_removes_its_temporary(toy, tmp_path):
    folder = toy["out"] / "toy"
    script = ("import os, sys\nfrom semst.cluster import outputs\nfill = outputs._fill_run_folder\n"
              "def killed(*a):\n    fill(*a)\n    os._exit(9)  # as if killed while the outputs are written\n"
              "outputs._fill_run_folder = killed\nfrom semst.experiments.cli import main\nmain(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, "cluster", "toy", "--config", str(toy["toml"]), "--fusion",
                           "none", "--out", str(toy["out"]), "--run-name", "killed"], cwd=tmp_path, capture_output=True)
    assert done.returncode == 9, done.stderr[-2000:]
    assert [p.name.startswith(".tmp-killed-") for p in folder.iterdir()] == [True]  # never a run folder
    report = run(toy, run_name="next")
    assert [p.name for p in folder.iterdir()] == ["next"] and report.run_dir == folder / "next"


def test_only_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    host = socket.gethostname()
    dead = temporary(tmp_path, "dead", {"pid": dead_pid(), "host": host})
    live = temporary(tmp_path, "live", {"pid": os.getpid(), "host": host, "start": io._start_ticks(os.getpid())})
    reused = temporary(tmp_path, "reused", {"pid": os.getpid(), "host": host, "start": -1})  # pid reused since
    remote = temporary(tmp_path, "remote", {"pid": dead_pid(), "host": host + "-elsewhere"})
    unknown = temporary(tmp_path, "unknown", None)
    lines = []
    removed = clean_stale_temporaries(tmp_path, lines.append)
    assert sorted(removed) == sorted([dead, reused])
    assert live.is_dir() and remote.is_dir() and unknown.is_dir() and not dead.exists() and not reused.exists()
    assert len(lines) == 1 and ".tmp-remote-abcd1234" in lines[0] and ".tmp-unknown-abcd1234" in lines[0]


def test_a_writer_killed_between_the_two_renames_gets_its_old_version_back(tmp_path):
    work = temporary(tmp_path, "run", {"pid": dead_pid(), "host": socket.gethostname()})
    earlier_run(work / "previous")  # moved aside, the new one not yet in
    clean_stale_temporaries(tmp_path, quiet)
    assert is_semst_run(tmp_path / "run") and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_without_an_atomic_exchange_the_old_version_is_replaced_in_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_renameat2", lambda *a: False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old").write_text("old")
    with atomic_directory(tmp_path / "run") as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and [p.name for p in (tmp_path / "run").iterdir()] == ["new"]


def test_a_failed_second_rename_puts_the_old_version_back(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_renameat2", lambda *a: False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old").write_text("old")
    real_rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, dst)
    monkeypatch.setattr(io.os, "rename", second_fails)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_directory(tmp_path / "run") as tmp:
            (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and (tmp_path / "run" / "old").read_text() == "old"


# --- modes -----------------------------------------------------------------------------------------

@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_a_written_folder_and_its_files_follow_the_umask(tmp_path, umask):
    with atomic_directory(tmp_path / "run") as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "run" / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


# --- space -----------------------------------------------------------------------------------------

def test_a_disk_too_full_for_the_outputs_is_refused_before_training(toy, monkeypatch):
    """HDF5 can crash the process when the disk fills while semst.h5ad is written: check first."""
    import shutil

    old = earlier_run(toy["out"] / "toy" / "kept")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))

    def training(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr("semst.cluster.train.train_semst", training)
    with pytest.raises(ClusterError, match=r"not enough space for the run folder .*kept: it needs about \d+ MB "
                                           r"and .*toy has 0 MB free"):
        run(toy, run_name="kept")
    assert is_semst_run(old) and sorted(p.name for p in old.parent.iterdir()) == ["kept"]
