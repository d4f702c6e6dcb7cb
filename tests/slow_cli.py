"""The semst CLI with one step made to wait, so a test can send a signal at a known moment.

``python tests/slow_cli.py embed ...`` runs ``semst embed ...`` and so on. ``SEMST_TEST_SLOW`` says
which step waits, announcing itself on stderr first (``slow step: ...``):

- ``batch:N:SECONDS``  the N-th embedding batch (1-based) waits SECONDS before it is computed;
- ``outputs:SECONDS``  stage 2 waits SECONDS inside its output folder, after the first files are
  written and before the figures.

Only the test-suite uses this; the waits are plain ``time.sleep`` calls, which a signal interrupts
like any computation.
"""
from __future__ import annotations

import os
import sys
import time


def _announce(what: str) -> None:
    print(f"slow step: {what}", file=sys.stderr, flush=True)


def _slow_batch(n: int, seconds: float) -> None:
    from semst.embed import backends

    original = backends._TokenizingBackend.embed
    calls = [0]

    def embed(self, prompts):
        calls[0] += 1
        if calls[0] == n:
            _announce(f"batch {n}")
            time.sleep(seconds)
        return original(self, prompts)

    backends._TokenizingBackend.embed = embed


def _slow_outputs(seconds: float) -> None:
    from semst.cluster import plots

    original = plots.plot_domain_maps

    def plot_domain_maps(path, *args, **kwargs):
        _announce(f"outputs in {path.parent}")
        time.sleep(seconds)
        return original(path, *args, **kwargs)

    plots.plot_domain_maps = plot_domain_maps


def main() -> None:
    kind, *values = os.environ["SEMST_TEST_SLOW"].split(":")
    if kind == "batch":
        _slow_batch(int(values[0]), float(values[1]))
    elif kind == "outputs":
        _slow_outputs(float(values[0]))
    else:
        raise SystemExit(f"SEMST_TEST_SLOW: unknown step {kind!r}")
    from semst.experiments.cli import main as cli

    cli(prog_name="semst")


if __name__ == "__main__":
    main()
