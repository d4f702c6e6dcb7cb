"""Other tools' spatial-domain methods, each in its own environment (see :mod:`.adapter`); importing
this package registers them as methods of :mod:`semst.cluster.methods`."""
from semst.experiments.peers import adapter  # noqa: F401 - registers graphst, banksy, spagcn, stdcl, cellcharter
