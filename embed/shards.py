"""`semst embed --shard I/N`: a deterministic slice of the prompts, so hosts that share no lock can fill
one cache between them (each shard into its own store, then `semst cache merge SRC... --into DST`).

A prompt belongs to shard ``int(hash[:16], 16) % N``: a function of the prompt alone, so every host
computes the same partition without talking to the others, whatever its own store already holds, and
the N shards together cover every prompt exactly once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from semst.shared.config import ConfigError


class ShardError(ConfigError):
    """``--shard`` is not I/N with 0 <= I < N; the message says what was given."""


@dataclass(frozen=True)
class Shard:
    index: int  # I, 0-based
    count: int  # N

    def __post_init__(self):
        if self.count < 1:
            raise ShardError(f"--shard I/N needs N >= 1 shards, got {self.index}/{self.count}")
        if not 0 <= self.index < self.count:
            raise ShardError(f"--shard I/N needs 0 <= I < N (I counts from 0), got {self.index}/{self.count}; "
                             f"the shards of {self.count} are 0/{self.count} .. {self.count - 1}/{self.count}")

    def holds(self, prompt_hash: str) -> bool:
        return int(prompt_hash[:16], 16) % self.count == self.index

    def select(self, hashes: list[str]) -> list[str]:
        """The hashes of this shard, in their order."""
        return [h for h in hashes if self.holds(h)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` (e.g. ``0/4``) as a :class:`Shard`; a one-line ShardError otherwise."""
    match = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", text or "")
    if not match:
        raise ShardError(f"--shard must be I/N, e.g. 0/4 for the first of 4 shards; got {text!r}")
    return Shard(int(match[1]), int(match[2]))
