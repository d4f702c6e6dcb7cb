"""One `semst` package: layered floors, no paths from __file__, and a wheel that works outside the repo."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from toy_slides import SYMBOLS, two_domain_slide

REPO = Path(__file__).resolve().parents[2]
# Each floor may import only the floors below it: shared <- embed, cluster <- experiments.
ALLOWED = {"shared": {"shared"}, "embed": {"shared", "embed"}, "cluster": {"shared", "cluster"},
           "experiments": {"shared", "embed", "cluster", "experiments"}}


def semst_imports(path: Path) -> set[str]:
    """The semst subpackages a module imports (anywhere in it, including inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "semst" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in ALLOWED:  # the pre-package names must not come back
                found.add(f"top-level {parts[0]}")
    return found


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_each_floor_imports_only_the_floors_below_it(floor):
    wrong = {f"{p.relative_to(REPO)}: {sorted(semst_imports(p) - ALLOWED[floor])}"
             for p in sorted((REPO / floor).glob("*.py")) if semst_imports(p) - ALLOWED[floor]}
    assert not wrong


def test_no_library_module_finds_paths_from_its_own_location_except_package_data():
    users = sorted(str(p.relative_to(REPO)) for floor in ALLOWED for p in (REPO / floor).glob("*.py")
                   if "__file__" in p.read_text())
    assert users == ["shared/config.py"]  # the per-dataset configs shipped with the package


@pytest.mark.slow
def test_a_wheel_installed_outside_the_repo_runs_the_cli_and_both_stages(tmp_path):
    from tiny_model import build_tiny_model

    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("semst-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "SEMST_DATA_PATH": str(work / "data")}
    env.pop("SEMST_HOME", None)

    def semst(*args):
        return subprocess.run([sys.executable, "-m", "semst.experiments.cli", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import semst, semst.shared.config as c; "
                            "print(semst.__file__); print(c.CONFIG_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where)  # the installed copy, not the checkout
    assert (target / "bin" / "semst").is_file()
    assert "Stage 1" in semst("--help").stdout + semst("embed", "--help").stdout
    listing = semst("data", "--list")
    assert listing.returncode == 0 and "dlpfc-151673" in listing.stdout

    (work / "data").mkdir()
    two_domain_slide(10, 6, SYMBOLS[:10]).write_h5ad(work / "data" / "toy.h5ad")
    (work / "toy.toml").write_text('[preprocess]\nmin_cells = 1\n[embed]\nk_genes = 5\ngenes_from = "all"\n'
                                   "[cluster]\nspatial_k = 4\nexpr_k = 5\nepochs = 2\nhidden1 = 16\nhidden2 = 8\n")
    model = build_tiny_model(tmp_path / "tiny", arch="llama")
    common = ["--config", "toy.toml", "--model", str(model)]
    embedded = semst("embed", "toy", *common, "--backend", "transformers")
    assert embedded.returncode == 0, embedded.stderr
    clustered = semst("cluster", "toy", *common)
    assert clustered.returncode == 0, clustered.stderr
    # Defaults live under the folder it runs in, not under the installed code.
    assert (work / "data" / "cache" / "embeddings.zarr" / "semst_cache.json").is_file()
    (run,) = (work / "results" / "toy").iterdir()
    assert pd.read_parquet(run / "domains.parquet")["domain"].nunique() == 2
