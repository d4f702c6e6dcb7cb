"""Content hashes: the cache keys and identities both stages agree on."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def prompt_hash(text: str) -> str:
    """SHA-256 (hex) of the exact rendered prompt text, UTF-8 encoded: the cache key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the weight files of a local checkpoint (names and contents, sorted).

    Two directories holding the same weights get the same fingerprint wherever they live, so a cache
    can be shared between checkouts; different weights under the same name never collide.
    """
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.gguf) in {model_dir}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def json_hash(obj: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
