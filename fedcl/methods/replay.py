"""Experience replay with FedAvg: each client keeps ``memory_per_class`` exemplars per seen class.

Exemplars are picked at random (seeded per client and task) from the client's own data of each
task, so a client never holds more than it saw; with non-IID data a client may hold fewer than
``memory_per_class`` of a class. The memory stores row indices, not images: the data set arrays
already live in the worker.
"""
import numpy as np

from fedcl.methods.base import ClientRound, Method


class Replay(Method):
    def __init__(self, name: str = "replay", memory_per_class: int = 20):
        super().__init__(name)
        if memory_per_class < 0:
            raise ValueError(f"method.memory_per_class={memory_per_class} must be >= 0")
        self.memory_per_class = int(memory_per_class)

    def training_rows(self, ctx: ClientRound, state: dict) -> np.ndarray:
        memory: dict = state.setdefault("memory", {})
        for t in range(ctx.task):
            if t not in memory:  # client first trains after task t: fill its memory for t now
                memory[t] = self.select_exemplars(ctx, t)
        old = [memory[t] for t in range(ctx.task)]
        return np.concatenate([ctx.task_rows(ctx.task), *old]).astype(np.int64)

    def select_exemplars(self, ctx: ClientRound, task: int) -> np.ndarray:
        rows = ctx.task_rows(task)
        labels = ctx.labels(rows).cpu().numpy() if len(rows) else np.empty(0, np.int64)
        rng = np.random.default_rng([ctx.seed, ctx.client, task, 7919])
        picked = [rng.permutation(rows[labels == c])[: self.memory_per_class] for c in np.unique(labels)]
        return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
