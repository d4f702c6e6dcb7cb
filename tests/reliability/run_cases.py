"""Every bad input and fault we know of, run as a user would: the exit code, the message, and whether
the cache and the outputs stayed intact. Prints the README's reliability table (markdown).

    .venv/bin/python tests/reliability/run_cases.py [--only WORD] [> table.md]

Each case runs the real CLI in a subprocess, in a scratch home folder with a tiny random LLM
(tests/tiny_model.py, transformers backend) and a cache that already holds a 30-spot cut of mob, and
compares a digest of the cache and of the output folders (other runs, a folder outside them) before
and after. Cases that need a mount (read-only cache, full disk) use a bind mount / tmpfs and are
reported as "skipped" where mounting is not allowed. Not part of `make test`: it takes minutes and
needs ../shared/data; `make reliability` runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
SHARED = REPO.parent / "shared" / "data"


# -- scratch world ------------------------------------------------------------------------------------
@dataclass
class World:
    root: Path
    model: str
    env: dict

    @property
    def cache(self) -> Path:
        return self.root / "cache.zarr"

    @property
    def out(self) -> Path:
        return self.root / "results"

    @property
    def slides(self) -> Path:
        return self.root / "slides"

    @property
    def precious(self) -> Path:
        return self.root / "precious"


def digest(path: Path) -> str:
    """Content digest of a file tree (names, bytes); the cache's lock file is not content."""
    h = hashlib.sha256()
    if not path.exists():
        return "absent"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*")):
        if p.name == ".lock":
            continue
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def semst(world: World, *args, timeout=900, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semst.experiments.cli", *map(str, args)], cwd=world.root,
                          env={**world.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def cut(name: str, n: int, dest: Path, edit: Callable | None = None, source: str = "mob") -> Path:
    import anndata as ad

    a = ad.read_h5ad(SHARED / f"{source}.h5ad")
    a = a[:n].copy() if n is not None else a
    if edit is not None:
        a = edit(a) or a
    path = dest / f"{name}.h5ad"
    a.write_h5ad(path)
    return path


def make_world(root: Path) -> World:
    from tiny_model import build_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(root / "tiny-llm")
    (root / "data").mkdir(exist_ok=True)
    models = REPO / "data" / "models"
    if models.exists() and not (root / "data" / "models").exists():
        (root / "data" / "models").symlink_to(models)
    env = {**os.environ, "SEMST_DATA_PATH": f"{root / 'slides'}{os.pathsep}{SHARED}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    w = World(root, str(model), env)
    w.slides.mkdir(exist_ok=True)
    w.precious.mkdir(exist_ok=True)
    (w.precious / "notes.txt").write_text("a user's own file: semst must never touch it\n")
    cut("mob30", 30, w.slides)
    done = semst(w, "embed", "mob30", *embed_opts(w))
    if done.returncode:
        raise SystemExit(f"could not build the base cache:\n{done.stderr}")
    done = semst(w, "cluster", "mob30", *cluster_opts(w), "--run-name", "earlier-run")
    if done.returncode:  # the output cases then have no earlier run to protect; say so
        print(f"warning: no base run ({first_line(done.stderr)})", file=sys.stderr)
    return w


def embed_opts(w: World, **kw) -> list[str]:
    opts = {"--cache": w.cache, "--model": w.model, "--backend": "transformers", "--k-genes": 5,
            "--batch-size": 8, **kw}
    return [str(x) for k, v in opts.items() if v is not None for x in (k, v)]


def cluster_opts(w: World, **kw) -> list[str]:
    opts = {"--cache": w.cache, "--model": w.model, "--k-genes": 5, "--out": w.out, "--epochs": 2, "--threads": 1, **kw}
    return [str(x) for k, v in opts.items() if v is not None for x in (k, v)]


# -- cases --------------------------------------------------------------------------------------------
@dataclass
class Case:
    group: str
    what: str
    run: Callable[[World, Path], subprocess.CompletedProcess | tuple]  # (world, scratch) -> result
    expect: str = "refused"  # "refused": non-zero, nothing changed; "runs": exit 0; "detected": corruption
    cache: Callable[[World, Path], Path] | None = None  # which cache to watch (default the world's)
    command: str = ""
    says: str = ""  # words the message must hold (case-insensitive; "a|b": either), e.g. the field named


@dataclass
class Outcome:
    case: Case
    rc: int | str
    message: str
    cache_ok: str
    outputs_ok: str
    seconds: float
    extra: dict = field(default_factory=dict)
    full: str = ""  # the whole error output, which the message column shortens


def first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "problem:", "interrupted", "Error:"))]
    line = (errors or lines[-1:] or [""])[0]
    if "Traceback" in text:
        line = "TRACEBACK: " + (lines[-1] if lines else "")
    return line.replace("|", "\\|")[:150]


def slide_case(name: str, edit, stage: str, what: str, n: int = 30, source: str = "mob", expect="refused",
               extra: tuple = ()) -> Case:
    def run(w: World, tmp: Path):
        cut(name, n, w.slides, edit, source)
        opts = embed_opts(w) if stage == "embed" else cluster_opts(w, **{"--fusion": "none"})
        return semst(w, stage, name, *opts, *extra)
    return Case("slide", what, run, expect, command=f"semst {stage} {name}" + (" " + " ".join(extra) if extra else ""))


def option_case(stage: str, args: list[str], what: str, expect="refused", dataset="mob30", group="option", **kw) -> Case:
    def run(w: World, tmp: Path):
        opts = embed_opts(w, **kw) if stage == "embed" else cluster_opts(w, **kw)
        return semst(w, stage, dataset, *opts, *args)
    shown = " ".join([*args, *[f"{k} {v}" for k, v in kw.items() if v is not None]])
    return Case(group, what, run, expect, command=f"semst {stage} {dataset} {shown}".strip())


def config_case(text: str, what: str, stage: str = "cluster") -> Case:
    def run(w: World, tmp: Path):
        path = tmp / "bad.toml"
        path.write_text(text)
        opts = embed_opts(w) if stage == "embed" else cluster_opts(w)
        return semst(w, stage, "mob30", *opts, "--config", path)
    return Case("config", what, run, command=f"semst {stage} mob30 --config bad.toml  # {text.strip()!r}")


def corrupt_case(what: str, damage: Callable[[Path], None], verify_expect: str = "detected",
                 cluster_expect: str = "refused") -> list[Case]:
    """The same damage, seen by `cache verify` and by `semst cluster` (which must not use it)."""
    def copy(w: World, tmp: Path) -> Path:
        dest = tmp / "cache.zarr"
        if not dest.exists():
            shutil.copytree(w.cache, dest)
            damage(dest)
        return dest

    def verify(w: World, tmp: Path):
        return semst(w, "cache", "verify", "--cache", copy(w, tmp))

    def cluster(w: World, tmp: Path):
        return semst(w, "cluster", "mob30", *cluster_opts(w, **{"--cache": copy(w, tmp)}))

    return [Case("corruption", f"{what}: verify", verify, verify_expect, copy, "semst cache verify"),
            Case("corruption", f"{what}: cluster", cluster, cluster_expect, copy, "semst cluster mob30")]


def vector_chunks(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("spaces/*/vectors/c/**/*") if p.is_file())


def _zero_block(cache: Path):
    chunk = vector_chunks(cache)[0]
    data = bytearray(chunk.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2048] = bytes(min(2048, len(data) - mid))
    chunk.write_bytes(bytes(data))


def _bit_flip(seed: int):
    def flip(cache: Path):
        chunk = vector_chunks(cache)[0]
        data = bytearray(chunk.read_bytes())
        rng = np.random.default_rng(seed)
        pos = int(rng.integers(0, len(data)))
        data[pos] ^= 1 << int(rng.integers(0, 8))
        chunk.write_bytes(bytes(data))
    return flip


def _truncate(cache: Path):
    chunk = vector_chunks(cache)[0]
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])


def _header(cache: Path):
    chunk = vector_chunks(cache)[0]
    data = bytearray(chunk.read_bytes())
    data[:8] = b"\xff" * 8
    chunk.write_bytes(bytes(data))


def _index_part(cache: Path):
    part = sorted(cache.glob("index/*/part-*.parquet"))[0]
    data = bytearray(part.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    part.write_bytes(bytes(data))


def _index_part_head(cache: Path):
    """Zeros over the first column chunk (the prompt hashes), which every reader reads."""
    part = sorted(cache.glob("index/*/part-*.parquet"))[0]
    data = bytearray(part.read_bytes())
    data[8:72] = bytes(64)
    part.write_bytes(bytes(data))


def _spot_table(cache: Path):
    table = sorted(cache.glob("spot_tables/*/*.parquet"))[0]
    data = bytearray(table.read_bytes())
    mid = len(data) // 3
    data[mid:mid + 32] = b"\x5a" * 32
    table.write_bytes(bytes(data))


def _nan_through_zarr(cache: Path):
    import zarr

    root = zarr.open_group(str(cache), mode="a")
    sid = next(iter(root["spaces"].group_keys()))
    arr = root[f"spaces/{sid}/vectors"]
    arr[3] = np.full(arr.shape[1], np.nan, dtype=arr.dtype)


def _value_through_zarr(cache: Path):
    import zarr

    root = zarr.open_group(str(cache), mode="a")
    sid = next(iter(root["spaces"].group_keys()))
    arr = root[f"spaces/{sid}/vectors"]
    arr[5] = np.asarray(arr[5]) + 1.0  # plausible, finite, wrong


def _missing_chunk(cache: Path):
    vector_chunks(cache)[0].unlink()


def _marker_version(cache: Path):
    (cache / "semst_cache.json").write_text('{"format": "semst-embedding-cache", "version": 99}')


def _run_name_case(name: str, what: str) -> Case:
    def run(w: World, tmp: Path):
        return semst(w, "cluster", "mob30", *cluster_opts(w, **{"--fusion": "none"}), "--run-name", name)
    return Case("outputs", what, run, command=f"semst cluster mob30 --run-name {name!r}")


def _run_name_absolute(w: World, tmp: Path):
    return semst(w, "cluster", "mob30", *cluster_opts(w, **{"--fusion": "none"}), "--run-name", w.precious)


def _run_name_existing_folder(w: World, tmp: Path):
    mine = w.out / "mob30" / "my-notes"
    mine.mkdir(parents=True, exist_ok=True)
    (mine / "keep.txt").write_text("mine")
    return semst(w, "cluster", "mob30", *cluster_opts(w, **{"--fusion": "none"}), "--run-name", "my-notes")


def _run_name_symlink(w: World, tmp: Path):
    link = w.out / "mob30" / "linked"
    if not link.is_symlink():
        link.symlink_to(w.precious, target_is_directory=True)
    return semst(w, "cluster", "mob30", *cluster_opts(w, **{"--fusion": "none"}), "--run-name", "linked")


def _out_is_file(w: World, tmp: Path):
    f = tmp / "out-file"
    f.write_text("x")
    return semst(w, "cluster", "mob30", *cluster_opts(w, **{"--fusion": "none", "--out": f}))


def _stale_tmp(w: World, tmp: Path):
    stale = w.out / "mob30" / ".tmp-old-run-abc123"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "metrics.json").write_text("{}")
    done = semst(w, "cluster", "mob30", *cluster_opts(w, **{"--fusion": "none"}), "--run-name", "after-a-kill")
    return done, {"stale tmp left": stale.exists()}


def _rerun_replaces_own_run(w: World, tmp: Path):
    return semst(w, "cluster", "mob30", *cluster_opts(w, **{"--fusion": "none"}), "--run-name", "earlier-run")


def _mount_ro(w: World, tmp: Path):
    ro = tmp / "ro-cache.zarr"
    shutil.copytree(w.cache, ro)
    if subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode:
        return "skipped: cannot mount here"
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    try:
        cut("mob40", 40, w.slides)
        return semst(w, "embed", "mob40", *embed_opts(w, **{"--cache": ro}))
    finally:
        subprocess.run(["umount", str(ro)])


def _disk_full(w: World, tmp: Path):
    small = tmp / "small"
    small.mkdir()
    # Room for the cache as it is and a few of the new rows' chunks, not for all of them.
    size_kib = sum(p.stat().st_size for p in w.cache.rglob("*") if p.is_file()) // 1024 + 96
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(small)],
                      capture_output=True).returncode:
        return "skipped: cannot mount here"
    try:
        shutil.copytree(w.cache, small / "cache.zarr")
        cut("mob262", 262, w.slides)
        done = semst(w, "embed", "mob262", *embed_opts(w, **{"--cache": small / "cache.zarr"}))
        verify = semst(w, "cache", "verify", "--cache", small / "cache.zarr")
        return done, {"verify after": verify.returncode}
    finally:
        subprocess.run(["umount", str(small)])


def _signal_embed(sig: int):
    def run(w: World, tmp: Path):
        cut("mob262", 262, w.slides)
        cache = tmp / "cache.zarr"
        shutil.copytree(w.cache, cache)
        before = len(list(cache.glob("index/*/part-*.parquet")))
        cmd = [sys.executable, "-m", "semst.experiments.cli", "embed", "mob262", *embed_opts(w, **{"--cache": cache,
                                                                                                    "--batch-size": 4})]
        proc = subprocess.Popen(cmd, cwd=w.root, env=w.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and len(list(cache.glob("index/*/part-*.parquet"))) < before + 2:
            time.sleep(0.05)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(did not stop within 120 s; killed)"
        verify = semst(w, "cache", "verify", "--cache", cache)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err), {"verify after": verify.returncode}
    return run


def _without_ray(w: World, tmp: Path):
    """`--ray` where `import ray` fails (a module named ray that raises, first on the path)."""
    shim = tmp / "no-ray"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    path = os.pathsep.join(x for x in (str(shim), w.env.get("PYTHONPATH", "")) if x)
    return semst(w, "embed", "mob30", *embed_opts(w, **{"--k-genes": 6}), "--ray", env={"PYTHONPATH": path})


def _ray_processes() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "raylet" in line or "ray::" in line
            or "gcs_server" in line]


def _signal_ray_embed(sig: int):
    """`semst embed --ray` (2 local replicas) stopped once some batches are committed; then the same
    command without Ray: it must compute only what the stopped run did not commit."""
    def run(w: World, tmp: Path):
        cut("mob120", 120, w.slides)
        cache = tmp / "cache.zarr"
        shutil.copytree(w.cache, cache)
        before = len(list(cache.glob("index/*/part-*.parquet")))
        cmd = [sys.executable, "-m", "semst.experiments.cli", "embed", "mob120",
               *embed_opts(w, **{"--cache": cache, "--batch-size": 4}), "--ray", "--workers", "2"]
        ray_before = set(_ray_processes())
        proc = subprocess.Popen(cmd, cwd=w.root, env=w.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 1500  # vLLM starts in each replica: minutes
        while time.time() < deadline and len(list(cache.glob("index/*/part-*.parquet"))) < before + 2:
            time.sleep(0.2)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(did not stop within 300 s; killed)"
        time.sleep(10)
        left = sorted(set(_ray_processes()) - ray_before)
        verify = semst(w, "cache", "verify", "--cache", cache)
        rerun = semst(w, "embed", "mob120", *embed_opts(w, **{"--cache": cache}))
        done = [ln for ln in rerun.stdout.splitlines() if " computed (" in ln]
        extra = {"verify after": verify.returncode, "rerun": done[-1].split(" (")[0] if done else first_line(rerun.stderr),
                 "Ray processes left": len(left)}
        for pid in left:  # ours: started by this case's driver
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err), extra
    return run


def _signal_cluster(sig: int):
    def run(w: World, tmp: Path):
        cmd = [sys.executable, "-m", "semst.experiments.cli", "cluster", "mob30",
               *cluster_opts(w, **{"--epochs": 3000, "--fusion": "none"}), "--run-name", "interrupted"]
        proc = subprocess.Popen(cmd, cwd=w.root, env=w.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(25)  # well into training
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(did not stop within 120 s; killed)"
        leftovers = [p.name for p in (w.out / "mob30").iterdir() if p.name.startswith(".tmp-") or p.name == "interrupted"]
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err), {"left in out": leftovers or "nothing"}
    return run


def _concurrent_embeds(w: World, tmp: Path):
    cut("mob120", 120, w.slides)
    cache = tmp / "cache.zarr"
    shutil.copytree(w.cache, cache)
    cmd = [sys.executable, "-m", "semst.experiments.cli", "embed", "mob120", *embed_opts(w, **{"--cache": cache})]
    procs = [subprocess.Popen(cmd, cwd=w.root, env=w.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    verify = semst(w, "cache", "verify", "--cache", cache)
    said = [next((ln for ln in out.splitlines() if " computed" in ln), "?") for out, _ in results]
    rc = max(p.returncode for p in procs)
    return subprocess.CompletedProcess(cmd, rc, "\n".join(said), ""), {"verify after": verify.returncode,
                                                                       "reported": said}


def cases() -> list[Case]:
    def drop_spatial(a):
        del a.obsm["spatial"]

    def nan_coords(a):
        a.obsm["spatial"] = a.obsm["spatial"].astype(float)
        a.obsm["spatial"][0, 0] = np.nan

    def inf_coords(a):
        a.obsm["spatial"] = a.obsm["spatial"].astype(float)
        a.obsm["spatial"][1, 1] = np.inf

    def one_column(a):
        a.obsm["spatial"] = np.asarray(a.obsm["spatial"])[:, :1]

    def three_columns(a):
        c = np.asarray(a.obsm["spatial"], dtype=float)
        a.obsm["spatial"] = np.c_[c, np.zeros(len(c))]

    def dup_obs(a):
        names = list(a.obs_names)
        names[1] = names[0]
        a.obs_names = names

    def dup_var(a):
        names = list(a.var_names)
        names[1] = names[0]
        a.var_names = names

    def set_x(fn):
        def edit(a):
            X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
            a.X = fn(X.astype(np.float32))
        return edit

    def first_genes(n):
        def edit(a):
            order = np.argsort(-np.asarray(a.X.sum(0)).ravel())[:n]
            return a[:, order].copy()
        return edit

    def no_labels(a):
        del a.obs["ground_truth"]

    def strings_as_coords(a):
        a.obsm["spatial"] = np.array([["a", "b"]] * a.n_obs)

    c: list[Case] = [
        # -- datasets and slides ---------------------------------------------------------------------
        option_case("embed", [], "unknown dataset name (embed)", dataset="nosuchdataset", group="slide"),
        option_case("cluster", [], "unknown dataset name (cluster)", dataset="nosuchdataset", group="slide"),
        option_case("embed", [], "dataset name with a path in it", dataset="../etc/passwd", group="slide"),
        Case("slide", "not an h5ad file", lambda w, t: ((w.slides / "garbage.h5ad").write_bytes(b"not hdf5" * 100),
                                                        semst(w, "embed", "garbage", *embed_opts(w)))[1],
             command="semst embed garbage"),
        option_case("embed", [], "normalised values (seqfish-cortex, real)", dataset="seqfish-cortex", group="slide"),
        slide_case("nanx", set_x(lambda X: np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X)), "embed",
                   "NaN in the counts"),
        slide_case("negx", set_x(lambda X: np.where(np.arange(X.size).reshape(X.shape) == 3, -1.0, X)), "embed",
                   "negative counts"),
        slide_case("fracx", set_x(lambda X: X * 0.5 + 0.25), "embed", "non-integer values"),
        slide_case("dupvar", dup_var, "embed", "duplicate gene names"),
        slide_case("dupobs", dup_obs, "embed", "duplicate spot names (embed)"),
        slide_case("dupobs2", dup_obs, "cluster", "duplicate spot names (cluster)"),
        slide_case("nocoords", drop_spatial, "embed", "no obsm['spatial'] (embed)"),
        slide_case("nocoords2", drop_spatial, "cluster", "no obsm['spatial'] (cluster)"),
        slide_case("nancoords", nan_coords, "embed", "NaN coordinate (embed)"),
        slide_case("nancoords2", nan_coords, "cluster", "NaN coordinate (cluster)"),
        slide_case("infcoords", inf_coords, "embed", "infinite coordinate"),
        slide_case("onecol", one_column, "embed", "1-column coordinates"),
        slide_case("threecol", three_columns, "cluster", "3-column coordinates (cluster)"),
        slide_case("threecol2", three_columns, "embed", "3-column coordinates (embed)"),
        slide_case("strcoords", strings_as_coords, "embed", "text as coordinates"),
        slide_case("empty", None, "embed", "a slide with 0 spots", n=0),
        slide_case("onespot", None, "cluster", "a slide with 1 spot", n=1),
        slide_case("twospots", None, "cluster", "a slide with 2 spots", n=2),
        slide_case("onegene", first_genes(1), "embed", "a slide with 1 gene (embed, k_g 5)"),
        slide_case("onegene2", first_genes(1), "cluster", "a slide with 1 gene (w/o LLM: runs)", expect="runs"),
        slide_case("zeros", set_x(lambda X: X * 0), "embed", "all counts zero"),
        slide_case("mine", no_labels, "cluster", "a user's own slide, unregistered, no labels", expect="runs",
                   extra=("--n-domains", "3")),
        slide_case("mine2", None, "cluster", "a user's own slide, unregistered, annotated", expect="runs"),
        # -- options -----------------------------------------------------------------------------------
        option_case("embed", [], "--k-genes 0", **{"--k-genes": 0}),
        option_case("embed", [], "--k-genes larger than the slide's genes", **{"--k-genes": 20000}),
        option_case("embed", [], "--batch-size 0", **{"--batch-size": 0}),
        option_case("embed", ["--max-spots", "0"], "--max-spots 0"),
        option_case("embed", [], "--pooling unknown", **{"--pooling": "max"}),
        option_case("embed", [], "--backend unknown", **{"--backend": "onnx"}),
        option_case("embed", ["--template", "nosuch"], "--template unknown"),
        option_case("embed", [], "--model that does not exist", **{"--model": "/no/such/model"}),
        option_case("embed", ["--recipe", "nosuch"], "--recipe unknown"),
        option_case("embed", ["--gene-ranking", "nosuch"], "--gene-ranking unknown"),
        # -- many machines: --shard I/N, --ray [ADDRESS], --workers -----------------------------------------
        option_case("embed", ["--shard", "2/2"], "--shard I/N with I = N", group="distributed"),
        option_case("embed", ["--shard", "-1/2"], "--shard negative I", group="distributed"),
        option_case("embed", ["--shard", "0/0"], "--shard N = 0", group="distributed"),
        option_case("embed", ["--shard", "half"], "--shard not I/N", group="distributed"),
        option_case("embed", ["--shard", "1/2/3"], "--shard with three numbers", group="distributed"),
        option_case("embed", ["--shard", ""], "--shard empty", group="distributed"),
        option_case("embed", ["--ray", "--workers", "0"], "--workers 0", group="distributed"),
        option_case("embed", ["--ray", "--workers", "-2"], "--workers negative", group="distributed"),
        option_case("embed", ["--workers", "two"], "--workers not an integer", group="distributed"),
        option_case("embed", ["--ray", ""], "--ray with an empty address", group="distributed"),
        Case("distributed", "--ray where Ray is not installed", _without_ray,
             command="semst embed mob30 --k-genes 6 --ray  # import ray fails"),
        option_case("embed", ["--ray", "127.0.0.1:9"], "--ray ADDRESS where no Ray runs",
                    group="distributed", **{"--k-genes": 6}),
        Case("distributed", "--ray before DATASET (taken as the address)",
             lambda w, t: semst(w, "embed", "--ray", "mob30", *embed_opts(w)), command="semst embed --ray mob30"),
        option_case("embed", ["--ray"], "--ray on a cache holding every prompt (no Ray started)", "runs",
                    group="distributed"),
        option_case("embed", ["--shard", "0/1"], "--shard 0/1 (the whole slide) on the filled cache", "runs",
                    group="distributed"),
        Case("distributed", "--shard 0/2 into a new store (no spot table)",
             lambda w, t: semst(w, "embed", "mob30", *embed_opts(w, **{"--cache": t / "shard0.zarr"}), "--shard", "0/2"),
             "runs", cache=lambda w, t: t / "shard0.zarr", command="semst embed mob30 --shard 0/2 --cache new.zarr"),
        config_case("[embed]\nworkers = 0\n", "workers = 0 in the config", stage="embed"),
        config_case("[embed]\nworkers = \"two\"\n", "workers a string in the config", stage="embed"),
        config_case("[embed]\nray_address = \"\"\n", "ray_address empty in the config", stage="embed"),
        Case("distributed", "Ctrl-C (SIGINT) during embed --ray", _signal_ray_embed(signal.SIGINT), "interrupted",
             cache=lambda w, t: t / "cache.zarr", command="semst embed mob120 --ray --workers 2; kill -INT"),
        Case("distributed", "SIGKILL of the driver during embed --ray", _signal_ray_embed(signal.SIGKILL),
             "killed", cache=lambda w, t: t / "cache.zarr", command="semst embed mob120 --ray --workers 2; kill -9"),
        option_case("cluster", ["--seeds", "0,x"], "--seeds not integers"),
        option_case("cluster", ["--seeds", "-1"], "--seeds negative"),
        option_case("cluster", ["--seeds", "0,0"], "--seeds duplicated"),
        option_case("cluster", ["--seeds", ","], "--seeds empty"),
        option_case("cluster", [], "--epochs 0", **{"--epochs": 0}),
        option_case("cluster", [], "--epochs -5", **{"--epochs": -5}),
        option_case("cluster", ["--n-domains", "1"], "--n-domains 1"),
        option_case("cluster", ["--n-domains", "100000"], "--n-domains above the spots"),
        option_case("cluster", ["--n-domains", "auto:9-3"], "--n-domains empty auto range"),
        option_case("cluster", ["--n-domains", "seven"], "--n-domains not a number"),
        option_case("cluster", ["--fusion", "sum"], "--fusion unknown"),
        option_case("cluster", [], "--threads 0", **{"--threads": 0}),
        option_case("cluster", ["--minibatch", "maybe"], "--minibatch unknown"),
        option_case("cluster", ["--minibatch", "on", "--batch-spots", "1"], "--batch-spots 1"),
        option_case("cluster", ["--fsm-mode", "nosuch"], "--fsm-mode unknown"),
        option_case("cluster", ["--embedding", "nosuch-tag"], "--embedding tag not in the cache"),
        option_case("cluster", ["--set", "train.epochs=fast"], "--set a value of the wrong type"),
        option_case("cluster", ["--set", "train.epoch=5"], "--set an unknown field"),
        option_case("cluster", ["--set", "train.expr_k=3"], "--set a field in another section"),
        option_case("cluster", ["--set", "model.fsm_mode=fancy"], "--set a choice not offered"),
        option_case("embed", ["--set", "train.epochs=5"], "embed --set of a cluster section"),
        option_case("cluster", [], "cluster before embed (k_g never embedded)", **{"--k-genes": 7}),
        option_case("cluster", [], "cluster with a cache that does not exist", **{"--cache": "/tmp/semst-no-such.zarr"}),
        # -- config files -------------------------------------------------------------------------------
        option_case("cluster", ["--config", "/no/such/config.toml"], "--config file missing", group="config"),
        config_case("[cluster\nepochs = 5\n", "--config malformed TOML"),
        config_case("[cluster]\nepochs = \"five\"\n", "a string for an integer field"),
        config_case("[cluster]\nlr = \"fast\"\n", "a string for a float field"),
        config_case("[cluster.train]\nlr = \"fast\"\n", "a string for a float field in its section's table"),
        config_case("[cluster.train]\nexpr_k = 9\n", "a key in another section's table"),
        config_case("[cluster]\nepochs = 5\n[cluster.train]\nepochs = 6\n", "a key flat and in its section's table"),
        config_case("[cluster]\nrefine = 1\n", "an integer for a boolean field"),
        config_case("[cluster]\nseeds = [0, \"a\"]\n", "a list with a non-integer seed"),
        config_case("[cluster]\nepoch = 5\n", "an unknown key"),
        config_case("[clusterr]\nepochs = 5\n", "an unknown section"),
        config_case("[embed]\nk_genes = 2.5\n", "a float for an integer field (embed)", stage="embed"),
        config_case("[preprocess]\nmin_cells = -1\n", "a negative min_cells"),
        # -- the spatial graph ([cluster.spatial], semst.cluster.spatial) ------------------------------------
        config_case('[cluster.spatial]\nrule = "delaunay"\n', "an unknown spatial rule"),
        config_case('[cluster.spatial]\nrule = "knn"\n', "a rule without its parameter"),
        config_case('[cluster.spatial]\nrule = "knn"\nk = 6\nradius = 2.0\n', "a parameter of another rule"),
        config_case('[cluster.spatial]\nrule = "knn"\nk = "six"\n', "a string for the rule's k"),
        config_case('[cluster.spatial]\nrule = "knn"\nk = 0\n', "k = 0"),
        config_case('[cluster.spatial]\nrule = "knn"\nk = 500\n', "k above the slide's spots"),
        config_case('[cluster.spatial]\nrule = "radius"\nradius = -1.0\n', "a negative radius"),
        config_case('[cluster.spatial]\nrule = "radius"\nradius = 0.5\n', "a radius that isolates every spot"),
        config_case('[cluster.spatial]\nrule = "radius_spacings"\nspacings = 0\n', "spacings = 0"),
        config_case('[cluster.spatial]\nrule = "knn"\nk = 6\nself_loops = 0\n', "self_loops = 0"),
        config_case('[cluster]\nspatial_k = 6\n[cluster.spatial]\nrule = "knn"\nk = 8\n',
                    "an old key and the table at once"),
        config_case("[cluster]\nspatial = 5\n", "the spatial table not a table"),
        config_case('[cluster]\nspatial_k = "six"\n', "an old key of the wrong type"),
        config_case("[cluster]\nspatial_adaptive_k = 0\n", "an old key with a bad value"),
        config_case('[cluster.spatial]\nrule = "knn"\nk = 6\nallow_dense = "yes"\n', "a string for allow_dense"),
        # -- outputs ------------------------------------------------------------------------------------
        _run_name_case("..", "--run-name .."),
        _run_name_case("../elsewhere", "--run-name ../elsewhere"),
        _run_name_case("a/b", "--run-name with a slash"),
        _run_name_case("", "--run-name empty"),
        _run_name_case(".hidden", "--run-name starting with a dot"),
        Case("outputs", "--run-name an absolute path (a user's folder)", _run_name_absolute,
             command="semst cluster mob30 --run-name /path/to/precious"),
        Case("outputs", "--run-name an existing folder semst did not write", _run_name_existing_folder,
             command="semst cluster mob30 --run-name my-notes"),
        Case("outputs", "--run-name a symlink to a user's folder", _run_name_symlink,
             command="semst cluster mob30 --run-name linked  # -> precious/"),
        Case("outputs", "--out is a file", _out_is_file, command="semst cluster mob30 --out out-file"),
        Case("outputs", "the same run again replaces its own run folder", _rerun_replaces_own_run, "runs",
             command="semst cluster mob30 --run-name earlier-run"),
        Case("outputs", "a killed run's temp folder is cleaned by the next run", _stale_tmp, "runs",
             command="semst cluster mob30  # with .tmp-old-run-* left behind"),
        # -- cache ----------------------------------------------------------------------------------------
        option_case("embed", [], "--cache is a folder of other files", group="cache", **{"--cache": "/work"}),
        Case("cache", "--cache is a file", lambda w, t: ((t / "f").write_text("x"),
                                                          semst(w, "embed", "mob30", *embed_opts(w, **{"--cache": t / "f"})))[1],
             command="semst embed mob30 --cache a-file"),
        Case("cache", "read-only cache (bind mount)", _mount_ro, command="semst embed mob40 --cache ro-mount"),
        Case("cache", "disk full during embed (a tmpfs just larger than the cache)", _disk_full, command="semst embed mob262 --cache tmpfs"),
        Case("cache", "two embeds at once on one cache", _concurrent_embeds, "runs",
             cache=lambda w, t: t / "cache.zarr", command="2 x semst embed mob120"),
        # -- signals --------------------------------------------------------------------------------------
        Case("signal", "Ctrl-C (SIGINT) during embed", _signal_embed(signal.SIGINT), "interrupted",
             cache=lambda w, t: t / "cache.zarr", command="semst embed mob262; kill -INT"),
        Case("signal", "SIGTERM during embed", _signal_embed(signal.SIGTERM), "interrupted",
             cache=lambda w, t: t / "cache.zarr", command="semst embed mob262; kill -TERM"),
        Case("signal", "Ctrl-C (SIGINT) during cluster training", _signal_cluster(signal.SIGINT), "interrupted",
             command="semst cluster mob30 --epochs 3000; kill -INT"),
        Case("signal", "SIGTERM during cluster training", _signal_cluster(signal.SIGTERM), "interrupted",
             command="semst cluster mob30 --epochs 3000; kill -TERM"),
        # -- corruption -----------------------------------------------------------------------------------
        *corrupt_case("2 KiB of zeros in a vectors chunk", _zero_block),
        *[x for s in range(6) for x in corrupt_case(f"one bit flipped in a vectors chunk (seed {s})", _bit_flip(s))],
        *corrupt_case("vectors chunk truncated", _truncate),
        *corrupt_case("vectors chunk header overwritten", _header),
        *corrupt_case("vectors chunk deleted", _missing_chunk),
        *corrupt_case("NaN row written through zarr", _nan_through_zarr),
        *corrupt_case("a finite row changed through zarr", _value_through_zarr),
        *corrupt_case("index part damaged in the prompt hashes", _index_part_head),
        # The middle of a part is the prompt text, which stage 2 never reads (it reads hashes, rows and
        # checksums, each page checked): verify reports it, stage 2 runs on undamaged data.
        *corrupt_case("index part damaged in the prompt text", _index_part, cluster_expect="runs"),
        *corrupt_case("spot table damaged", _spot_table),
        *corrupt_case("cache marker of an unknown version", _marker_version, "refused"),
    ]
    for case in c:
        case.says = case.says or SAYS.get(case.what, "")
    return c


# What each refusal must name (the spec of its message, not its wording).
SAYS = {
    "unknown dataset name (embed)": "unknown dataset", "unknown dataset name (cluster)": "unknown dataset",
    "normalised values (seqfish-cortex, real)": "count", "NaN in the counts": "NaN", "negative counts": "negative",
    "non-integer values": "integer", "duplicate gene names": "gene", "duplicate spot names (embed)": "spot|obs",
    "duplicate spot names (cluster)": "spot|obs", "no obsm['spatial'] (embed)": "spatial|coordinate",
    "no obsm['spatial'] (cluster)": "spatial|coordinate", "NaN coordinate (embed)": "coordinate|spatial",
    "NaN coordinate (cluster)": "coordinate|spatial", "infinite coordinate": "coordinate|spatial",
    "1-column coordinates": "column", "3-column coordinates (cluster)": "column",
    "3-column coordinates (embed)": "column", "a slide with 1 spot": "spot", "a slide with 2 spots": "spot",
    "a slide with 0 spots": "spot", "a slide with 1 gene (embed, k_g 5)": "gene", "--seeds negative": "seed", "--seeds duplicated": "seed|duplicate",
    "--config malformed TOML": "line", "a string for an integer field": "epochs",
    "a string for a float field": "lr", "an integer for a boolean field": "refine",
    "a list with a non-integer seed": "seed", "an unknown key": "epoch", "an unknown section": "clusterr",
    "a float for an integer field (embed)": "k_genes", "--run-name ..": "run name|run-name",
    "--run-name ../elsewhere": "run name|run-name", "--run-name with a slash": "run name|run-name",
    "--run-name empty": "run name|run-name", "--run-name starting with a dot": "run name|run-name",
    "--run-name an absolute path (a user's folder)": "run name|run-name",
    "--run-name an existing folder semst did not write": "not a run folder semst wrote",
    "--out is a file": "out", "read-only cache (bind mount)": "read-only",
    "disk full during embed (a tmpfs just larger than the cache)": "disk|space", "--k-genes larger than the slide's genes": "k",
    "cluster before embed (k_g never embedded)": "--cache",
    "an unknown spatial rule": "delaunay", "a rule without its parameter": "needs k",
    "a parameter of another rule": "radius", "a string for the rule's k": "k must be an integer",
    "k = 0": "k must be >= 1", "k above the slide's spots": "k = 500", "a negative radius": "radius must be > 0",
    "a radius that isolates every spot": "without any spatial neighbour", "spacings = 0": "spacings must be > 0",
    "self_loops = 0": "self_loops", "an old key and the table at once": "spatial_k and the [cluster.spatial]",
    "the spatial table not a table": "spatial", "an old key of the wrong type": "spatial_k",
    "an old key with a bad value": "k must be >= 1", "a string for allow_dense": "allow_dense",
}


def judge(case: Case, rc, text: str, cache_same: bool, outputs_same: bool, extra: dict) -> tuple[str, str]:
    cache_ok = "yes" if cache_same else "changed"
    outputs_ok = "yes" if outputs_same else "changed"
    if case.expect == "runs":
        cache_ok = "yes" if extra.get("verify after", 0) == 0 else "INVALID"
        outputs_ok = "yes (own run only)" if outputs_same else "CHANGED"
    if case.expect in ("interrupted", "killed"):
        cache_ok = "valid (verify OK)" if extra.get("verify after", 0) == 0 else "INVALID"
    if case.group == "cache" and "verify after" in extra and case.expect == "refused":
        cache_ok = "valid (verify OK)" if extra["verify after"] == 0 else "INVALID"
    return cache_ok, outputs_ok


def run_case(w: World, case: Case) -> Outcome:
    tmp = Path(tempfile.mkdtemp(prefix="case-", dir=w.root))
    watched = case.cache(w, tmp) if case.cache else w.cache
    others = [p for p in (w.out / "mob30").iterdir() if not p.name.startswith(".tmp-")] if (w.out / "mob30").exists() else []
    before_cache = digest(watched)
    protected = [w.precious, *[p for p in others if p.name != "earlier-run" or "earlier-run" not in case.command]]
    before_out = {str(p): digest(p) for p in protected}
    t0 = time.perf_counter()
    result = case.run(w, tmp)
    seconds = time.perf_counter() - t0
    extra = {}
    if isinstance(result, tuple):
        result, extra = result
    if isinstance(result, str):
        return Outcome(case, "-", result, "-", "-", seconds)
    text = (result.stderr or "") + "\n" + (result.stdout or "")
    cache_same = digest(watched) == before_cache
    outputs_same = all(digest(Path(p)) == d for p, d in before_out.items())
    cache_ok, outputs_ok = judge(case, result.returncode, text, cache_same, outputs_same, extra)
    message = first_line(result.stderr if result.returncode else result.stdout)
    if extra:
        message += " [" + "; ".join(f"{k}: {v}" for k, v in extra.items() if k != "verify after") + "]"
        message = message.replace(" []", "")
    return Outcome(case, result.returncode, message, cache_ok, outputs_ok, seconds, extra,
                   result.stderr if result.returncode else result.stdout)


def verdict(o: Outcome) -> str:
    c = o.case
    if o.rc == "-":
        return "skipped"
    traceback = "TRACEBACK" in o.message
    if c.expect == "runs":
        good = o.rc == 0 and "INVALID" not in o.cache_ok and "CHANGED" not in o.outputs_ok
    elif c.expect == "detected":
        good = o.rc == 1 and "problem:" in o.message
    elif c.expect == "interrupted":
        good = o.rc in (130, 143) and "INVALID" not in o.cache_ok
    elif c.expect == "killed":  # SIGKILL: no message, but a valid cache
        good = o.rc == -signal.SIGKILL and "INVALID" not in o.cache_ok
    else:
        good = o.rc not in (0,) and not traceback and o.cache_ok != "changed" and o.outputs_ok != "changed"
    if c.says and not any(word.lower() in o.full.lower() for word in c.says.split("|")):
        good = False  # refused, but not for the reason it should name
    return "ok" if good and not traceback else "FAIL"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None,
                    help="Run only cases whose description contains this word (or one of these, comma-separated).")
    ap.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"needs the real slides in {SHARED}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="semst-reliability-"))
    try:
        world = make_world(root)
        words = [w.lower() for w in (args.only or "").split(",") if w]
        selected = [c for c in cases() if not words or any(w in (c.what + c.group).lower() for w in words)]
        print("| # | kind | what was tried | command | exit | message | cache intact | outputs intact | verdict |")
        print("|---|---|---|---|---|---|---|---|---|")
        failures = 0
        for i, case in enumerate(selected, 1):
            o = run_case(world, case)
            v = verdict(o)
            failures += v == "FAIL"
            print(f"| {i} | {case.group} | {case.what} | `{case.command}` | {o.rc} | {o.message} | {o.cache_ok} | "
                  f"{o.outputs_ok} | {v} |", flush=True)
        print(f"\n{len(selected)} cases, {failures} failed", flush=True)
        return 1 if failures else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"scratch: {root}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
