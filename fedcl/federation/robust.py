"""Robust combination of client arrays (``strategy.robust``) against Byzantine clients.

``median`` (coordinate-wise) and ``trimmed_mean`` (coordinate-wise, dropping the ``trim_fraction``
largest and smallest values per coordinate) replace the weighted mean wherever a method averages
client arrays: FedAvg (``weighted_mean``) and the LoRA factor schemes. They ignore sample counts:
a liar could inflate its count. The server sets the rule for the duration of one ``aggregate``
call, so methods need not know about it. Subspace merges (bases) are not averages and are not
affected: screening (``fedcl.federation.screening``) is their only guard.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import numpy as np

RULES = ("none", "median", "trimmed_mean")


@dataclass(frozen=True)
class RobustRule:
    kind: str
    trim_fraction: float = 0.1

    def combine(self, stack: np.ndarray) -> np.ndarray:
        """Combine a (clients, ...) stack along axis 0."""
        if self.kind == "median":
            return np.median(stack, axis=0)
        k = int(np.floor(self.trim_fraction * len(stack)))
        if len(stack) - 2 * k < 1:
            k = (len(stack) - 1) // 2
        ordered = np.sort(stack, axis=0)
        return ordered[k:len(stack) - k].mean(axis=0)


_RULE: contextvars.ContextVar[RobustRule | None] = contextvars.ContextVar("robust_rule", default=None)


def current_rule() -> RobustRule | None:
    return _RULE.get()


@contextlib.contextmanager
def robust_aggregation(kind: str, trim_fraction: float = 0.1):
    """Within this block, client averages use the rule ``kind`` ("none": plain weighted mean)."""
    if kind not in RULES:
        raise ValueError(f"strategy.robust={kind!r} is unknown. Choose one of {list(RULES)}.")
    token = _RULE.set(None if kind == "none" else RobustRule(kind, float(trim_fraction)))
    try:
        yield
    finally:
        _RULE.reset(token)
