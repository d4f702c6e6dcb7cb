"""semst.embed.backends: vLLM and transformers compute the same pooled hidden states, prompt by prompt.

Runs on tiny random checkpoints (tests/tiny_model.py) so that vLLM loads in seconds. Each vLLM
engine is loaded once per module and shared by the tests that need it.
"""
from __future__ import annotations

import gc
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_model import HIDDEN, build_tiny_model

from semst.embed.backends import BackendError, load_backend
from semst.embed.prompts import render_prompts

GENE_LISTS = [
    [],
    ["MBP"],
    ["MBP", "PLP1", "GFAP"],
    ["SNAP25", "NRGN", "CALM1", "MT-CO1", "ENC1"],
    ["Gfap", "Aqp4", "Slc1a3", "Sparc", "mt-Nd1", "Rps27a", "Apoe", "Clu"],
    [f"GENE{i}" for i in range(20)],
    ["PCP4", "CARTPT", "NEFH", "VAMP1", "SCGB2A2", "SCGB1D2", "KRT17", "MGP", "FABP4", "HBB"] * 2,
    [f"LOC{1000 + i}" for i in range(60)],
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3", arch="qwen3")


@pytest.fixture(scope="module")
def backends(tiny_model):
    """(backend name, pooling) -> backend on the tiny llama, loaded on first use."""
    loaded = {}

    def get(name: str, pooling: str):
        if (name, pooling) not in loaded:
            loaded[name, pooling] = load_backend(name, str(tiny_model), pooling=pooling, batch_size=3)
        return loaded[name, pooling]

    yield get
    loaded.clear()
    gc.collect()


@pytest.fixture(scope="module")
def prompts(backends):
    return render_prompts(GENE_LISTS, backends("transformers", "mean").tokenizer, "semst")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_vllm_and_transformers_agree_per_prompt(backends, prompts, pooling):
    ours = backends("transformers", pooling).embed(prompts)
    theirs = backends("vllm", pooling).embed(prompts)
    assert cosine(ours, theirs).min() >= 0.9999


@pytest.mark.parametrize("name", ["vllm", "transformers"])
def test_embeddings_are_float32_rows_of_hidden_size(backends, prompts, name):
    out = backends(name, "mean").embed(prompts)
    assert out.dtype == np.float32
    assert out.shape == (len(prompts), HIDDEN)


@pytest.mark.parametrize("name", ["vllm", "transformers"])
def test_embeddings_are_not_normalised(backends, prompts, name):
    norms = np.linalg.norm(backends(name, "mean").embed(prompts), axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)


@pytest.mark.parametrize("name,pooling", [("vllm", "mean"), ("vllm", "last"),
                                          ("transformers", "mean"), ("transformers", "last")])
def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(backends, prompts, name, pooling):
    backend = backends(name, pooling)
    batch = backend.embed(prompts)  # batch_size=3: padded batches of mixed lengths
    for i in (0, 1, len(prompts) - 1):  # shortest, short, longest
        alone = backend.embed([prompts[i]])
        assert cosine(alone, batch[i:i + 1])[0] >= 0.9999


def test_mean_and_last_pooling_differ(backends, prompts):
    mean = backends("transformers", "mean").embed(prompts[:2])
    last = backends("transformers", "last").embed(prompts[:2])
    assert not np.allclose(mean, last)


def test_both_backends_tokenize_identically_without_a_second_bos(backends, prompts):
    vllm, hf = backends("vllm", "mean"), backends("transformers", "mean")
    assert vllm.token_ids(prompts) == hf.token_ids(prompts)
    im_start = hf.tokenizer.convert_tokens_to_ids("<|im_start|>")
    for ids in hf.token_ids(prompts):
        assert ids[0] == im_start and ids[1] != im_start
    assert hf.count_tokens(prompts) == [len(ids) for ids in hf.token_ids(prompts)]


def test_both_backends_report_the_same_space(backends):
    pytest.importorskip("semst.shared.cache")
    spaces = [backends(name, "mean").space() for name in ("vllm", "transformers")]
    assert spaces[0] == spaces[1]
    assert (spaces[0].pooling, spaces[0].dtype, spaces[0].dim) == ("mean", "float32", HIDDEN)


def test_no_prompts_give_an_empty_matrix(backends):
    assert backends("transformers", "mean").embed([]).shape == (0, HIDDEN)


def test_a_prompt_longer_than_max_tokens_is_an_error(tiny_model, prompts):
    backend = load_backend("transformers", str(tiny_model), max_tokens=16)
    with pytest.raises(BackendError, match="max_tokens=16"):
        backend.embed(prompts[:1])


def test_unknown_backend_is_an_error_suggesting_transformers(tiny_model):
    with pytest.raises(BackendError, match="--backend transformers"):
        load_backend("llama.cpp", str(tiny_model))


@pytest.mark.parametrize("option", [{"pooling": "cls"}, {"dtype": "int8"}, {"batch_size": 0}])
def test_bad_options_are_errors(tiny_model, option):
    with pytest.raises(BackendError):
        load_backend("transformers", str(tiny_model), **option)


def test_vllm_not_importable_is_an_error_suggesting_transformers(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(BackendError, match="--backend transformers"):
        load_backend("vllm", str(tiny_model))


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draw_all() -> tuple[float, float, float]:
    import torch

    return random.random(), float(np.random.random()), float(torch.rand(1))


@pytest.fixture(scope="module")
def qwen3_vllm(tiny_qwen3_dir):
    """The Qwen3 vLLM backend, the global random draws after loading it, and the expected draws."""
    seed_all(7)
    backend = load_backend("vllm", str(tiny_qwen3_dir), pooling="mean")
    after_loading = draw_all()
    seed_all(7)
    yield backend, after_loading, draw_all()
    del backend
    gc.collect()


def test_qwen3_vllm_and_transformers_agree(qwen3_vllm, tiny_qwen3_dir):
    hf = load_backend("transformers", str(tiny_qwen3_dir), pooling="mean")
    prompts = render_prompts(GENE_LISTS, hf.tokenizer, "semst")
    assert cosine(hf.embed(prompts), qwen3_vllm[0].embed(prompts)).min() >= 0.9999


def test_loading_vllm_leaves_the_global_random_state_alone(qwen3_vllm):
    _, after_loading, expected = qwen3_vllm
    assert after_loading == expected


def test_loading_vllm_leaves_torchs_thread_control_working(backends):
    import torch

    backends("vllm", "mean")  # vLLM's CPU worker disables torch.set_num_threads process-wide
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_vllm_loads_after_numba_is_imported(tiny_model):
    """scanpy imports numba for preprocessing before stage 1 loads vLLM; that order must work."""
    import subprocess
    import sys

    code = (f"import numba, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
            "from semst.embed.backends import load_backend\n"
            f"b = load_backend('vllm', {str(tiny_model)!r}, batch_size=2)\n"
            "print(b.embed(['hello there']).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 128)"


# -- the registry: a new backend is one class ------------------------------------------------------

class LetterCountBackend:
    """A toy backend: a prompt's vector is how often each of a..d occurs in it."""

    name = "letters"
    poolings = ("count",)
    dtypes = ("float32",)
    tokenizer = None

    @classmethod
    def locate(cls, model: str) -> Path:
        return Path(model)

    @classmethod
    def render(cls, gene_lists, model_dir, template):
        return [" ".join(genes).lower() or "none" for genes in gene_lists]

    @classmethod
    def expected_space(cls, model_dir, cfg):
        from semst.shared.cache import EmbeddingSpace
        return EmbeddingSpace(model="letters", weights="0" * 64, pooling="count", dtype="float32", dim=4)

    @classmethod
    def tag(cls, cfg):
        from semst.shared.cache import embedding_tag
        return embedding_tag(cfg, label="letters")

    @classmethod
    def table_meta(cls, cfg):
        return {"letters": "abcd"}

    def __init__(self, model_dir, pooling, dtype, batch_size, max_tokens):
        self.batches = []

    def space(self):
        return self.expected_space(None, None)

    def embed(self, prompts):
        self.batches.append(len(prompts))
        return np.array([[p.count(c) for c in "abcd"] for p in prompts], dtype=np.float32)

    def count_tokens(self, prompts):
        return [len(p.split()) for p in prompts]


def test_a_backend_registered_by_name_runs_through_stage_1_and_stage_2_reads_it(tmp_path, monkeypatch):
    from toy_slides import two_domain_slide

    from semst.embed import backends
    from semst.embed.run import embed_dataset, spot_gene_lists
    from semst.shared.cache import EmbeddingCache
    from semst.shared.config import EmbedConfig, PreprocessConfig

    monkeypatch.setitem(backends.BACKENDS, "letters", LetterCountBackend)
    slide = two_domain_slide()
    cfg = EmbedConfig(dataset="toy", k_genes=3, genes_from="all", model=str(tmp_path), pooling="count",
                      backend="letters", batch_size=5, cache=str(tmp_path / "emb.zarr"),
                      preprocess=PreprocessConfig(min_cells=1))
    report = embed_dataset(cfg, adata=slide, progress=False, log=lambda *a: None)
    assert report.n_computed == report.n_prompts > 0 and report.tag == LetterCountBackend.tag(cfg)
    vectors, meta = EmbeddingCache(cfg.cache, create=False).vectors_for("toy", report.tag, slide.obs_names)
    prompts = LetterCountBackend.render(spot_gene_lists(cfg, slide), None, "")
    assert np.array_equal(vectors, [[p.count(c) for c in "abcd"] for p in prompts])
    assert meta.extra == {"letters": "abcd"} and meta.space.model == "letters"


def test_load_backend_names_every_registered_backend():
    with pytest.raises(BackendError, match="choose one of auto, vllm, transformers, sentence"):
        load_backend("llama.cpp", "default")


@pytest.mark.parametrize("gpu,chosen", [(True, "vllm"), (False, "transformers")])
def test_auto_is_vllm_with_a_gpu_and_transformers_without(monkeypatch, gpu, chosen):
    import torch

    from semst.embed.backends import resolve_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_backend("auto") == chosen
    assert resolve_backend("vllm") == "vllm" and resolve_backend("transformers") == "transformers"  # as named


def test_auto_on_this_cpu_loads_transformers_with_prefix_reuse(tiny_model, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend = load_backend("auto", str(tiny_model))
    assert backend.name == "transformers" and backend.prefix_reuse
