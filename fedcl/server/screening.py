"""Screening of client replies before aggregation: one bad update must never reach the global state.

A reply is rejected, with its reason, when an array is not finite, when its keys or shapes differ
from what the round's other replies and the global state agree on, or when its update norm is far
above the round's median (``strategy.max_norm_ratio``). What passes is then combined by the method,
with the run's aggregation rule (``aggregator=``: median, trimmed mean, Krum) against bad updates
that look plausible.

What each array is comes from its method (``Method.array_role``): every array is checked for finite
values and its layout; only updates (and head rows) count in the update norm. A release (a basis, a
covariance, class statistics) updates nothing the server holds, and its size follows the client's
data (a covariance sums over the client's rows): comparing it with other clients' would reject
honest clients with much data. A basis may be as wide as its client's data needs.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from fedcl.methods.base import BASIS, RELEASES, UPDATE

Reply = tuple[int, dict[str, np.ndarray], int]  # (client, arrays, num_examples)
Rejection = tuple[int, str, str]                # (client, kind, reason)


def screen(replies: list[Reply], global_arrays: dict[str, np.ndarray], max_norm_ratio: float,
           role: Callable[[str], str] = lambda key: UPDATE,
           small_rounds: bool = True) -> tuple[list[Reply], list[Rejection]]:
    """Split replies into accepted ones and rejections ``(client, kind, reason)``.

    ``role(key)`` is the role the method declares for an array (``fedcl.methods.base.role_of``).
    ``small_rounds=False`` skips the norm check of rounds with fewer than 3 replies: under
    client-level DP an honest update is mostly noise and its norm says nothing against the global
    arrays'.
    """
    def varies(key):  # its last dimension may differ between honest clients
        return role(key) == BASIS

    ok, rejected = [], []
    for client, arrays, n in replies:
        problem = _not_finite(arrays)
        if problem:
            rejected.append((client, *problem))
        else:
            ok.append((client, arrays, n))
    fits = []
    for client, arrays, n in ok:  # first against the global state, which no client can outvote
        problem = _unlike_global(arrays, global_arrays, varies)
        if problem:
            rejected.append((client, "shape", problem))
        else:
            fits.append((client, arrays, n))
    if not fits:
        return fits, sorted(rejected, key=lambda r: r[0])
    expected = dict(Counter(_layout(arrays, varies) for _, arrays, _ in fits).most_common(1)[0][0])
    kept = []
    for client, arrays, n in fits:  # then against the round's majority (arrays the server lacks)
        problem = _wrong_layout(arrays, expected, varies)
        if problem:
            rejected.append((client, "shape", problem))
        else:
            kept.append((client, arrays, n))
    updates = {client: {k: v for k, v in arrays.items() if role(k) not in RELEASES} for client, arrays, _ in kept}
    norms = {client: update_norm(arrays, global_arrays) for client, arrays in updates.items()}
    if len(kept) >= 3:  # the round's median says what a normal update norm is
        median = float(np.median(list(norms.values())))
        references = {c: (median, "round median") for c in norms}
    elif small_rounds:  # too few to vote: the norm of the global arrays they update
        references = {c: (global_norm(arrays, global_arrays), "global arrays' norm") for c, arrays in updates.items()}
    else:
        references = {c: (0.0, "") for c in norms}
    huge = {c for c, v in norms.items() if references[c][0] > 0 and v > max_norm_ratio * references[c][0]}
    rejected += [(c, "norm", f"update norm {norms[c]:.3g} > {max_norm_ratio:g} x {references[c][1]} "
                             f"{references[c][0]:.3g}") for c in sorted(huge)]
    kept = [r for r in kept if r[0] not in huge]
    return kept, sorted(rejected, key=lambda r: r[0])


def update_norm(arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of the update: the difference to the global array where one of the same shape
    exists, else the array itself (head rows)."""
    total = 0.0
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        ref = global_arrays.get(key)
        v = value.astype(np.float64)
        if ref is not None and ref.shape == value.shape:
            v = v - ref
        total += float(np.sum(v * v))
    return total ** 0.5


def global_norm(arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of the global arrays a reply updates (same key, same shape)."""
    total = 0.0
    for key, value in arrays.items():
        ref = global_arrays.get(key)
        if ref is not None and ref.shape == value.shape and np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum(ref.astype(np.float64) ** 2))
    return total ** 0.5


def _not_finite(arrays: dict[str, np.ndarray]) -> tuple[str, str] | None:
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            kind = "nan" if np.isnan(value).any() else "inf"
            return kind, f"{key} has {kind} values"
    return None


def _layout(arrays, varies) -> tuple:
    """Keys with shapes (the last dimension left out where it may vary) and dtypes."""
    return tuple(sorted((k, (v.shape[:-1] if varies(k) else v.shape, str(v.dtype))) for k, v in arrays.items()))


def _unlike_global(arrays, global_arrays, varies) -> str | None:
    for key, value in arrays.items():
        ref = global_arrays.get(key)
        if ref is not None and not varies(key) and ref.shape != value.shape:
            return f"{key} has shape {value.shape}, the global array has {ref.shape}"
    return None


def _wrong_layout(arrays, expected, varies) -> str | None:
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        return f"keys differ from the round's other replies (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, value in arrays.items():
        shape, dtype = expected[key]
        got = value.shape[:-1] if varies(key) else value.shape
        if got != shape or str(value.dtype) != dtype:
            return f"{key} has shape {value.shape} {value.dtype}, expected {shape} {dtype}"
    return None
