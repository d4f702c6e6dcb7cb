"""Ctrl-C and SIGTERM: a semst command stops when asked, cleanly, and never in the middle of a commit.

The CLI turns SIGINT and SIGTERM into an :class:`Interrupted` exception (:func:`stop_on_signals`),
so every ``finally`` and ``except BaseException`` clean-up runs (the temporary folders of atomic
writes, file locks) and the command exits 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM.

Two kinds of region refine when the exception is raised:

- :func:`at_boundaries`: a loop whose steps are worth finishing (an embedding batch, committed to
  the cache at its end). A first signal is only recorded, and :func:`check` raises it at the next
  step boundary; a second signal raises at once.
- :func:`critical`: a few lines that must not be cut (a cache commit). Every signal waits until the
  region ends.

Once :class:`Interrupted` is raised, one more signal does not cut the clean-up short; it only
restores the default action, so a third one ends the process at once (SIGKILL-like: whatever was
committed stays valid). Without :func:`stop_on_signals` (semst used as a library) nothing here
changes Python's own handling: Ctrl-C raises KeyboardInterrupt where it lands.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The user asked the command to stop (SIGINT or SIGTERM). A KeyboardInterrupt, so no
    ``except Exception`` swallows it; ``detail`` says what was kept, for the one-line message."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted by {name}: " + (self.detail or "stopped; nothing half-written was kept, "
                                             "run the same command again")


class _State:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.installed = False
        self.requests = 0  # signals received since install
        self.first: int | None = None  # the signal that asked first: its exit code is the command's
        self.boundaries = 0  # depth of at_boundaries() regions
        self.critical = 0  # depth of critical() regions
        self.raised = False


_state = _State()


def _say(text: str) -> None:
    # os.write, not print: the handler may run while the main thread is inside a write to stderr
    # (tqdm's bar), and a buffered stream refuses a re-entrant write.
    try:
        os.write(2, f"\n{text}\n".encode())
    except OSError:
        pass


def _stop_now() -> bool:
    return _state.requests >= 2 or (_state.requests >= 1 and not _state.boundaries)


def _raise() -> None:
    _state.raised = True
    raise Interrupted(_state.first)


def _on_signal(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _state.raised:
        # Already unwinding: let the clean-up finish; the next signal ends the process at once.
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        _say(f"{name}: already stopping (cleaning up); send it again to end at once")
        return
    _state.requests += 1
    if _state.first is None:
        _state.first = signum
    if not _state.critical and _stop_now():
        _raise()
    if _state.requests == 1 and _state.boundaries:
        _say(f"{name}: stopping after the current batch (its rows are committed); "
             f"send {name} again to stop at once")
    else:
        _say(f"{name}: stopping as soon as the current commit is complete")


def check() -> None:
    """At a step boundary of an :func:`at_boundaries` region: raise if a stop was asked for."""
    if _state.installed and _state.requests and not _state.raised:
        _raise()


def stop_requested() -> bool:
    """Whether a stop signal was received and not yet raised (e.g. to tell a failure it caused)."""
    return _state.installed and bool(_state.requests) and not _state.raised


@contextlib.contextmanager
def at_boundaries() -> Iterator[None]:
    """A loop whose steps end in :func:`check`: a first signal waits for it, a second stops at once."""
    _state.boundaries += 1
    try:
        yield
    finally:
        _state.boundaries -= 1
    check()  # a signal after the last step's check still stops the command


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Lines no signal may cut (a commit): a signal received inside takes effect when they end."""
    _state.critical += 1
    try:
        yield
    finally:
        _state.critical -= 1
    if _state.installed and not _state.critical and not _state.raised and _stop_now():
        _raise()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` inside the block (main thread only).

    SIGINT is handled even where it was inherited as ignored (a job started with ``&`` from a
    script): every semst command is safe to stop, so a ``kill -INT`` must never be dropped."""
    if threading.current_thread() is not threading.main_thread() or _state.installed:
        yield
        return
    previous = _handlers()
    _state.reset()
    _state.installed = True
    for sig in HANDLED:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        _restore(previous)
        _state.reset()


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Around a library call that installs its own SIGINT / SIGTERM handlers (``ray.init``'s SIGTERM
    handler exits wherever it lands, even inside a cache commit): the ones in effect before are put
    back when the block ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _handlers()
    try:
        yield
    finally:
        _restore(previous)


def _handlers() -> dict:
    return {sig: signal.getsignal(sig) for sig in HANDLED}


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
