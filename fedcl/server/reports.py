"""What server callbacks are given: read-only reports of the run, a round, and the run's end.

A callback never gets the strategy: it cannot change the server's state, the schedule or the
method behind the round's back. Mappings are read-only views, arrays are read-only (the global
arrays are frozen), sequences are tuples.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from omegaconf import DictConfig

from fedcl.server.schedule import RoundPlan


@dataclass(frozen=True)
class RunInfo:
    """Before the first round (also when resuming)."""

    cfg: DictConfig                # read-only
    run_dir: str
    plans: tuple[RoundPlan, ...]
    resumed_after: int             # global rounds already done (0: a new run)


@dataclass(frozen=True)
class RoundReport:
    """After a round's aggregation and evaluation."""

    run: RunInfo
    plan: RoundPlan
    row: Mapping[str, Any]                     # this round's metrics row (as far as it is known)
    rows: tuple[Mapping[str, Any], ...]        # the rows of every earlier round
    global_arrays: Mapping[str, Any]           # after this round (read-only numpy arrays)
    elapsed_s: float                           # run time so far, earlier processes of a resumed run included
    checkpoint: Callable[[], dict]             # the server's and every callback's state, for a checkpoint

    @property
    def rounds_in_task(self) -> int:
        return sum(1 for p in self.run.plans if p.task == self.plan.task)


@dataclass(frozen=True)
class RunEnd:
    """After the last round: what results.json, the plots and the exports are made of."""

    run: RunInfo
    rows: tuple[Mapping[str, Any], ...]
    global_arrays: Mapping[str, Any]
    experiment: Any                            # data, scenario, model factory, method (for audits)
    model: Any                                 # the server's model with the final global arrays loaded


def frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))
