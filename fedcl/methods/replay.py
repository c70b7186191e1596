"""Experience replay (ER) with FedAvg, as Mammoth and Avalanche run ER, per client.

Memory: a fixed budget over the federation, ``memory_total`` exemplars (PyCIL's 2,000 by default):
each client keeps ``memory_total // num_clients`` rows of its own earlier tasks, chosen by reservoir
sampling over the stream of rows it has seen (each row of that stream is in the memory with the same
probability, so the memory stays balanced over tasks and classes as far as the client's own data is;
seeded per client and task). The memory stores row indices, not images: the data set arrays already
live in the worker.

Training: every local step pairs a batch of the current task's rows with an equally sized batch
drawn from the memory, one cross-entropy over all classes seen so far on both (``base.fit``).
A task's rows join the memory when the client first trains after that task.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from fedcl.methods.base import ClientRound, Method, fit


def reservoir(held: np.ndarray, seen: int, stream: np.ndarray, capacity: int,
              rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Reservoir sampling (Vitter's algorithm R): ``held`` is a uniform sample of the ``seen`` items
    so far; returns the sample after ``stream`` and the new count."""
    held = held.copy()
    for item in stream:
        if len(held) < capacity:
            held = np.append(held, item)
        else:
            j = int(rng.integers(0, seen + 1))
            if j < capacity:
                held[j] = item
        seen += 1
    return held.astype(np.int64), seen


class Replay(Method):
    def __init__(self, name: str = "replay", memory_total: int = 2000):
        super().__init__(name)
        if memory_total < 0:
            raise ValueError(f"method.memory_total={memory_total} must be >= 0 (exemplars over the federation)")
        self.memory_total = int(memory_total)
        self.num_clients = 1

    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        self.num_clients = int(cfg.num_clients)

    def capacity(self) -> int:
        """Exemplars one client keeps."""
        return self.memory_total // self.num_clients

    def memory(self, ctx: ClientRound, state: dict) -> np.ndarray:
        """This client's exemplar rows of tasks before ``ctx.task`` (filled on first use after a task)."""
        mem = state.setdefault("memory", {"rows": np.empty(0, np.int64), "seen": 0, "tasks": 0})
        while mem["tasks"] < ctx.task:
            t = mem["tasks"]
            rng = np.random.default_rng([ctx.seed, ctx.client, t, 7919])
            mem["rows"], mem["seen"] = reservoir(mem["rows"], mem["seen"], rng.permutation(ctx.task_rows(t)),
                                                 self.capacity(), rng)
            mem["tasks"] = t + 1
        return mem["rows"]

    def client_update(self, model: nn.Module, ctx: ClientRound, state: dict) -> int:
        self.begin_round(model, ctx, state)
        rows, memory = ctx.task_rows(ctx.task), self.memory(ctx, state)
        if len(rows):
            fit(model, rows, ctx, lambda x, logits: self.extra_loss(model, x, logits, ctx, state), memory=memory)
        return int(len(rows))
