"""Class-incremental scenario: seeded class order, task split, and per-task client partitions.

Labels are re-indexed by the class order, so task t owns the contiguous label range
[task_starts[t], task_starts[t + 1]) and "classes seen after task t" is the first
task_starts[t + 1] labels. Tasks have k classes each, except that a base session (task 0) may
hold ``base_classes`` (the "B50 Inc10" protocols).
Every client keeps its own stream: ``client_indices[t][c]`` are the training rows client c
sees during task t. A task's partition is two arrays (rows grouped by client, and where each
client's group starts), not one array per client: 100,000 clients cost two arrays, not 100,000.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcl.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "shards")


@dataclass
class Scenario:
    class_order: np.ndarray          # original class id at each new label
    y_train: np.ndarray              # re-indexed training labels
    y_test: np.ndarray               # re-indexed test labels
    task_starts: list[int]           # first label of each task, then the number of classes
    num_tasks: int
    client_indices: list[Partition]  # [task][client] -> training row indices
    test_indices: list[np.ndarray]          # [task] -> test row indices

    def seen_classes(self, task: int) -> int:
        """Number of labels known after training ``task`` (labels 0 .. n-1)."""
        return self.task_starts[task + 1]

    def task_of_label(self, labels: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.task_starts, labels, side="right") - 1


def task_starts(num_classes: int, num_tasks: int, base_classes: int | None = None) -> list[int]:
    """First label of each task (and num_classes at the end), after checking the split."""
    check_task_split(num_classes, num_tasks, base_classes)
    if not base_classes:
        k = num_classes // num_tasks
        return [t * k for t in range(num_tasks + 1)]
    k = (num_classes - base_classes) // (num_tasks - 1) if num_tasks > 1 else 0
    return [0] + [base_classes + t * k for t in range(num_tasks)]


def check_task_split(num_classes: int, num_tasks: int, base_classes: int | None = None) -> None:
    """Reject splits that leave tasks of unequal size or empty: say which counts would work."""
    if base_classes:
        rest = num_classes - base_classes
        if not 0 < base_classes < num_classes or num_tasks < 2 or rest % (num_tasks - 1):
            options = [d + 1 for d in range(1, rest + 1) if rest > 0 and rest % d == 0]
            raise ConfigError(
                f"scenario.base_classes={base_classes} with num_tasks={num_tasks} does not split the "
                f"{num_classes} classes into a base task plus equal incremental tasks. base_classes "
                f"must be in [1, {num_classes - 1}]; with it, choose num_tasks from {options}.")
        return
    if num_tasks < 1 or num_tasks > num_classes or num_classes % num_tasks:
        divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        raise ConfigError(
            f"num_tasks={num_tasks} does not split the {num_classes} classes of this data set "
            f"into equal class-incremental tasks. Choose num_tasks from {divisors}."
        )


def build_scenario(y_train: np.ndarray, y_test: np.ndarray, num_classes: int, num_tasks: int,
                   num_clients: int, partition, seed: int, base_classes: int | None = None) -> Scenario:
    """Split classes into tasks (seeded order) and each task's training rows over clients."""
    starts = task_starts(num_classes, num_tasks, base_classes)
    rng = np.random.default_rng([seed, 0])
    class_order = rng.permutation(num_classes)
    new_label = np.empty(num_classes, dtype=np.int64)
    new_label[class_order] = np.arange(num_classes)
    ytr, yte = new_label[y_train], new_label[y_test]
    client_indices, test_indices = [], []
    for t in range(num_tasks):
        lo, hi = starts[t], starts[t + 1]
        rows = np.flatnonzero((ytr >= lo) & (ytr < hi))
        part_rng = np.random.default_rng([seed, 1, t])
        client_indices.append(partition_rows(rows, ytr[rows], num_clients, partition, part_rng))
        test_indices.append(np.flatnonzero((yte >= lo) & (yte < hi)))
    return Scenario(class_order, ytr, yte, starts, num_tasks, client_indices, test_indices)


class Partition:
    """A split of rows over clients: ``part[c]`` is client c's rows, sorted (a view, no copy)."""

    def __init__(self, rows: np.ndarray, owner: np.ndarray, num_clients: int):
        order = np.lexsort((rows, owner))  # by client, then by row
        self.rows = rows[order].astype(np.int64)
        self.starts = np.searchsorted(owner[order], np.arange(num_clients + 1))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, client: int) -> np.ndarray:
        if not -len(self) <= client < len(self):
            raise IndexError(f"client {client} of {len(self)}")
        client %= len(self)
        return self.rows[self.starts[client]:self.starts[client + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)


def partition_rows(rows: np.ndarray, labels: np.ndarray, num_clients: int, partition,
                   rng: np.random.Generator) -> Partition:
    """Split ``rows`` over clients: iid, Dirichlet(alpha) per class, or label-sorted shards. Each
    scheme gives every row its owner in one vectorised step (the same split, drawn from the same
    random numbers, as splitting into one array per client)."""
    name = partition.name
    if name == "iid":
        shuffled = rng.permutation(rows)
        return Partition(shuffled, split_owner(len(rows), num_clients), num_clients)
    if name == "dirichlet":
        alpha = float(partition.alpha)
        if alpha <= 0:
            raise ConfigError(f"partition.alpha={alpha} must be > 0 (smaller = more non-IID).")
        pieces, owners = [], []
        for cls in np.unique(labels):
            cls_rows = rng.permutation(rows[labels == cls])
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(cls_rows)).astype(int)
            pieces.append(cls_rows)
            owners.append(np.searchsorted(cuts, np.arange(len(cls_rows)), side="right"))
        if not pieces:
            return Partition(rows, np.zeros(0, np.int64), num_clients)
        return Partition(np.concatenate(pieces), np.concatenate(owners), num_clients)
    if name == "shards":
        per_client = int(partition.shards_per_client)
        if per_client < 1:
            raise ConfigError(f"partition.shards_per_client={per_client} must be >= 1.")
        order = rows[np.argsort(labels, kind="stable")]
        shard_ids = rng.permutation(num_clients * per_client).reshape(num_clients, per_client)
        owner_of_shard = np.empty(num_clients * per_client, np.int64)
        owner_of_shard[shard_ids] = np.arange(num_clients)[:, None]
        return Partition(order, owner_of_shard[split_owner(len(order), num_clients * per_client)], num_clients)
    raise ConfigError(f"partition={name!r} is unknown. Choose one of {list(PARTITIONS)}.")


def split_owner(length: int, parts: int) -> np.ndarray:
    """The part of each position when ``length`` items are cut as ``np.array_split`` cuts them."""
    size, extra = divmod(length, parts)
    sizes = np.full(parts, size)
    sizes[:extra] += 1
    return np.repeat(np.arange(parts), sizes)
