"""Experience replay with FedAvg: each client keeps exemplars of the classes it has seen.

Two budgets: ``memory_per_class`` exemplars per seen class per client, or (PyCIL's fixed total,
``fixed_memory=false``) ``memory_total`` exemplars over the whole federation: each client keeps
``memory_total // num_clients``, shared evenly by the classes seen so far, so the memory per class
shrinks as classes arrive and the total never exceeds the budget. Exemplars are picked at random
(seeded per client and task) from the client's own data of each task, so a client never holds more
than it saw; with non-IID data a client may hold fewer of a class. The memory stores row indices,
not images: the data set arrays already live in the worker.
"""
import numpy as np

from fedcl.methods.base import ClientRound, Method


class Replay(Method):
    def __init__(self, name: str = "replay", memory_per_class: int = 20, memory_total: int | None = None):
        super().__init__(name)
        if memory_per_class < 0 or (memory_total is not None and memory_total < 0):
            raise ValueError(f"method.memory_per_class={memory_per_class} and method.memory_total={memory_total} "
                             "must be >= 0")
        self.memory_per_class = int(memory_per_class)
        self.memory_total = None if memory_total is None else int(memory_total)
        self.num_clients = 1

    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        self.num_clients = int(cfg.num_clients)

    def per_class(self, ctx: ClientRound) -> int:
        """Exemplars kept per old class this round."""
        if self.memory_total is None:
            return self.memory_per_class
        return self.memory_total // self.num_clients // max(1, ctx.first_class)

    def training_rows(self, ctx: ClientRound, state: dict) -> np.ndarray:
        memory: dict = state.setdefault("memory", {})
        for t in range(ctx.task):
            if t not in memory:  # client first trains after task t: draw its exemplar order for t now
                memory[t] = self.exemplar_order(ctx, t)
        keep = self.per_class(ctx)
        old = [np.sort(np.concatenate([rows[:keep] for rows in memory[t].values()] or [np.empty(0, np.int64)]))
               for t in range(ctx.task)]
        return np.concatenate([ctx.task_rows(ctx.task), *old]).astype(np.int64)

    def exemplar_order(self, ctx: ClientRound, task: int) -> dict[int, np.ndarray]:
        """Per class of the task: the client's rows in a seeded random order (exemplars are a prefix)."""
        rows = ctx.task_rows(task)
        labels = ctx.labels(rows).cpu().numpy() if len(rows) else np.empty(0, np.int64)
        rng = np.random.default_rng([ctx.seed, ctx.client, task, 7919])
        cap = None if self.memory_total is not None else self.memory_per_class
        return {int(c): rng.permutation(rows[labels == c])[:cap] for c in np.unique(labels)}
