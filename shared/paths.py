"""Where semst keeps its working files, worked out at call time and never from where the code lives.

Everything semst writes or reads by default sits under one *home* folder: ``$SEMST_HOME`` if set,
else the current directory (the checkout, when run through the Makefile):

- ``data/raw/``                      datasets downloaded by ``semst data`` (searched first)
- ``data/models/``                   the default model, converted once by ``make model``
- ``data/cache/embeddings.zarr``     the default embedding cache (``--cache`` points elsewhere)
- ``../shared/data``                 further datasets (the default of ``SEMST_DATA_PATH``)

So an installed semst (``pip install``, not editable) behaves exactly as the checkout does, from
whatever folder it is run in; only package data (the per-dataset configs and the grids) is found
next to the code.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def home() -> Path:
    """``$SEMST_HOME``, else the current directory (absolute)."""
    return Path(os.environ.get("SEMST_HOME") or os.getcwd()).absolute()


def raw_dir() -> Path:
    return home() / "data" / "raw"


def default_cache() -> Path:
    return home() / "data" / "cache" / "embeddings.zarr"


def default_model_dir() -> Path:
    return home() / "data" / "models" / DEFAULT_MODEL_NAME


def default_external_data() -> Path:
    """The default of ``SEMST_DATA_PATH``: ``../shared/data`` beside the home folder."""
    return home().parent / "shared" / "data"
