"""Other tools' spatial-domain methods ("peers") as methods of the experiment layer.

Each peer (GraphST, BANKSY, SpaGCN, stDCL, CellCharter) runs from its own package in its own pinned
virtualenv (``.peers/<name>/`` under semst's home, built by ``make peers``), because their pins
conflict with each other's and with ours. :class:`PeerMethod` plugs such a tool into the per-seed
runner (:func:`semst.cluster.seeds.run_seeds`) like any registered method:

1. once per slide, the checked slide (raw counts, coordinates in ``obsm["spatial"]``, no
   annotation) is written as ``slide.h5ad`` to a temporary folder;
2. per seed, the peer's own script (``experiments/peers/<name>/run.py``) runs under the peer's
   python as ``run.py --h5ad IN --out DIR --seed S --n-domains K --threads T --platform P --technology X``, with
   every thread pool bounded to the run's thread budget (``OMP_NUM_THREADS``, ...);
3. it writes ``labels.npy`` (one domain per spot, in the h5ad's order), ``embedding.npy`` (spots x
   d: what it clustered) and ``info.json`` (which clustering it used); semst takes those labels as
   the seed's domains (no k-means of ours) and records the peer's seconds and peak memory.

A peer that fails (not installed, non-zero exit, wrong output) raises :class:`PeerError` saying
why (the last line of its stderr), which the grid turns into a failed row, never a missing one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from semst.cluster.methods import Method, register_method
from semst.cluster.seeds import ClusterError, Slide
from semst.shared.config import ClusterConfig, ConfigError

PEERS_DIR = ".peers"  # under semst's home: one virtualenv per peer, built by `make peers`
SCRIPTS = Path(__file__).resolve().parent  # experiments/peers/<name>/run.py
# Peers' tutorials set some things by platform: Visium's hexagonal array, ST's square one, imaging (cells).
PLATFORMS = ("visium", "st", "imaging")
_TECHNOLOGIES = {"10x visium": "visium", "visium": "visium", "st": "st"}  # semst's registry -> platform
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


class PeerError(ClusterError):
    """A peer could not run on a slide (not installed, failed, or wrote something unusable)."""


@dataclass
class PeerSettings:
    """A peer's settings (the grid's ``[peer]`` table, or a variant's ``peer = {...}``)."""

    python: str = ""  # its interpreter; "" = .peers/<name>/bin/python under semst's home
    script: str = ""  # its script; "" = the one shipped in experiments/peers/<name>/run.py
    platform: str = "auto"  # "visium", "st", "imaging" (STARmap, osmFISH, ...) or "auto" (the dataset's)
    timeout_seconds: float = 0.0  # per seed; 0 = no limit


@dataclass
class PeerRun:
    """What one peer process left behind."""

    returncode: int
    seconds: float
    peak_gib: float  # the largest resident set of the peer's process tree
    stderr_tail: str  # its last non-empty stderr line ("" if none)
    timed_out: bool = False


@dataclass
class PeerResult:
    """One seed of a peer, as the per-seed runner reads it: ``labels`` are the domains (no k-means)."""

    latent: np.ndarray
    labels: np.ndarray
    history: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # seconds, peak memory, clustering used: into the seed's row


def peers_home() -> Path:
    from semst.shared.paths import home

    return home() / PEERS_DIR


def peer_python(name: str) -> Path:
    return peers_home() / name / "bin" / "python"


def peer_script(name: str) -> Path:
    return SCRIPTS / name / "run.py"


def install_failure(name: str) -> str | None:
    """Why ``make peers`` could not install ``name`` (its status file), or None."""
    status = peers_home() / f"{name}.failed"
    return status.read_text().strip() if status.is_file() else None


def dataset_technology(dataset: str) -> str:
    """The technology semst's registry names for ``dataset`` (e.g. "osmFISH"), "" if unknown: peers whose
    tutorials differ between imaging technologies pick their settings by it."""
    from semst.shared.datasets import DATASETS

    spec = DATASETS.get(dataset)
    return spec.platform if spec is not None else ""


def dataset_platform(dataset: str) -> str | None:
    """"visium", "st" or "imaging" for a dataset semst knows, else None."""
    from semst.shared.datasets import DATASETS

    spec = DATASETS.get(dataset)
    if spec is None:
        return None
    return _TECHNOLOGIES.get(spec.platform.strip().lower(), "imaging")


def thread_environment(threads: int) -> dict[str, str]:
    """The environment of a peer process: ours, with every thread pool bounded to ``threads``."""
    env = dict(os.environ)
    env.update({var: str(threads) for var in _THREAD_VARIABLES})
    env["PYTHONNOUSERSITE"] = "1"  # the peer's venv only, not packages in ~/.local
    env.pop("PYTHONPATH", None)  # never our packages inside a peer's interpreter
    return env


# Runs the peer and writes its peak resident set (KiB) to argv[1]. A process forked from ours starts
# with our (large) peak, which wait4 would report; forked from this small launcher, the peer's is its own.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
try:
    _, status, usage = os.wait4(proc.pid, 0)
except KeyboardInterrupt:
    proc.kill(); raise
proc.returncode = code = os.waitstatus_to_exitcode(status)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(code if code >= 0 else 128 - code)
"""


def run_process(cmd: list[str], env: dict, stderr_path: Path, timeout: float = 0.0) -> PeerRun:
    """Run ``cmd`` to the end (killed after ``timeout`` s if > 0): exit code, wall time, peak memory.

    The peak is the ``ru_maxrss`` that ``wait4`` reports for the peer's process (its largest resident
    set, and that of any process it waited for), measured by a small launcher (``_MEASURE``), so it
    is the peer's own, within the launcher's ~10 MiB, whatever else runs beside it.
    """
    timed_out = threading.Event()
    maxrss = stderr_path.with_name(stderr_path.name + ".maxrss")
    with open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        # its own session: a timeout or Ctrl-C ends the peer and whatever it started, nothing else
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, str(maxrss), *cmd], stdin=subprocess.DEVNULL,
                                stdout=err, stderr=err, env=env, start_new_session=True)

        def kill():
            timed_out.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout, kill) if timeout > 0 else None
        if timer:
            timer.start()
        try:
            proc.wait()
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        seconds = time.perf_counter() - t0
    try:
        peak_gib = int(maxrss.read_text()) / 2**20
    except (OSError, ValueError):  # killed before the launcher could write it
        peak_gib = float("nan")
    return PeerRun(proc.returncode, seconds, peak_gib, last_line(stderr_path), timed_out.is_set())


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _no_message(returncode: int) -> str:
    """What a silent exit says: the launcher exits 128 + N when the peer was killed by signal N."""
    if returncode > 128:
        try:
            name = signal.Signals(returncode - 128).name
        except ValueError:
            return "no message"
        hint = " (e.g. the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}, no message"
    return "no message"


def last_line(path: Path) -> str:
    """The last non-empty line of a text file (what a traceback ends with: the exception)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def read_outputs(out: Path, n_spots: int, what: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(labels, embedding, info) written by a peer, checked: one label and one embedding row per spot."""
    try:
        labels = np.load(out / "labels.npy", allow_pickle=False)
        embedding = np.load(out / "embedding.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PeerError(f"{what}: no readable labels.npy / embedding.npy ({type(exc).__name__}: {exc})") from None
    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PeerError(f"{what}: wrote labels of shape {labels.shape}; one label per spot expected")
    if labels.shape[0] != n_spots:
        raise PeerError(f"{what}: wrote {labels.shape[0]} labels for {n_spots} spots")
    if embedding.ndim != 2 or embedding.shape[0] != n_spots:
        raise PeerError(f"{what}: wrote an embedding of shape {embedding.shape} for {n_spots} spots")
    if not np.issubdtype(labels.dtype, np.integer):
        try:
            labels = np.unique(labels.astype(str), return_inverse=True)[1]
        except ValueError:
            raise PeerError(f"{what}: labels of dtype {labels.dtype} are not domain names") from None
    embedding = embedding.astype(np.float32, copy=False)
    if not np.isfinite(embedding).all():
        raise PeerError(f"{what}: its embedding has non-finite values")
    return labels.astype(np.int64), embedding, info


def write_slide_h5ad(slide: Slide, path: Path) -> None:
    """The checked slide as the peers read it: raw counts, coordinates, no annotation."""
    import anndata as ad
    import scipy.sparse as sp

    a = slide.adata
    x = a.X if sp.issparse(a.X) else np.asarray(a.X)
    out = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs={"spot": np.asarray(a.obs_names, dtype=str)},
                     var={"gene": np.asarray(a.var_names, dtype=str)})
    out.obs_names = np.asarray(a.obs_names, dtype=str)
    out.var_names = np.asarray(a.var_names, dtype=str)
    out.obsm["spatial"] = np.asarray(slide.coords, dtype=np.float64)
    out.write_h5ad(path)


class PeerMethod(Method):
    """A peer tool run by its own script in its own environment (see the module docstring)."""

    peer: ClassVar[str] = ""  # its folder in experiments/peers/ and .peers/
    title: ClassVar[str] = ""  # the tool in words, for the report
    settings_key = "peer"
    settings_class = PeerSettings

    def __init__(self, slide: Slide, settings: PeerSettings | None = None, *, progress: bool = False, log=print):
        super().__init__(slide, settings, progress=progress, log=log)
        s = self.settings
        self.python = Path(s.python) if s.python else peer_python(self.peer)
        self.script = Path(s.script) if s.script else peer_script(self.peer)
        self._check_installed()
        self.platform = s.platform if s.platform != "auto" else dataset_platform(self.cfg.dataset)
        t0 = time.perf_counter()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"semst-peer-{self.peer}-")  # removed with this object
        self.folder = Path(self._tmp.name)
        self.h5ad = self.folder / "slide.h5ad"
        write_slide_h5ad(slide, self.h5ad)
        # A peer with semst's FSM inside (Table 3) reads each spot's semantic vector, one .npy per seed.
        self.semantic = None
        if self.uses_semantic(self.cfg):
            from semst.cluster.methods import SemanticVectors

            self.semantic = SemanticVectors(self.cfg, slide.spot_ids, adata=slide.adata)
        self.fixed_seconds = time.perf_counter() - t0
        log(f"{self.cfg.dataset}: {self.name} ({self.platform}) from {self.python} on {slide.adata.n_obs} spots, "
            f"{slide.n_domains} domains, {slide.threads} thread(s)")

    @classmethod
    def check(cls, cfg: ClusterConfig, settings: Any) -> None:
        if not (isinstance(cfg.n_domains, int) or cfg.n_domains is None):
            raise ConfigError(f"{cls.name} needs a fixed number of domains, got n_domains = {cfg.n_domains!r}")
        if settings.platform not in ("auto", *PLATFORMS):
            raise ConfigError(f"peer platform must be auto, {', '.join(PLATFORMS)}, got {settings.platform!r}")
        if settings.platform == "auto" and dataset_platform(cfg.dataset) is None:
            raise ConfigError(f"{cls.name}: semst does not know the technology of {cfg.dataset!r}; set "
                              f"peer = {{ platform = \"visium\" }} (or \"st\", \"imaging\") in the grid")
        if settings.timeout_seconds < 0:
            raise ConfigError(f"peer timeout_seconds must be >= 0 (0 = no limit), got {settings.timeout_seconds}")

    @classmethod
    def describe(cls, own: dict) -> str:
        return f"{cls.title} (its own package, in .peers/{cls.peer})" + (
            f" ({', '.join(f'{k} = {v}' for k, v in own.items())})" if own else "")

    def _check_installed(self) -> None:
        if not self.python.exists():
            why = install_failure(self.peer)
            raise PeerError(f"{self.name}: not installed ({why})" if why else
                            f"{self.name}: no environment at {self.python}; run `make peers` first")
        if not self.script.is_file():
            raise PeerError(f"{self.name}: its script {self.script} is missing")

    def command(self, seed: int, out: Path) -> list[str]:
        return [str(self.python), str(self.script), "--h5ad", str(self.h5ad), "--out", str(out),
                "--seed", str(seed), "--n-domains", str(self.slide.n_domains),
                "--threads", str(self.slide.threads), "--platform", str(self.platform),
                "--technology", dataset_technology(self.cfg.dataset)]

    def fit(self, seed: int) -> PeerResult:
        out = self.folder / f"seed-{seed}"
        out.mkdir(exist_ok=True)
        what = f"{self.name} on {self.cfg.dataset}, seed {seed}"
        command = self.command(seed, out)
        if self.semantic is not None:
            np.save(out / "semantic.npy", np.asarray(self.semantic.for_seed(seed), dtype=np.float32))
            command += ["--semantic", str(out / "semantic.npy")]
        run = run_process(command, thread_environment(self.slide.threads), out / "stderr.txt",
                          self.settings.timeout_seconds)
        if run.timed_out:
            raise PeerError(f"{what}: stopped after the timeout of {self.settings.timeout_seconds:g} s")
        if run.returncode != 0:
            raise PeerError(f"{what} failed (exit {run.returncode}): {run.stderr_tail or _no_message(run.returncode)}")
        labels, embedding, info = read_outputs(out, self.slide.adata.n_obs, what)
        self.log(f"seed {seed}: {self.name} in {run.seconds:.1f} s, peak {run.peak_gib:.2f} GiB, "
                 f"{len(np.unique(labels))} domains ({info.get('clustering', 'its clustering')})")
        return PeerResult(embedding, labels, report={"peer_seconds": round(run.seconds, 2),
                                                     "peak_gib": round(run.peak_gib, 3),
                                                     "clustering": str(info.get("clustering", ""))})


def peer(name: str, title: str, method: str | None = None, semantic: bool = False) -> type[PeerMethod]:
    """Register the peer in ``experiments/peers/<name>/`` as method ``method`` (default ``name``).

    ``semantic``: its script takes ``--semantic FILE`` (spots x d, semst's semantic vectors in the
    h5ad's order) and modulates its own model with semst's FSM (Table 3); the grid embeds first unless
    the variant's fusion is "none", and ``embedding = "random"`` gives the random-vector control."""
    method = method or name
    cls = type(f"Peer_{method.replace('-', '_')}", (PeerMethod,),
               {"name": method, "peer": name, "title": title, "reads_semantic": semantic,
                "__doc__": f"{title}, run from its own package."})
    return register_method(cls)


GraphST = peer("graphst", "GraphST 1.1.1")
GraphSTFSM = peer("graphst", "GraphST 1.1.1 with semst's FSM", method="graphst-fsm", semantic=True)
BANKSY = peer("banksy", "BANKSY (pybanksy 1.3.5)")
SpaGCN = peer("spagcn", "SpaGCN 1.2.7")
StDCL = peer("stdcl", "stDCL 1.0.1")
CellCharter = peer("cellcharter", "CellCharter")

__all__ = ["PEERS_DIR", "BANKSY", "CellCharter", "GraphST", "GraphSTFSM", "PeerError", "PeerMethod", "PeerResult", "PeerRun",
           "PeerSettings", "SpaGCN", "StDCL", "peer", "read_outputs", "run_process"]
