"""``ContinualStrategy``: a whole federated continual-learning run as a Flower ``Strategy``.

Flower's own loop drives it. In a user's ``ServerApp``::

    strategy = ContinualStrategy.from_overrides(["method=replay", "num_tasks=2"], run_dir="runs/replay")
    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=strategy.num_rounds)

Flower's server round ``r`` is the experiment's global round ``r``: a (task, phase, round) of the
method's schedule (``fedcl.server.schedule``). ``configure_train`` asks the round's clients
(messages name the logical client; nodes are only execution slots) and sends each only the
arrays it does not hold, of the arrays it is given; ``aggregate_train`` classifies failures,
screens, combines with the method and the aggregation rule, evaluates centrally (the server
holds the test split; clients do not evaluate) and returns the new global arrays, all of them,
as Flower's loop expects. After the last round results.json is written (a callback).

What Flower's loop does not do lives beside it: ``fedcl.server.loop`` (resume from a
checkpoint, replies decoded as they arrive) drives the same two methods for the ``fedcl``
command, and cross-cutting concerns are server callbacks (``fedcl.hooks``) that see
read-only reports (``fedcl.server.reports``), never the strategy.
"""
from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedcl import metrics
from fedcl.aggregation.rules import applied
from fedcl.client.app import Stopwatch
from fedcl.client.codec import content_bytes, from_record, to_record
from fedcl.experiment import get_experiment, resolve_device
from fedcl.faults import FaultInjection
from fedcl.hooks import ServerCallback, mechanisms
from fedcl.methods.base import role_of
from fedcl.server.callbacks import Checkpointer, MetricsFile, Progress, ResultsWriter, RunDirectory
from fedcl.server.downlink import plan_parcels
from fedcl.server.evaluation import evaluate_tasks
from fedcl.server.reports import RoundReport, RunEnd, RunInfo, frozen
from fedcl.server.schedule import RoundPlan, asked, schedule
from fedcl.server.screening import screen
from fedcl.server.server_state import ServerState, pack, unpack
from fedcl.server.spool import ReplySpool, owned

NODES_TIMEOUT_S = 300.0  # a slow start (a busy or remote Ray cluster) may take this long to show nodes
POLL_S = 0.1
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
    configure_s: float


class ContinualStrategy(Strategy):
    def __init__(self, cfg: DictConfig, run_dir: str, resume: bool = False,
                 callbacks: list[ServerCallback] | None = None, min_nodes: int = 1):
        """``resume``: ``fedcl.server.loop.run`` continues the run in ``run_dir`` from its
        checkpoint. ``min_nodes``: SuperNodes to wait for before the first round (a simulation
        fedcl starts knows how many it made; any federation size works)."""
        self.cfg, self.run_dir, self.resume = cfg, str(run_dir), bool(resume)
        self.min_nodes = int(min_nodes)
        self.experiment = get_experiment(cfg)
        self.method = self.experiment.method
        self.rule = instantiate(cfg.aggregator)
        self.plans = schedule(cfg, self.method)
        concerns = [*mechanisms(cfg), FaultInjection(cfg)]
        built_in = ([Progress()] if cfg.get("progress", True) else []) + [MetricsFile(), Checkpointer()]
        self.callbacks = ([RunDirectory()] + [c.server_callback() for c in concerns] + list(callbacks or [])
                          + built_in + [ResultsWriter()])
        # the server's model (initial state, then the global arrays), evaluated on a GPU when there is one
        self.model = self.experiment.new_model().to(resolve_device(str(cfg.device)))
        self.state = ServerState(freeze(self.method.init_global(self.model)))
        self.state.downlink.versions = {k: 0 for k in self.state.global_arrays}
        self.started = time.monotonic()
        self.timing = {"registration_s": 0.0, "checkpoint_s": 0.0}
        self.cluster: dict | None = None
        self.run: RunInfo | None = None          # set when the first round is configured
        self.result: dict | None = None          # results.json's content, after the last round
        self._round: _Round | None = None
        self._offered: ArrayRecord | None = None  # the record last handed to Flower
        self._serialised: dict[str, tuple[np.ndarray, Array]] = {}  # key -> (array, its serialised form)

    @classmethod
    def from_overrides(cls, overrides: list[str], run_dir: str, resume: bool = False,
                       callbacks: list[ServerCallback] | None = None) -> "ContinualStrategy":
        """A strategy for the config that ``fedcl <overrides>`` would run (validated the same way)."""
        from fedcl import config

        cfg = config.compose_config(list(overrides))
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

    @property
    def num_rounds(self) -> int:
        """Flower's ``num_rounds`` for the whole experiment: every (task, phase, round)."""
        return len(self.plans)

    def initial_arrays(self) -> ArrayRecord:
        """Flower's ``initial_arrays``: the global arrays as they are now (the method's initial
        state; after a resume, the checkpoint's)."""
        return self._offer(self.state.global_arrays)

    def client_app(self):
        """The matching ``ClientApp`` (same config, same run directory)."""
        from fedcl.client.app import make_client_app

        return make_client_app(self.cfg, self.run_dir)

    def backend_config(self) -> dict:
        """Ray resources per client for ``run_simulation`` (``ray.*`` in the config)."""
        from fedcl.runtime.backend import backend_config

        return backend_config(self.cfg)

    def summary(self) -> None:
        print(f"ContinualStrategy: method={self.method.name}, {self.num_clients} clients, {self.num_tasks} tasks, "
              f"{len(self.plans)} rounds, aggregator={type(self.rule).__name__}", flush=True)

    # ---- one round ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None,
                        grid) -> list[Message]:
        """Messages for round ``server_round`` (1-based over the run), from the global ``arrays``
        Flower hands over (None: the strategy's own). Each message names its logical client; the
        clients are spread over the grid's nodes."""
        if not 1 <= server_round <= len(self.plans):
            raise ValueError(f"server round {server_round}: this experiment has {len(self.plans)} rounds "
                             f"(num_rounds=strategy.num_rounds)")
        if self.run is None:
            self._begin(grid)
        started = time.monotonic()
        plan = self.plans[server_round - 1]
        self._adopt(arrays, plan)
        clients = asked(self.cfg, self.method, plan)
        for cb in self.callbacks:
            clients = cb.admit(clients, plan)
        nodes = node_ids(grid, 1) if grid is not None else [0]
        g = self.state.global_arrays
        downlinks = {c: self.method.downlink(g, plan.task, plan.phase, c) for c in clients}
        parcels = plan_parcels(self.state.downlink, downlinks)
        base = {"task": plan.task, "round": plan.round, "phase": plan.phase, "global-round": plan.global_round,
                **(dict(config) if config else {})}
        messages = []
        for i, c in enumerate(clients):
            conf = {**base, "client": c}
            for cb in self.callbacks:
                conf.update(cb.client_config(c, plan))
            content = RecordDict({"arrays": parcels[c].arrays, "manifest": parcels[c].manifest,
                                  "config": ConfigRecord(conf)})
            messages.append(Message(content, message_type="train", dst_node_id=nodes[i % len(nodes)]))
        self._round = _Round(plan, clients, {c: parcels[c].keys for c in clients}, messages,
                             sum(content_bytes(m.content) for m in messages), started, time.monotonic() - started)
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Judge the replies (an iterable: they may still be arriving), combine what passes,
        evaluate, record the round. Returns every global array and the round's counters."""
        r = self._round
        if r is None or r.plan.global_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        plan, cfg = r.plan, self.cfg
        deadline = float(cfg.faults.deadline_s) if cfg.faults.deadline_s else math.inf
        failures, candidates, answered, restarted, up = [], [], set(), [], 0
        client_time = dict.fromkeys(Stopwatch.PARTS, 0.0)  # summed over the round's clients
        spool = ReplySpool(Path(self.run_dir) / "spool", cfg.strategy.get("reply_memory_mb", None))
        for reply in replies:
            if reply.has_error():  # no content: the message it answers names the client (ids are set on push)
                client = next((c for c, m in zip(r.clients, r.messages)
                               if m.metadata.message_id == reply.metadata.reply_to_message_id), -1)
                answered.add(client)
                failures.append((client, "crash", error_message(str(reply.error.reason))))
                continue
            metrics_in = reply.content["metrics"]
            client = int(metrics_in["client"])
            answered.add(client)
            arrival = float(metrics_in.get("arrival-s", 0.0))  # simulated, see faults.py
            if math.isinf(arrival):
                failures.append((client, "timeout", "no reply (the client dropped out)"))
                continue
            if int(metrics_in.get("worker-restarted", 0)):
                restarted.append(client)
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
                                    functools.partial(role_of, self.method),
                                    small_rounds=not any(cb.noisy_updates for cb in self.callbacks))
        failures = sorted(failures + rejected, key=lambda f: f[0])
        if accepted:  # in client order: the float sum does not depend on which worker finished first
            after = owned(combine(self.method, self.rule, before, [(a, n) for _, a, n in accepted], plan.task,
                                  plan.phase))
            self.state.downlink.bump(before, after, plan.global_round)
            self.state.global_arrays = freeze(after)
        spool.clear()
        self.state.uplink += up
        self.state.downlink_bytes += r.downlink_bytes
        self.state.failures += [{"round": plan.global_round, "task": plan.task, "client": c, "kind": kind,
                                 "reason": reason} for c, kind, reason in failures]
        self.state.failures += [{"round": plan.global_round, "task": plan.task, "client": c, "kind": "worker_lost",
                                 "reason": "its Ray worker died; Ray restarted it and ran the client again "
                                           "(recovered)"} for c in sorted(restarted)]
        timing = {"accepted": len(accepted), "failures": failures, "uplink": up, "workers_lost": len(restarted),
                  "exchange_s": aggregate_started - r.started - r.configure_s, "configure_s": r.configure_s,
                  "aggregate_s": time.monotonic() - aggregate_started,
                  **{f"client_{part}_s": v for part, v in client_time.items()}}
        if self.cluster is None:  # once replies came, Ray runs; after the last round its GCS may be gone
            self.cluster = ray_cluster()
        self._record_round(plan, timing)
        counters = MetricRecord({"clients-sampled": len(r.clients), "clients-ok": len(accepted),
                                 "clients-failed": len(failures), "uplink-bytes": up,
                                 "downlink-bytes": r.downlink_bytes})
        if plan.global_round == len(self.plans):
            self.finish()
        return self._offer(self.state.global_arrays), counters

    def configure_evaluate(self, server_round, arrays, config, grid) -> list[Message]:
        return []  # evaluation is central: the server holds the test split

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    # ---- bookkeeping around the round -----------------------------------------------------------
    def _begin(self, grid) -> None:
        """Before the first round this strategy configures (a new run, or a resumed one)."""
        self.started = time.monotonic()
        self.run = RunInfo(self.cfg, self.run_dir, tuple(self.plans), self.state.rounds_done)
        for cb in self.callbacks:
            cb.on_run_start(self.run)
        if grid is not None:
            waited = time.monotonic()
            node_ids(grid, self.min_nodes)
            self.timing["registration_s"] = time.monotonic() - waited

    def _adopt(self, arrays: ArrayRecord | None, plan: RoundPlan) -> None:
        """Make ``arrays`` (what Flower hands over) the global arrays. The record this strategy
        offered last costs nothing; another one (a wrapper changed the aggregate) is compared array by
        array, and what differs gets a new version, so clients are sent it."""
        if arrays is None or arrays is self._offered:
            return
        g, given = self.state.global_arrays, from_record(arrays)
        if set(given) != set(g):
            raise ValueError(f"round {plan.global_round}: the arrays given have keys {sorted(given)[:5]}..., the "
                             f"experiment's global arrays {sorted(g)[:5]}...; pass strategy.initial_arrays()")
        changed = [k for k in g if not (given[k].shape == np.shape(g[k]) and given[k].dtype == np.asarray(g[k]).dtype
                                        and np.array_equal(given[k], g[k], equal_nan=given[k].dtype.kind == "f"))]
        if not changed:
            return
        if plan.global_round == 1:
            raise ValueError(f"initial_arrays differ from the method's initial state in {changed[:5]}: every client "
                             "builds that state itself from the seed, so pass strategy.initial_arrays()")
        self.state.global_arrays = freeze({**g, **{k: given[k] for k in changed}})
        for k in changed:  # a new array, not a growth of the one before
            self.state.downlink.growth.pop(k, None)
            self.state.downlink.versions[k] = plan.global_round - 1

    def _offer(self, arrays: dict[str, np.ndarray]) -> ArrayRecord:
        """``arrays`` as the ArrayRecord Flower carries from round to round; an array serialised
        for the last record is reused when it is the same object."""
        out = {}
        for k, v in arrays.items():
            source, array = self._serialised.get(k, (None, None))
            out[k] = array if source is v else to_record({k: v})[k]
        self._serialised = {k: (v, out[k]) for k, v in arrays.items()}
        self._offered = ArrayRecord(out)
        return self._offered

    def evaluate(self, task: int) -> tuple[list[float], float]:
        """Accuracy of the current global arrays on every seen task's test classes."""
        self.method.load_payload(self.model, self.state.global_arrays)
        return evaluate_tasks(self.experiment, self.model, task)

    def _record_round(self, plan: RoundPlan, last: dict) -> dict:
        """Evaluate and record the metrics row of the round just aggregated; callbacks, then the checkpoint."""
        evaluate_started = time.monotonic()
        per_task, acc_seen = self.evaluate(plan.task)
        r = self._round
        last["evaluate_s"] = time.monotonic() - evaluate_started
        row = {"global_round": plan.global_round, "task": plan.task, "round": plan.round, "phase": plan.phase,
               "clients_sampled": len(r.clients), "clients_ok": last["accepted"],
               "clients_failed": len(last["failures"]), "workers_lost": last["workers_lost"],
               "failures": ";".join(f"{c}:{kind}" for c, kind, _ in last["failures"]), "accuracy_seen": acc_seen,
               **{f"acc_task_{j}": a for j, a in enumerate(per_task)},
               "uplink_bytes": last["uplink"], "downlink_bytes": r.downlink_bytes,
               "exchange_s": last["exchange_s"], "round_time_s": time.monotonic() - r.started,
               **{k: last.get(k, 0.0) for k in TIMED}}
        for cb in self.callbacks:
            row.update(cb.on_round_end(self._report(plan, row)))
        self.state.rows.append(row)
        if plan.last_of_task:
            self.state.matrix.append(per_task + [None] * (self.num_tasks - plan.task - 1))
        checkpoint_started = time.monotonic()
        done = self._report(plan, row, earlier=self.state.rows[:-1])
        for cb in self.callbacks:
            cb.on_checkpoint(done)
        self.timing["checkpoint_s"] += time.monotonic() - checkpoint_started
        return row

    def _report(self, plan: RoundPlan, row: dict, earlier: list[dict] | None = None) -> RoundReport:
        rows = self.state.rows if earlier is None else earlier
        return RoundReport(self.run, plan, frozen(row), tuple(frozen(x) for x in rows),
                           frozen(self.state.global_arrays), self.elapsed_s(), self.checkpoint)

    def elapsed_s(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self.started

    def checkpoint(self) -> dict:
        """What ``checkpoint/server.pt`` holds: the server state and every callback's state."""
        server = self.state.state_dict()
        server["elapsed_s"] = self.elapsed_s()
        return {"server": server, "callbacks": [pack(cb.state_dict()) for cb in self.callbacks]}

    def finish(self) -> dict:
        """results.json's content; the callbacks write it (and the plots, the exports)."""
        if self.run is None:
            self._begin(None)
        self.result = self.results()
        self.method.load_payload(self.model, self.state.global_arrays)
        end = RunEnd(self.run, tuple(frozen(x) for x in self.state.rows), frozen(self.state.global_arrays),
                     self.experiment, self.model)
        for cb in self.callbacks:
            cb.on_run_end(end, self.result)
        return self.result

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
            "timing": {**self.timing, **{k: float(sum(r.get(k, 0.0) for r in s.rows)) for k in TIMED},
                       "exchange_s": float(sum(r["exchange_s"] for r in s.rows)),
                       "rounds_s": float(sum(r["round_time_s"] for r in s.rows))},
            "num_clients": self.num_clients,
            "wall_time_s": self.elapsed_s(),
        }
        if self.cluster is not None:
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


def node_ids(grid, at_least: int, timeout_s: float = NODES_TIMEOUT_S) -> list[int]:
    """The grid's node ids (execution slots) once it has ``at_least`` of them."""
    started = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < at_least:
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the federation has {len(nodes)} SuperNodes after {timeout_s:.0f}s; expected "
                               f"{at_least}")
        time.sleep(POLL_S)
    return nodes


def combine(method, rule, global_arrays: dict, replies: list, task: int, phase: str) -> dict:
    """The method's aggregation with the run's rule applied: passed in, and the rule of every
    weighted mean inside that names none (a method need not remember to pass it on)."""
    with applied(rule):
        return method.aggregate(global_arrays, replies, task, phase, rule=rule)


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
