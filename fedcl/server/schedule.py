"""The round schedule: which rounds a run has (tasks x a method's phases) and who is asked in each.

The one place that decides it: the strategy, the privacy calibration (which plans every client's
messages in advance) and the benchmark all read it from here. Sampling is by partition id with a
generator derived from (seed, task, round), never from Flower's random node ids, so one seed
gives one run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoundPlan:
    global_round: int     # 1-based over the whole run
    task: int
    round: int            # 0-based within the task
    phase: str            # "train", or a method's own phase (e.g. "basis_start")
    last_of_task: bool    # the accuracy matrix gets its row after this round


def schedule(cfg, method) -> list[RoundPlan]:
    """Every round of the run, in order."""
    plans, g = [], 0
    for task in range(int(cfg.num_tasks)):
        phases = method.phases(task, int(cfg.rounds_per_task))
        for rnd, phase in enumerate(phases):
            g += 1
            plans.append(RoundPlan(g, task, rnd, phase, rnd == len(phases) - 1))
    return plans


def num_sampled(cfg) -> int:
    return max(1, int(round(float(cfg.fraction_train) * int(cfg.num_clients))))


def sample_clients(cfg, task: int, rnd: int) -> list[int]:
    """``fraction_train`` of the clients, drawn from (seed, task, round) alone (O(sampled), also
    for millions of clients: numpy's choice without replacement does not permute them all)."""
    n, k = int(cfg.num_clients), num_sampled(cfg)
    rng = np.random.default_rng([int(cfg.seed), 2, task, rnd])
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def asked(cfg, method, plan: RoundPlan) -> list[int]:
    """The clients asked in a round: everyone where the method says so, else a sample."""
    if method.samples_everyone(plan.task, plan.phase):
        return list(range(int(cfg.num_clients)))
    return sample_clients(cfg, plan.task, plan.round)


def largest_round(cfg, method) -> int:
    """The most clients any round of the run asks (every client in a phase the method samples
    everyone in, else the sample size)."""
    everyone = any(method.samples_everyone(p.task, p.phase) for p in schedule(cfg, method))
    return int(cfg.num_clients) if everyone else num_sampled(cfg)
