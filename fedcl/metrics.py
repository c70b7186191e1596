"""Continual-learning metrics from an accuracy matrix.

``matrix[t][j]`` is the accuracy in [0, 1] on task j's test classes after training task t
(None for j > t). Definitions used (libraries differ, so say which):
- final average accuracy: mean over tasks of the last row, i.e. per-task accuracy averaged over
  tasks (Mammoth style), not sample-weighted over all seen classes (as in PyCIL);
- average incremental accuracy: mean over t of the mean of row t's known entries j <= t;
- forgetting: Chaudhry et al. 2018, mean over j < T-1 of max_{t<T-1} a_tj - a_(T-1)j
  (max-based, as in PyCIL/Mammoth), not Avalanche's accuracy-right-after-training minus final;
- backward transfer: Lopez-Paz & Ranzato 2017, mean over j < T-1 of a_(T-1)j - a_jj.
Forgetting and BWT are 0.0 for a single task. A partial matrix (a run stopped early: fewer
rows than tasks) is summarised as if its last row were the final one.
"""
from __future__ import annotations

import numpy as np


def _validated(matrix) -> list[list[float]]:
    """The known entries (row t: j <= t) as floats; ValueError naming the bad row otherwise."""
    if not matrix:
        raise ValueError("accuracy matrix is empty")
    known = []
    for t, row in enumerate(matrix):
        cells = list(row)[: t + 1]
        if len(cells) < t + 1 or any(v is None for v in cells):
            raise ValueError(f"accuracy matrix row {t} needs a value for every task j <= {t}: {row}")
        try:
            values = [float(v) for v in cells]
        except (TypeError, ValueError):
            raise ValueError(f"accuracy matrix row {t} has a non-numeric value: {row}") from None
        if not all(0.0 <= v <= 1.0 for v in values):  # also rejects NaN
            raise ValueError(f"accuracy matrix row {t} has values outside [0, 1]: {row}")
        known.append(values)
    return known


def summarize(matrix: list[list[float | None]]) -> dict[str, float]:
    """The four summary metrics above, as plain floats (fractions, not percent)."""
    a = _validated(matrix)
    last = len(a) - 1
    final = a[last]
    if last == 0:
        forgetting = bwt = 0.0
    else:
        forgetting = float(np.mean([max(a[t][j] for t in range(j, last)) - final[j] for j in range(last)]))
        bwt = float(np.mean([final[j] - a[j][j] for j in range(last)]))
    return {"final_average_accuracy": float(np.mean(final)),
            "average_incremental_accuracy": float(np.mean([np.mean(row) for row in a])),
            "forgetting": forgetting, "backward_transfer": bwt}
