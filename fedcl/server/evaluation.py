"""Central evaluation of the global model: accuracy per seen task, class-incremental."""
from __future__ import annotations

import numpy as np
import torch

EVAL_ROWS = 512  # a multiple of predict's batch size: the same batches, so the same predictions, as at once


def evaluate_tasks(exp, model: torch.nn.Module, task: int) -> tuple[list[float], float]:
    """Accuracy on each seen task's test classes, and on all seen test samples together.

    Prediction is class-incremental: argmax over every class seen so far, no task id given, on a
    shuffled mix of all seen tasks' samples (so no batch holds a single task).
    """
    seen = exp.scenario.seen_classes(task)
    rows = np.concatenate(exp.scenario.test_indices[: task + 1])
    mix = np.random.default_rng([int(exp.cfg.seed), 3, task]).permutation(len(rows))
    preds = np.empty(len(rows), dtype=np.int64)
    device = next(model.parameters()).device
    for i in range(0, len(rows), EVAL_ROWS):  # a chunk at a time: all test images at 224 px would not fit
        part = mix[i:i + EVAL_ROWS]
        preds[part] = exp.method.predict(model, exp.test_images(rows[part], device), seen).cpu().numpy()
    correct = preds == exp.scenario.y_test[rows]
    per_task, start = [], 0
    for t in range(task + 1):
        n = len(exp.scenario.test_indices[t])
        per_task.append(float(correct[start:start + n].mean()) if n else 0.0)
        start += n
    return per_task, float(correct.mean())
