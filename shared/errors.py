"""The one base class of semst's expected errors.

Every error that means "bad input or a missing prerequisite" (not a bug) subclasses
:class:`SemstError`, beside the builtin it always had (``ValueError``, ``RuntimeError``, ...) so
callers that catch those still do. The CLI turns a SemstError into ``error: <message>`` and exit 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class SemstError(Exception):
    """An expected failure: its message, one line, says what is wrong and what to do."""


class ConfigError(SemstError, ValueError):
    """A config file or an override that cannot be used; the message says which field and why."""
