"""Server-side aggregation of client LoRA factors (``strategy.lora_aggregation``).

Clients k send (A_k, B_k) with weights w_k (sample counts). The target is the weighted sum of
their updates, sum_k w_k B_k A_k. How close each scheme gets:

- ``fedit``: mean A and mean B separately (FedIT). Inexact in general: mean(B) @ mean(A) has
  cross terms B_i A_j; exact only when all A_k (or all B_k) are equal.
- ``ffa``: A is frozen and shared (FFA-LoRA), only B is averaged. Exact, because with one A
  the sum factorises: sum_k w_k B_k A = (sum_k w_k B_k) A.
- ``stacked``: form sum_k w_k B_k A_k exactly and re-factorise it to rank r by truncated SVD
  (B = U_r S_r^1/2, A = S_r^1/2 V_r^T). Exact when that sum has rank <= r, otherwise the best
  rank-r approximation (Eckart-Young).

Another aggregation rule (``aggregator=``, see ``fedcl.aggregation.rules``) replaces the weighted
mean: of (A, B) together for ``fedit``, of B for ``ffa``, of the products B_k A_k for ``stacked``.
"""
from __future__ import annotations

import numpy as np

from fedcl.aggregation.rules import AggregationRule, current_rule

AGGREGATIONS = ("fedit", "ffa", "stacked")

Factors = tuple[np.ndarray, np.ndarray]  # (A: r x in, B: out x r), 2-D


def check_scheme(name: str) -> str:
    """``strategy.lora_aggregation`` if it names a scheme; a ConfigError saying the choices if not."""
    from fedcl.errors import ConfigError

    if name not in AGGREGATIONS:
        raise ConfigError(f"strategy.lora_aggregation={name!r} is unknown. Choose one of {list(AGGREGATIONS)}.")
    return name


def aggregate_lora(clients: list[Factors], weights: list[float], scheme: str,
                   rule: AggregationRule | None = None) -> Factors:
    check_scheme(scheme)
    rule = rule or current_rule()  # none named: the one the server applies (``aggregator=``)
    dtype = clients[0][0].dtype
    if scheme == "fedit":
        out = rule.combine([{"A": a, "B": b} for a, b in clients], weights)
        return out["A"].astype(dtype), out["B"].astype(dtype)
    if scheme == "ffa":
        if not all(np.array_equal(clients[0][0], a) for a, _ in clients[1:]):
            raise ValueError("ffa aggregation needs the same frozen A on every client")
        return clients[0][0].copy(), rule.combine([{"B": b} for _, b in clients], weights)["B"].astype(dtype)
    r = clients[0][0].shape[0]
    delta = rule.combine([{"d": b.astype(np.float64) @ a.astype(np.float64)} for a, b in clients], weights)["d"]
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    root = np.sqrt(s[:r])
    return (root[:, None] * vt[:r]).astype(dtype), (u[:, :r] * root[None]).astype(dtype)


def exact_update(clients: list[Factors], weights: list[float]) -> np.ndarray:
    """The reference every scheme is judged against: sum_k w_k B_k A_k (weights normalised)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return sum(wk * (b.astype(np.float64) @ a.astype(np.float64)) for wk, (a, b) in zip(w, clients))
