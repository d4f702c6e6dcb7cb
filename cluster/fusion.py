"""Fusions: how each spot's semantic vector joins the two GCN views, one class per fusion.

A fusion is an ``nn.Module`` built from the width of the views it modulates (``width``: Z_gcn,
both views side by side) and of the projected semantic vector (``sem_width``); ``output_width`` is
what the MLP W after it reads. Registered by name (``@register_fusion``), it is what
``ClusterConfig.fusion``, ``semst cluster --fusion``, SemST and the STAGATE backbone look up, so a new
fusion is one class here (or in the user's own module) and its test.

Statistics a fusion reports (e.g. how far the FSM moved its input from the identity) come from the
last forward pass as additive parts (``stat_parts``), so mini-batch training, which runs the fusion
block by block, sums the parts over blocks and turns the sums into the slide's statistics
(``stats_from_parts``); full batch reads ``stats()`` of its one forward.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from semst.shared.errors import ConfigError

FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(cls: type[Fusion]) -> type[Fusion]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    FUSIONS[cls.name] = cls
    return cls


class UnknownFusionError(ConfigError):
    """A fusion name that no class is registered under (a ConfigError: a config or --fusion names it)."""


def fusion_class(name: str) -> type[Fusion]:
    try:
        return FUSIONS[name]
    except KeyError:
        raise UnknownFusionError(f"unknown fusion {name!r}; known: {', '.join(FUSIONS)}") from None


class Fusion(nn.Module):
    """Base class: joins Z_gcn (spots x ``width``) with the projected semantic vectors (spots x
    ``sem_width``). Subclasses set ``name``, ``output_width`` and implement ``forward``."""

    name: ClassVar[str] = ""
    uses_semantic: ClassVar[bool] = True  # False: the network has no semantic projection at all

    def __init__(self, width: int, sem_width: int, **settings):
        super().__init__()
        self.output_width = width

    def forward(self, z: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def history_keys(self) -> tuple[str, ...]:
        """Statistics recorded every epoch (keys of ``stats()``)."""
        return ()

    def stat_parts(self) -> tuple[float, ...]:
        """Additive parts of the last forward's statistics (summed over blocks in mini-batch mode)."""
        return ()

    def stats_from_parts(self, parts) -> dict[str, float]:
        return {}

    def stats(self) -> dict[str, float]:
        """The last forward's statistics."""
        return self.stats_from_parts(self.stat_parts())


@register_fusion
class NoFusion(Fusion):
    """SemST without the LLM: Z_gcn as it is."""

    name = "none"
    uses_semantic = False

    def forward(self, z, s=None):
        return z


@register_fusion
class ConcatFusion(Fusion):
    """[Z_gcn, s]: the semantic vector appended to the views."""

    name = "concat"

    def __init__(self, width: int, sem_width: int, **settings):
        super().__init__(width, sem_width)
        self.output_width = width + sem_width

    def forward(self, z, s):
        return torch.cat([z, s], dim=1)


@register_fusion
class AddFusion(Fusion):
    """Z_gcn + L(s), L linear to Z_gcn's width."""

    name = "add"

    def __init__(self, width: int, sem_width: int, **settings):
        super().__init__(width, sem_width)
        self.shift = nn.Linear(sem_width, width)

    def forward(self, z, s):
        return z + self.shift(s)


def fsm_modulate(z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Feature-wise linear modulation: ``(1 + alpha) * z + beta`` (alpha = beta = 0 is the identity)."""
    return (1.0 + alpha) * z + beta


def film_stats(change_squares: float, input_squares: float, gate=None) -> dict[str, float]:
    """The FSM's relative change ||FSM(z) - z|| / ||z|| (and its gate), from the two squared norms."""
    change = (change_squares / max(input_squares, 1e-24)) ** 0.5
    return {"film_change": change, **({"film_gate": float(gate.detach())} if gate is not None else {})}


FSM_MODES = ("paper", "zero-init", "gated")


@register_fusion
class FSM(Fusion):
    """Fine-grained Semantic Modulation (FiLM): per-spot alpha and beta from the semantic vector.

    ``fsm_mode``: "paper" = the published FSM, ``(1 + alpha) z + beta``; "zero-init" = the same with
    its last layer zero-initialised, so the network starts as fusion "none" and the modulation only
    grows where the gradient finds use for it; "gated" = ``z + g (alpha z + beta)`` with one learned
    scalar gate g starting at 0 (weight decay pulls it back to 0), reported per run. After every
    forward pass ``squares`` holds ||FSM(z) - z||^2 and ||z||^2, from which ``stats()`` gives the
    relative change (and the gate).
    """

    name = "film"

    def __init__(self, width: int, sem_width: int, *, fsm_hidden_ratio: float = 1.2, dropout: float = 0.0,
                 fsm_mode: str = "paper", **settings):
        super().__init__(width, sem_width)
        if fsm_mode not in FSM_MODES:
            raise ValueError(f"FSM mode must be one of {', '.join(FSM_MODES)}, got {fsm_mode!r}")
        self.mode = fsm_mode
        hidden = max(1, int(sem_width * fsm_hidden_ratio))
        self.mlp = nn.Sequential(nn.Linear(sem_width, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 2 * width))
        if fsm_mode == "zero-init":
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        self.gate = nn.Parameter(torch.zeros(1)) if fsm_mode == "gated" else None
        self.squares = (0.0, 0.0)

    def forward(self, z, s):
        alpha, beta = torch.chunk(self.mlp(s), 2, dim=1)
        if self.gate is None:
            out = fsm_modulate(z, alpha, beta)
        else:
            out = z + self.gate * (alpha * z + beta)
        with torch.no_grad():
            self.squares = (float(torch.sum((out - z) ** 2)), float(torch.sum(z * z)))
        return out

    def history_keys(self) -> tuple[str, ...]:
        if self.mode == "paper":
            return ()
        return ("film_change", "film_gate") if self.gate is not None else ("film_change",)

    def stat_parts(self) -> tuple[float, ...]:
        return self.squares

    def stats_from_parts(self, parts) -> dict[str, float]:
        return film_stats(*parts, self.gate)


@register_fusion
class CrossAttentionFusion(Fusion):
    """Z_gcn attends over the semantic vector, both cut into ``tokens`` equal chunks.

    With one semantic vector per spot there is no sequence to attend over, so each spot's projected
    embedding is split into ``tokens`` chunks (keys/values) and Z_gcn into as many chunks (queries);
    the attended chunks are added back to Z_gcn (residual), then W follows as for the FSM.
    """

    name = "cross-attention"

    def __init__(self, width: int, sem_width: int, tokens: int = 4, heads: int = 2, **settings):
        super().__init__(width, sem_width)
        if width % tokens or sem_width % tokens:
            raise ValueError(f"widths {width}, {sem_width} must be divisible by {tokens} tokens")
        self.tokens = tokens
        d = width // tokens
        self.kv = nn.Linear(sem_width // tokens, d)
        self.attn = nn.MultiheadAttention(d, num_heads=heads if d % heads == 0 else 1, batch_first=True)

    def forward(self, z, s):
        n = z.shape[0]
        q = z.reshape(n, self.tokens, -1)
        kv = self.kv(s.reshape(n, self.tokens, -1))
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return z + out.reshape(n, -1)
