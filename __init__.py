"""semst: spatial domains in spatial transcriptomics, steered by what an LLM makes of each spot's top genes.

The repository root is this package: ``embed/``, ``cluster/``, ``shared/`` and ``experiments/``
are ``semst.embed``, ``semst.cluster``, ``semst.shared`` and ``semst.experiments``.

The Python API works on AnnData, registered dataset or not::

    import semst
    llm = semst.encode(adata)        # stage 1: fills the cache, adata.obsm["X_semst_llm"]
    summary = semst.domains(adata)   # stage 2: adata.obs["semst_domain"], adata.obsm["X_semst"]

Imports are lazy, so ``import semst`` costs nothing until a stage runs.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["encode", "domains", "gr", "__version__"]


def __getattr__(name: str):
    if name in ("encode", "domains"):
        from semst.experiments import api

        return getattr(api, name)
    if name == "gr":  # semst.gr.spatial_graph: spatial graphs in squidpy's layout
        from semst.experiments import gr

        return gr
    raise AttributeError(f"module 'semst' has no attribute {name!r}")
