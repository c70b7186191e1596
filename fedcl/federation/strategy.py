"""``ContinualStrategy``: a whole federated continual-learning run as a Flower ``Strategy``.

A Flower user drops it into their own ``ServerApp``::

    strategy = ContinualStrategy.from_overrides(["method=replay", "num_tasks=2"], run_dir="runs/replay")
    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy.start(grid)

    run_simulation(server_app=app, client_app=strategy.client_app(), num_supernodes=strategy.num_clients,
                   backend_config=strategy.backend_config())

``start(grid)`` drives every task x phase of the method (``fedcl.federation.schedule``), resumes
from the run directory's checkpoint when asked, and writes results.json. Each round is
``configure_train`` (who is asked, what each is sent: only the arrays it does not hold) and
``aggregate_train`` (classify failures, screen, combine with the method and the aggregation rule):
both are plain functions of the strategy's state and the messages, testable with fake replies.
Evaluation is central (the server's test split after every round); clients do not evaluate.
Cross-cutting concerns are server callbacks (``fedcl.federation.hooks``), never code in here.
"""
from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedcl import metrics
from fedcl.errors import RuntimeLost
from fedcl.experiment import get_experiment, resolve_device
from fedcl.federation import checkpoint
from fedcl.federation.callbacks import Checkpointer, MetricsFile, Progress, ResultsWriter
from fedcl.federation.client_app import Stopwatch
from fedcl.federation.codec import content_bytes, from_record, to_record
from fedcl.federation.downlink import plan_parcels
from fedcl.federation.evaluation import evaluate_tasks
from fedcl.federation.faults import FaultInjection
from fedcl.federation.hooks import ServerCallback, mechanisms
from fedcl.federation.schedule import RoundPlan, asked, schedule
from fedcl.federation.screening import screen
from fedcl.federation.server_state import ServerState, unpack
from fedcl.federation.spool import ReplySpool, owned

MAX_WORKER_RETRIES = 2  # retries of the clients whose Ray worker died, per round
PULL_S = 0.05  # how often the server asks for replies while a round runs
# per-round seconds in metrics.csv and their sums in results.json's timing: the server's parts, and
# the clients' parts summed over the round's replies (they overlap in time across Ray workers)
TIMED = ("configure_s", "aggregate_s", "evaluate_s", *(f"client_{p}_s" for p in Stopwatch.PARTS))


@dataclass
class _Round:
    """What configure_train decided, for aggregate_train to judge the replies against."""

    plan: RoundPlan
    clients: list[int]
    keys: dict[int, tuple[str, ...]]   # client -> the keys it was given (sent or held)
    messages: list[Message]
    downlink_bytes: int
    started: float


class ContinualStrategy(Strategy):
    def __init__(self, cfg: DictConfig, run_dir: str, resume: bool = False,
                 callbacks: list[ServerCallback] | None = None):
        self.cfg, self.run_dir, self.resume = cfg, str(run_dir), bool(resume)
        self.experiment = get_experiment(cfg)
        self.method = self.experiment.method
        self.rule = instantiate(cfg.aggregator)
        self.plans = schedule(cfg, self.method)
        concerns = [*mechanisms(cfg), FaultInjection(cfg)]
        built_in = ([Progress()] if cfg.get("progress", True) else []) + [MetricsFile(), Checkpointer()]
        self.callbacks = [c.server_callback() for c in concerns] + list(callbacks or []) + built_in + [ResultsWriter()]
        # the server's model (initial state, then the global arrays), evaluated on a GPU when there is one
        self.model = self.experiment.new_model().to(resolve_device(str(cfg.device)))
        self.state = ServerState(freeze(self.method.init_global(self.model)))
        self.state.downlink.versions = {k: 0 for k in self.state.global_arrays}
        self.nodes: dict[int, int] = {}   # partition id -> Flower node id (set by start)
        self.started = time.monotonic()
        self._round: _Round | None = None

    @classmethod
    def from_overrides(cls, overrides: list[str], run_dir: str, resume: bool = False,
                       callbacks: list[ServerCallback] | None = None) -> "ContinualStrategy":
        """A strategy for the config that ``fedcl <overrides>`` would run (validated the same way)."""
        from fedcl import config
        from fedcl.federation.run_config import compose_config

        cfg = compose_config(list(overrides))
        config.validate(cfg)
        config.validate_against_data(cfg, get_experiment(cfg).data.num_classes)
        return cls(cfg, run_dir, resume, callbacks)

    # ---- what a ServerApp needs next to it ---------------------------------------------------
    @property
    def num_clients(self) -> int:
        return int(self.cfg.num_clients)

    @property
    def num_tasks(self) -> int:
        return int(self.cfg.num_tasks)

    def client_app(self):
        """The matching ``ClientApp`` (same config, same run directory)."""
        from fedcl.federation.client_app import make_client_app

        return make_client_app(self.cfg, self.run_dir)

    def backend_config(self) -> dict:
        """Ray resources per client for ``run_simulation`` (``ray.*`` in the config)."""
        from fedcl.federation.runtime import backend_config

        return backend_config(self.cfg)

    def summary(self) -> None:
        print(f"ContinualStrategy: method={self.method.name}, {self.num_clients} clients, {self.num_tasks} tasks, "
              f"{len(self.plans)} rounds, aggregator={type(self.rule).__name__}", flush=True)

    # ---- one round ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None,
                        grid) -> list[Message]:
        """Messages for round ``server_round`` (1-based over the run). The global arrays are the
        strategy's own state; ``arrays`` is ignored (Flower's signature)."""
        started = time.monotonic()
        plan = self.plans[server_round - 1]
        clients = asked(self.cfg, self.method, plan)
        for cb in self.callbacks:
            clients = cb.admit(clients, plan)
        g = self.state.global_arrays
        downlinks = {c: self.method.downlink(g, plan.task, plan.phase, c) for c in clients}
        parcels = plan_parcels(self.state.downlink, downlinks)
        base = {"task": plan.task, "round": plan.round, "phase": plan.phase, "global-round": plan.global_round,
                **(dict(config) if config else {})}
        messages = []
        for c in clients:
            conf = dict(base)
            for cb in self.callbacks:
                conf.update(cb.client_config(c, plan))
            content = RecordDict({"arrays": parcels[c].arrays, "manifest": parcels[c].manifest,
                                  "config": ConfigRecord(conf)})
            messages.append(Message(content, message_type="train", dst_node_id=self.nodes.get(c, c)))
        self._round = _Round(plan, clients, {c: parcels[c].keys for c in clients}, messages,
                             sum(content_bytes(m.content) for m in messages), started)
        self._configure_s = time.monotonic() - started
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Judge the replies, combine what passes, and record the round. Returns the arrays this
        round replaced and the round's counters."""
        r = self._round
        if r is None or r.plan.global_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        plan, cfg = r.plan, self.cfg
        client_of = {self.nodes.get(c, c): c for c in r.clients}
        deadline = float(cfg.faults.deadline_s) if cfg.faults.deadline_s else math.inf
        failures, candidates, answered, up = [], [], set(), 0
        client_time = dict.fromkeys(Stopwatch.PARTS, 0.0)  # summed over the round's clients
        spool = ReplySpool(Path(self.run_dir) / "spool", cfg.strategy.get("reply_memory_mb", None))
        for reply in replies:
            client = client_of.get(reply.metadata.src_node_id, -1)
            answered.add(client)
            if reply.has_error():
                failures.append((client, failure_kind(str(reply.error.reason)), error_message(str(reply.error.reason))))
                continue
            metrics_in = reply.content["metrics"]
            arrival = float(metrics_in.get("arrival-s", 0.0))  # simulated, see faults.py
            if math.isinf(arrival):
                failures.append((client, "timeout", "no reply (the client dropped out)"))
                continue
            up += content_bytes(reply.content)
            for part in Stopwatch.PARTS:
                client_time[part] += float(metrics_in.get(f"time-{part}-s", 0.0))
            if int(metrics_in.get("synced", 0)):  # it saved what it was given: it holds this round's arrays
                self.state.downlink.mark_synced(client, plan.global_round, r.keys[client])
            for cb in self.callbacks:
                cb.on_reply(plan, client, reply.content)
            if arrival > deadline:
                failures.append((client, "timeout",
                                 f"reply arrived after {arrival:.1f}s > faults.deadline_s={deadline:g}"))
                continue
            n = int(metrics_in["num-examples"])
            if n > 0 and "arrays" in reply.content:
                candidates.append((client, spool.add(client, from_record(reply.content["arrays"])), n))
                del reply.content["arrays"]  # decoded: the serialised copy need not stay in the driver
        aggregate_started = time.monotonic()
        failures += [(c, "timeout", "no reply") for c in r.clients if c not in answered]
        ratio = cfg.strategy.max_norm_ratio
        before = self.state.global_arrays
        accepted, rejected = screen(sorted(candidates, key=lambda x: x[0]), before,
                                    float(ratio) if ratio is not None else float("inf"),
                                    self.method.varies_across_clients,
                                    small_rounds=not any(cb.noisy_updates for cb in self.callbacks))
        failures = sorted(failures + rejected, key=lambda f: f[0])
        changed = []
        if accepted:  # in client order: the float sum does not depend on which worker finished first
            after = owned(self.method.aggregate(before, [(a, n) for _, a, n in accepted], plan.task, plan.phase,
                                                rule=self.rule))
            changed = self.state.downlink.bump(before, after, plan.global_round)
            self.state.global_arrays = freeze(after)
        spool.clear()
        self.state.uplink += up
        self.state.downlink_bytes += r.downlink_bytes
        self.state.failures += [{"round": plan.global_round, "task": plan.task, "client": c, "kind": kind,
                                 "reason": reason} for c, kind, reason in failures]
        self._last = {"accepted": len(accepted), "failures": failures, "uplink": up,
                      "aggregate_s": time.monotonic() - aggregate_started,
                      **{f"client_{part}_s": v for part, v in client_time.items()}}
        counters = MetricRecord({"clients-sampled": len(r.clients), "clients-ok": len(accepted),
                                 "clients-failed": len(failures), "uplink-bytes": up,
                                 "downlink-bytes": r.downlink_bytes})
        g = self.state.global_arrays
        return (to_record({k: g[k] for k in changed}) if changed else None), counters

    def configure_evaluate(self, server_round, arrays, config, grid) -> list[Message]:
        return []  # evaluation is central: the server holds the test split

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def evaluate(self, task: int) -> tuple[list[float], float]:
        """Accuracy of the current global arrays on every seen task's test classes."""
        self.method.load_payload(self.model, self.state.global_arrays)
        return evaluate_tasks(self.experiment, self.model, task)

    def record_round(self, plan: RoundPlan) -> dict:
        """Evaluate and record the metrics row of the round just aggregated."""
        evaluate_started = time.monotonic()
        per_task, acc_seen = self.evaluate(plan.task)
        r, last = self._round, self._last
        last["evaluate_s"] = time.monotonic() - evaluate_started
        row = {"global_round": plan.global_round, "task": plan.task, "round": plan.round, "phase": plan.phase,
               "clients_sampled": len(r.clients), "clients_ok": last["accepted"],
               "clients_failed": len(last["failures"]), "workers_lost": last.get("workers_lost", 0),
               "failures": ";".join(f"{c}:{kind}" for c, kind, _ in last["failures"]), "accuracy_seen": acc_seen,
               **{f"acc_task_{j}": a for j, a in enumerate(per_task)},
               "uplink_bytes": last["uplink"], "downlink_bytes": r.downlink_bytes,
               "exchange_s": last.get("exchange_s", 0.0), "round_time_s": time.monotonic() - r.started,
               **{k: last.get(k, 0.0) for k in TIMED}}
        for cb in self.callbacks:
            row.update(cb.on_round_end(self, plan, row))
        self.state.rows.append(row)
        if plan.last_of_task:
            self.state.matrix.append(per_task + [None] * (self.num_tasks - plan.task - 1))
        return row

    # ---- the whole run ----------------------------------------------------------------------------
    def start(self, grid, timeout: float | None = None) -> dict:
        """Run (or resume) every round of the experiment on ``grid``; returns results.json's content."""
        from fedcl.federation.registration import register_clients

        self.started = time.monotonic()
        out = Path(self.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        saved = checkpoint.load(out) if self.resume else None
        if saved is None:
            for folder in ("client_state", "shared"):  # a new run starts from fresh clients
                shutil.rmtree(out / folder, ignore_errors=True)
            checkpoint.save_config(out, self.cfg)
        else:
            self.load_state_dict(saved)
            if self.cfg.get("progress", True):
                print(f"resuming {out} after global round {self.state.rounds_done}", flush=True)
        for cb in self.callbacks:
            cb.on_run_start(self)
        registration_started = time.monotonic()
        self.nodes = register_clients(grid, self.num_clients)
        self.timing = {"registration_s": time.monotonic() - registration_started, "checkpoint_s": 0.0}
        self.cluster = ray_cluster()  # now: after the last round the GCS may be gone (see fedcl.federation.runtime)
        round_timeout = timeout if timeout is not None else float(self.cfg.get("round_timeout_s", 3600))
        for plan in self.plans[self.state.rounds_done:]:
            messages = self.configure_train(plan.global_round, None, None, grid)
            exchange_started = time.monotonic()
            self.aggregate_train(plan.global_round, self.exchange(grid, messages, round_timeout))
            # aggregate_train decodes each reply as it arrives: exchange is all of it but the aggregation
            exchange_s = time.monotonic() - exchange_started - self._last["aggregate_s"]
            self.state.failures += [{"round": plan.global_round, "task": plan.task, "client": c, "kind": "worker_lost",
                                     "reason": f"{reason} (asked again: recovered)"} for c, reason in self._recovered]
            self._last.update(exchange_s=exchange_s, workers_lost=len(self._recovered), configure_s=self._configure_s)
            self.record_round(plan)
            checkpoint_started = time.monotonic()
            for cb in self.callbacks:
                cb.on_checkpoint(self)
            self.timing["checkpoint_s"] += time.monotonic() - checkpoint_started
        results = self.results()
        for cb in self.callbacks:
            cb.on_run_end(self, results)
        return results

    def exchange(self, grid, messages: list[Message], timeout: float):
        """Send a round's messages and yield the replies as they arrive, so the driver decodes them
        one by one instead of holding a round's worth. A client whose Ray worker died is asked again
        at once (its state on disk is from before the round, so it is the same computation), at most
        MAX_WORKER_RETRIES times. Replies missing at ``timeout`` count as timeouts."""
        self._recovered = []
        by_node = {m.metadata.dst_node_id: m for m in messages}
        retries = dict.fromkeys(by_node, 0)
        waiting = set(grid.push_messages(messages))
        del messages
        client_of = {self.nodes.get(c, c): c for c in self._round.clients}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            replies = list(grid.pull_messages(waiting))
            for reply in replies:
                waiting.discard(reply.metadata.reply_to_message_id)
                node = reply.metadata.src_node_id
                if reply.has_error() and worker_lost(str(reply.error.reason)):
                    if retries[node] == MAX_WORKER_RETRIES:
                        raise RuntimeLost(self.run_dir, f"client {client_of.get(node, -1)} lost its Ray worker "
                                                        f"{MAX_WORKER_RETRIES + 1} times in round "
                                                        f"{self._round.plan.global_round}")
                    retries[node] += 1
                    self._recovered.append((client_of.get(node, -1), error_message(str(reply.error.reason))))
                    waiting.update(grid.push_messages([Message(by_node[node].content, message_type="train",
                                                               dst_node_id=node)]))
                    continue
                yield reply
            del replies
            if waiting:
                time.sleep(PULL_S)

    def results(self) -> dict:
        s, method = self.state, self.method
        self.method.load_payload(self.model, s.global_arrays)  # also when resumed after the last round
        after_base = [(r["uplink_bytes"] / r["clients_ok"], r["downlink_bytes"] / r["clients_sampled"])
                      for r in s.rows if r["task"] >= method.base_session_tasks and r["clients_ok"]]
        results = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "accuracy_matrix": s.matrix,
            **metrics.summarize(s.matrix),
            "final_accuracy_seen": s.rows[-1]["accuracy_seen"],
            "communication": {
                "uplink_bytes": s.uplink, "downlink_bytes": s.downlink_bytes,
                "full_model_bytes": array_bytes(self.experiment.new_model(prepared=False).state_dict()),
                "uplink_bytes_per_client_round": float(np.mean([u for u, _ in after_base])) if after_base else 0.0,
                "downlink_bytes_per_client_round": float(np.mean([d for _, d in after_base])) if after_base else 0.0,
                "per_round": [{k: r[k] for k in ("global_round", "task", "round", "phase", "clients_ok",
                                                  "uplink_bytes", "downlink_bytes", "exchange_s")} for r in s.rows],
            },
            "failures": s.failures,
            "timing": {**getattr(self, "timing", {}), **{k: float(sum(r.get(k, 0.0) for r in s.rows)) for k in TIMED},
                       "exchange_s": float(sum(r["exchange_s"] for r in s.rows)),
                       "rounds_s": float(sum(r["round_time_s"] for r in s.rows))},
            "num_clients": self.num_clients,
            "wall_time_s": s.elapsed_s + time.monotonic() - self.started,
        }
        if getattr(self, "cluster", None) is not None:
            results["ray"] = self.cluster
        if (counts := method.parameter_counts(self.model)) is not None:
            results["parameters"] = counts
        if (diagnostics := method.report(self.model, self.experiment, s.global_arrays)) is not None:
            results["diagnostics"] = diagnostics
        return results

    # ---- checkpoint --------------------------------------------------------------------------------
    def load_state_dict(self, saved: dict) -> None:
        self.state = ServerState.from_state_dict(saved["server"])
        self.state.global_arrays = freeze(self.state.global_arrays)
        for cb, state in zip(self.callbacks, saved["callbacks"]):
            cb.load_state_dict(unpack(state))


def freeze(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Global arrays are read-only: a method returns new arrays for what it changes, which is how the
    server knows what changed (and so what clients must be sent)."""
    for v in arrays.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    return arrays


def array_bytes(state: dict) -> int:
    """Bytes of these tensors as Flower serialises them (npy: the data plus a 128-byte header)."""
    return int(sum(t.numel() * t.element_size() + 128 for t in state.values()))


def worker_lost(reason: str) -> bool:
    """The error reply says the client's Ray worker (or its node) died, not that the client raised."""
    from fedcl.federation import runtime

    return runtime.worker_lost(reason)


def failure_kind(reason: str) -> str:
    return "worker_lost" if worker_lost(reason) else "crash"


def error_message(reason: str) -> str:
    """The client's own exception message out of Flower's and Ray's wrapping of it."""
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    if "Message:" in reason:
        reason = reason.rsplit("Message:", 1)[1]
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return (lines[0].rstrip("'>\"") if lines else "error reply")[:300]


def ray_cluster() -> dict | None:
    """The Ray cluster the clients ran on (None when this process is not attached to one)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return {"nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "cpus": float(ray.cluster_resources().get("CPU", 0)),
            "gpus": float(ray.cluster_resources().get("GPU", 0))}
