"""Continual-learning metrics from an accuracy matrix.

``matrix[t][j]`` is the accuracy on task j's test classes after training task t (None for j > t).
Definitions used (say which, they differ across libraries):
- final average accuracy: mean over tasks of the last row (per-task mean, Mammoth style; not
  sample-weighted over all seen classes as in PyCIL);
- average incremental accuracy: mean over t of the mean of row t's known entries;
- forgetting: Chaudhry et al. 2018, mean over j < T-1 of max_{t<T-1} a_tj - a_(T-1)j
  (PyCIL/Mammoth), not Avalanche's last-after-training minus final;
- backward transfer: Lopez-Paz & Ranzato 2017, mean over j < T-1 of a_(T-1)j - a_jj.
"""
from __future__ import annotations

import numpy as np


def summarize(matrix: list[list[float | None]]) -> dict[str, float]:
    """The four summary metrics; a partial matrix (fewer rows than tasks) uses its last row."""
    if not matrix:
        raise ValueError("accuracy matrix is empty")
    for t, row in enumerate(matrix):
        known = row[: t + 1]
        if len(known) < t + 1 or any(v is None for v in known):
            raise ValueError(f"accuracy matrix row {t} needs a value for every task j <= {t}: {row}")
        if any(not 0.0 <= float(v) <= 1.0 for v in known):
            raise ValueError(f"accuracy matrix row {t} has values outside [0, 1]: {row}")
    last = len(matrix) - 1
    final = [float(v) for v in matrix[last][: last + 1]]
    incremental = [np.mean([float(v) for v in row[: t + 1]]) for t, row in enumerate(matrix)]
    if last == 0:
        forgetting = bwt = 0.0
    else:
        forgetting = float(np.mean([max(float(matrix[t][j]) for t in range(j, last)) - final[j]
                                    for j in range(last)]))
        bwt = float(np.mean([final[j] - float(matrix[j][j]) for j in range(last)]))
    return {"final_average_accuracy": float(np.mean(final)),
            "average_incremental_accuracy": float(np.mean(incremental)),
            "forgetting": forgetting, "backward_transfer": bwt}
