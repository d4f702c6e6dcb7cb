"""A stand-in peer for the tests: the adapter contract of experiments/peers/<name>/run.py, run by the
tests' own interpreter (no peer environment is built): the two halves of the slide by x."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "peers"))
import numpy as np  # noqa: E402
import peer_io  # noqa: E402

args = peer_io.arguments()
adata = peer_io.read_slide(args)
x = adata.obsm["spatial"][:, 0]
peer_io.write_outputs(args, (x >= np.median(x)).astype(int), np.column_stack([x, adata.X.toarray().sum(1)]),
                      {"clustering": "median split"})
