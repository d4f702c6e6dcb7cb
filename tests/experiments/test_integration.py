"""`semst embed` with the default model (vLLM) on a real slide; skipped where ../shared/data is absent."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from semst.shared.cache import EmbeddingCache
from semst.shared.paths import default_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_semst_embed_with_the_default_model_on_real_spots(shared_data_dir, tmp_path):
    if not (default_model_dir() / "config.json").exists():
        pytest.skip("the default model is not converted yet (make model)")
    cache = tmp_path / "cache.zarr"
    cmd = [sys.executable, "-m", "semst.experiments.cli", "embed", "dlpfc-151673", "--max-spots", "24", "--cache", str(cache)]
    env = {**os.environ, "SEMST_DATA_PATH": str(shared_data_dir)}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "24 prompts: 0 cached, 24 computed" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "24 prompts: 24 cached, 0 computed" in again.stdout
    store = EmbeddingCache(cache, create=False)
    assert store.verify() == []
    (space,) = store.spaces()
    assert (space.model, space.pooling, space.dim) == ("SmolLM2-135M-Instruct", "mean", 576)
    (table,) = store.spot_tables("dlpfc-151673")
    assert table["n_spots"] == 24 and table["k_genes"] == 20
