"""`semst embed --ray` on a local Ray of two 1-CPU vLLM replicas: the rows of the in-process vLLM run.

Minutes (vLLM starts in each replica): not in `make test`; `make test-ray` runs it. Skipped where Ray
(pip install 'semst[distributed]'), vLLM or the default model is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_embed_distributed import quiet, rows
from toy_slides import write_slide

from semst.embed.run import embed_dataset
from semst.shared.config import load_embed_config

pytest.importorskip("ray.data.llm", reason="Ray is not installed: pip install 'semst[distributed]'")
pytest.importorskip("vllm", reason="vLLM is not installed")
MODEL = Path(__file__).resolve().parents[2] / "data" / "models" / "SmolLM2-135M-Instruct"

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="default model not converted (make model)")]


@pytest.fixture
def slide(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_slide(data / "toy.h5ad", 36)  # a few dozen distinct prompts
    monkeypatch.setenv("SEMST_DATA_PATH", str(data))
    monkeypatch.setattr("semst.shared.paths.raw_dir", lambda: tmp_path / "raw-empty")
    return tmp_path


def cfg(cache: Path, **kw):
    return load_embed_config("toy", {"cache": str(cache), "model": str(MODEL), "backend": "vllm", "k_genes": 8,
                                     "batch_size": 8, "genes_from": "all", **kw})


def test_two_local_replicas_give_the_rows_of_the_in_process_vllm_run(slide):
    on_ray = embed_dataset(cfg(slide / "ray.zarr", ray_address="local", workers=2), progress=False, log=quiet)
    in_process = embed_dataset(cfg(slide / "local.zarr"), progress=False, log=quiet)
    assert on_ray.n_computed == in_process.n_computed == in_process.n_prompts > 24
    assert on_ray.space_id == in_process.space_id and on_ray.tag == in_process.tag
    want, got = rows(slide / "local.zarr"), rows(slide / "ray.zarr")
    assert sorted(got) == sorted(want)
    for h in want:
        np.testing.assert_array_equal(got[h], want[h])  # bit-identical
