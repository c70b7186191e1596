"""Fault injection (``faults.*``): which sampled clients misbehave in a round, and how.

The server draws the plan from (seed, task, round) alone, so a faulty run is as reproducible as a
clean one, and tells each chosen client its fault in the round's config; the client acts it out
for real (raises, never replies, replies late, or corrupts what it sends). The server never reads
the plan back when it judges replies: it sees only what a real server would see (an error reply, a
reply that arrives after the deadline or never, arrays that fail screening, see
``fedcl.server.screening``).

Lateness is simulated time, as in trace-driven FL simulators: each reply carries its arrival time,
the seconds the client's round took plus any injected delay; a dropped client's reply never
arrives. The server drops replies that arrive after ``faults.deadline_s``. Sleeping for real would
hold a Ray worker, and honest clients queued behind it would miss the deadline for reasons a real
federation (where clients run side by side) does not have.
"""
from __future__ import annotations

import numpy as np
import torch

from fedcl.hooks import ClientHook, ServerCallback

KINDS = ("crash", "dropout", "straggle", "corrupt")
CORRUPTIONS = ("nan", "inf", "shape", "norm")
HUGE = 1e6  # factor of a "huge norm" corruption
INJECTED_CRASH = "injected crash (faults.crash)"


def fault_plan(cfg, task: int, rnd: int, sampled: list[int]) -> dict[int, str]:
    """client -> fault ("crash", "dropout", "straggle", or "corrupt:<how>") for this round.

    Each ``faults.<kind>`` is the fraction of the sampled clients given that fault (rounded), drawn
    without overlap.
    """
    faults = cfg.get("faults", None)
    if not faults or not sampled:
        return {}
    rng = np.random.default_rng([int(cfg.seed), 4, task, rnd])
    order = [sampled[i] for i in rng.permutation(len(sampled))]
    plan, used = {}, 0
    for kind in KINDS:
        count = int(round(float(faults[kind]) * len(sampled)))
        for client in order[used:used + count]:
            plan[client] = kind
            if kind == "corrupt":
                plan[client] = f"corrupt:{rng.choice(corruption_kinds(cfg))}"
        used += count
    return plan


def check_faults(cfg) -> str | None:
    """A problem with ``faults.*`` in words, or None."""
    faults = cfg.faults
    fractions = {k: float(faults[k]) for k in KINDS}
    if any(not 0.0 <= f <= 1.0 for f in fractions.values()) or sum(fractions.values()) > 1.0:
        return (f"faults {fractions} must each be in [0, 1] and sum to at most 1: they are fractions "
                "of the sampled clients.")
    kinds = corruption_kinds(cfg)
    if not kinds or any(k not in CORRUPTIONS for k in kinds):
        return f"faults.corrupt_kinds={kinds} must be a non-empty subset of {list(CORRUPTIONS)}."
    if (fractions["dropout"] or fractions["straggle"]) and not faults.deadline_s:
        return ("faults.dropout and faults.straggle need a round deadline: set faults.deadline_s "
                "(seconds after which the server stops waiting for a round's replies).")
    if faults.deadline_s is not None and float(faults.deadline_s) <= 0:
        return f"faults.deadline_s={faults.deadline_s} must be > 0 (or null: wait for every reply)."
    return None


def corruption_kinds(cfg) -> list[str]:
    """``faults.corrupt_kinds`` as names (Hydra reads a bare ``nan``/``inf`` as a float)."""
    return [str(k).lower() for k in cfg.faults.corrupt_kinds]


def late_delay(cfg) -> float:
    """Simulated seconds a straggler's reply arrives after the deadline would have been met."""
    return float(cfg.faults.deadline_s) + float(cfg.faults.late_by_s)


def act_before_training(fault: str) -> bool:
    """Crash or drop out as told; True if the client should train and reply."""
    if fault == "crash":
        raise RuntimeError(INJECTED_CRASH)
    return fault != "dropout"  # a dropped client sends nothing (its reply never arrives)


def act_after_training(fault: str, cfg, arrays: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Corrupt the payload as told; also the simulated delay added to the client's arrival time."""
    if fault == "straggle":
        return arrays, late_delay(cfg)
    if fault.startswith("corrupt:"):
        return corrupt(arrays, fault.split(":", 1)[1]), 0.0
    return arrays, 0.0


def corrupt(arrays: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """A broken copy of a payload: NaN or Inf entries, a wrong shape, or a huge norm."""
    out = {k: v.detach().clone() for k, v in arrays.items()}
    key = next(k for k, v in out.items() if v.is_floating_point() and v.numel())
    if how == "nan":
        out[key].view(-1)[0] = float("nan")
    elif how == "inf":
        out[key].view(-1)[-1] = float("inf")
    elif how == "shape":
        out[key] = out[key].reshape(-1)[:-1] if out[key].numel() > 1 else torch.zeros(2)
    elif how == "norm":
        out = {k: v * HUGE if v.is_floating_point() else v for k, v in out.items()}
    else:
        raise ValueError(f"unknown corruption {how!r}; choose one of {list(CORRUPTIONS)}")
    return out


class FaultInjection:
    """``faults.*`` as a two-sided concern: the server plans who misbehaves, the client acts it out."""

    def __init__(self, cfg):
        self.cfg = cfg

    def server_callback(self) -> ServerCallback:
        return FaultPlanner(self.cfg)

    def client_hook(self) -> ClientHook:
        return FaultActor(self.cfg)


class FaultPlanner(ServerCallback):
    """Draws the round's plan from the admitted clients and tells each its fault in its config."""

    def __init__(self, cfg):
        self.cfg, self.plan = cfg, {}

    def admit(self, clients: list[int], plan) -> list[int]:
        self.plan = fault_plan(self.cfg, plan.task, plan.round, clients)
        return clients

    def client_config(self, client: int, plan) -> dict:
        return {"fault": self.plan.get(client, "")}


class FaultActor(ClientHook):
    def __init__(self, cfg):
        self.cfg = cfg

    def before_round(self, ctx, state, config):
        return None if act_before_training(str(config.get("fault", ""))) else "drop"

    def after_round(self, ctx, state, config, received, payload, num_examples):
        payload, delay = act_after_training(str(config.get("fault", "")), self.cfg, payload)
        return payload, ({"arrival-delay-s": delay} if delay else {})
