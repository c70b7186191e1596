"""How the server combines client updates: one object per rule, passed explicitly to aggregation
and applied by the server around a method's ``aggregate`` (``applied``), so a weighted mean that
does not name a rule uses the run's.

A rule sees every client's whole update (a dict of named arrays) and its weight, so both
coordinate-wise rules (mean, median, trimmed mean) and whole-update rules (Krum, which picks the
update closest to its neighbours) fit the same interface. Methods call ``rule.combine`` wherever
they average client arrays (FedAvg, head rows, LoRA factors); subspace merges are not averages and
do not use it. Robust rules ignore the weights: a Byzantine client could inflate its example count.
Chosen with ``aggregator=<name>`` (``conf/aggregator/``, Hydra ``_target_``).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import numpy as np

Update = dict[str, np.ndarray]
_APPLIED: contextvars.ContextVar = contextvars.ContextVar("fedcl_aggregation_rule", default=None)


def current_rule() -> "AggregationRule":
    """The rule the server applies to the aggregation in progress (``applied``), else the mean."""
    return _APPLIED.get() or MEAN


@contextlib.contextmanager
def applied(rule: "AggregationRule"):
    """While the server runs a method's aggregation: every weighted mean that names no rule uses ``rule``."""
    token = _APPLIED.set(rule)
    try:
        yield rule
    finally:
        _APPLIED.reset(token)


class AggregationRule:
    """Combine client updates; subclasses override ``combine`` (whole updates) or ``reduce`` (per array)."""

    name = "rule"

    def problem(self, updates_per_round: int) -> str | None:
        """What is wrong with this rule's settings for rounds of ``updates_per_round`` updates, in
        words (checked before a run starts); None if nothing."""
        return None

    def combine(self, updates: list[Update], weights) -> Update:
        if not updates:
            raise ValueError(f"{self.name}: nothing to combine")
        w = np.asarray(weights, dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError(f"{self.name}: the weights (example counts) sum to {w.sum()}")
        return {key: _cast(self.reduce(np.stack([u[key] for u in updates]).astype(np.float64), w / w.sum()),
                           first.dtype)
                for key, first in updates[0].items()}

    def reduce(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Mean(AggregationRule):
    """FedAvg: the mean weighted by example counts, summed in float64 in the callers' (client) order."""

    name = "mean"

    def combine(self, updates, weights):
        if not updates:
            raise ValueError("mean: nothing to combine")
        w = np.asarray(weights, dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError(f"mean: the weights (example counts) sum to {w.sum()}")
        w = w / w.sum()
        out = {}
        for key, first in updates[0].items():  # accumulate: no (clients x array) stack in memory
            acc = np.zeros(first.shape, dtype=np.float64)
            for u, wk in zip(updates, w):
                acc += u[key].astype(np.float64) * wk
            out[key] = _cast(acc, first.dtype)
        return out


@dataclass(frozen=True)
class Median(AggregationRule):
    """Coordinate-wise median."""

    name = "median"

    def reduce(self, stack, weights):
        return np.median(stack, axis=0)


@dataclass(frozen=True)
class TrimmedMean(AggregationRule):
    """Coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest values."""

    trim_fraction: float = 0.1
    name = "trimmed_mean"

    def __post_init__(self):
        if not 0.0 <= float(self.trim_fraction) < 0.5:
            raise ValueError(f"aggregator.trim_fraction={self.trim_fraction} must be in [0, 0.5)")

    def reduce(self, stack, weights):
        k = int(np.floor(self.trim_fraction * len(stack)))
        if len(stack) - 2 * k < 1:
            k = (len(stack) - 1) // 2
        return np.sort(stack, axis=0)[k:len(stack) - k].mean(axis=0)


@dataclass(frozen=True)
class Krum(AggregationRule):
    """Krum (Blanchard et al., NeurIPS 2017): the update whose ``n - f - 2`` nearest other updates are
    closest (sum of squared L2 distances over all arrays together); ``multi > 1`` averages the
    ``multi`` best-scored updates (Multi-Krum). ``byzantine`` is f, the attackers tolerated."""

    byzantine: int = 1
    multi: int = 1
    name = "krum"

    def problem(self, updates_per_round: int) -> str | None:
        n, f = int(updates_per_round), int(self.byzantine)
        if f < 0 or int(self.multi) < 1:
            return f"aggregator.byzantine={f} must be >= 0 and aggregator.multi={self.multi} >= 1."
        if n > 2 * f + 2:
            return None
        fix = (f"lower aggregator.byzantine to at most {(n - 3) // 2}, or " if n >= 3 else "")
        return (f"aggregator=krum with aggregator.byzantine={f}: Krum tolerates f attackers only among more than "
                f"2f + 2 = {2 * f + 2} updates per round (Blanchard et al., 2017), but a round samples {n} clients; "
                f"with fewer it picks an update without any guarantee. To fix it, {fix}sample more clients per "
                "round (num_clients, fraction_train).")

    def combine(self, updates, weights):
        if not updates:
            raise ValueError("krum: nothing to combine")
        n = len(updates)
        keys = [k for k, v in updates[0].items() if np.issubdtype(v.dtype, np.floating)]
        flat = np.stack([np.concatenate([u[k].astype(np.float64).ravel() for k in keys]) if keys else np.zeros(1)
                         for u in updates])
        sq = (flat * flat).sum(1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)
        neighbours = max(1, n - int(self.byzantine) - 2)
        scores = np.array([np.sort(np.delete(dist[i], i))[:neighbours].sum() if n > 1 else 0.0 for i in range(n)])
        best = np.argsort(scores, kind="stable")[:max(1, min(int(self.multi), n))]
        chosen = [updates[i] for i in best]
        if len(chosen) == 1:
            return {k: v.copy() for k, v in chosen[0].items()}
        return Mean().combine(chosen, np.ones(len(chosen)))


def _cast(value: np.ndarray, dtype) -> np.ndarray:
    return (np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype)


MEAN = Mean()
