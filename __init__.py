"""semst: spatial domains in spatial transcriptomics, steered by what an LLM makes of each spot's top genes.

The repository root is this package: ``embed/``, ``cluster/``, ``shared/`` and ``experiments/``
are ``semst.embed``, ``semst.cluster``, ``semst.shared`` and ``semst.experiments``.

The Python API works on AnnData, registered dataset or not, shaped like scanpy's::

    import semst
    semst.tl.encode(adata)                      # stage 1: fills the cache, adata.obsm["X_semst_llm"]
    semst.tl.domains(adata)                     # stage 2: adata.obs["semst_domain"], obsm["X_semst"]
    curve = semst.tl.auto_k(adata)              # k by stability on obsm["X_semst"]
    semst.pl.domains(adata)                     # the domains on the tissue, in any matplotlib Axes
    semst.pl.losses(adata); semst.pl.stability(curve)

``semst.encode`` and ``semst.domains`` are ``semst.tl.encode`` and ``semst.tl.domains``. Imports are
lazy, so ``import semst`` costs nothing until a stage runs (and loads neither torch nor matplotlib).
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["gr", "tl", "pl", "encode", "domains", "__version__"]
# imported on first use; gr: spatial graphs in squidpy's layout
_NAMESPACES = {"gr": "semst.experiments.gr", "tl": "semst.experiments.tl", "pl": "semst.experiments.pl"}


def __getattr__(name: str):
    if name in _NAMESPACES:
        import importlib

        return importlib.import_module(_NAMESPACES[name])
    if name in ("encode", "domains"):
        from semst.experiments import tl

        return getattr(tl, name)
    raise AttributeError(f"module 'semst' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
