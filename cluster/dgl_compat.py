"""The one module that imports DGL. Everything else does ``from semst.cluster.dgl_compat import dgl``.

DGL 2.1.0 is the only Linux wheel on PyPI that installs beside torch 2.13; its compiled graphbolt
extension was built for torch <= 2.2 and fails to load, and ``import dgl`` imports graphbolt
eagerly. semst uses none of it (graphs, GraphConv/GATConv and sampling only), so a stub module is
put in its place before the first ``import dgl``. ``dgl.sparse`` and distributed training do not
work either and are not used.
"""
from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("DGLBACKEND", "pytorch")  # otherwise DGL writes ~/.dgl/config.json and says so

GRAPHBOLT = "dgl.graphbolt"


def _stub_graphbolt() -> None:
    if GRAPHBOLT not in sys.modules:
        stub = types.ModuleType(GRAPHBOLT)
        stub.__doc__ = "semst stub: DGL's graphbolt does not load on this torch and is not used"
        stub.__semst_stub__ = True
        sys.modules[GRAPHBOLT] = stub


_stub_graphbolt()
import dgl  # noqa: E402  (must follow the stub)
import dgl.nn.pytorch as dglnn  # noqa: E402

__all__ = ["dgl", "dglnn"]
