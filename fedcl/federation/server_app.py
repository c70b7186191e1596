"""The Flower ``ServerApp``: drives tasks x rounds, samples clients, aggregates, evaluates.

Sampling is by partition id with a generator derived from (seed, task, round), never from Flower's
random node ids, so one seed gives one run. Replies are aggregated in partition order, so the
floating-point sum does not depend on which Ray worker finished first.
"""
from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedcl import metrics, report
from fedcl.experiment import Experiment, get_experiment
from fedcl.federation import checkpoint
from fedcl.federation.codec import content_bytes, from_record, to_record
from fedcl.federation.faults import fault_plan
from fedcl.federation.robust import robust_aggregation
from fedcl.federation.screening import screen
from fedcl.federation.run_config import config_from_context, run_dir_from_context
from fedcl.privacy import ledger_of  # privacy (issue 6): the per-run ledger lives in `run` (checkpointed)

REGISTRATION_TIMEOUT_S = 300.0


def sample_clients(cfg: DictConfig, task: int, rnd: int) -> list[int]:
    """``fraction_train`` of the clients, drawn from (seed, task, round) alone."""
    n = int(cfg.num_clients)
    k = num_sampled(cfg)
    rng = np.random.default_rng([int(cfg.seed), 2, task, rnd])
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def num_sampled(cfg: DictConfig) -> int:
    return max(1, int(round(float(cfg.fraction_train) * int(cfg.num_clients))))


def register_clients(grid: Grid, num_clients: int) -> dict[int, int]:
    """Wait until every simulated client has registered; map partition id -> node id."""
    deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of num_clients={num_clients} nodes registered "
                               f"within {REGISTRATION_TIMEOUT_S:.0f}s; start as many SuperNodes as clients")
        time.sleep(0.2)
    asks = [Message(RecordDict(), message_type="query", dst_node_id=nid) for nid in node_ids]
    mapping = {}
    for reply in grid.send_and_receive(asks):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the handshake: {reply.error}")
        mapping[int(reply.content["identity"]["partition-id"])] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(mapping))
    if missing:
        raise RuntimeError(f"no node simulates partitions {missing[:10]}; num_clients must equal "
                           "the number of SuperNodes")
    return mapping


def evaluate_tasks(exp: Experiment, model: torch.nn.Module, task: int) -> tuple[list[float], float]:
    """Accuracy on each seen task's test classes, and on all seen test samples together.

    Prediction is class-incremental: argmax over every class seen so far, no task id given, on a
    shuffled mix of all seen tasks' samples (so no batch holds a single task).
    """
    seen = exp.scenario.seen_classes(task)
    rows = np.concatenate(exp.scenario.test_indices[: task + 1])
    mix = np.random.default_rng([int(exp.cfg.seed), 3, task]).permutation(len(rows))
    preds = np.empty(len(rows), dtype=np.int64)
    preds[mix] = exp.method.predict(model, exp.test_images[rows[mix]], seen).numpy()
    correct = preds == exp.scenario.y_test[rows]
    per_task, start = [], 0
    for t in range(task + 1):
        n = len(exp.scenario.test_indices[t])
        per_task.append(float(correct[start:start + n].mean()) if n else 0.0)
        start += n
    return per_task, float(correct.mean())


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


def fresh_run(method, model) -> dict:
    """The server loop's state before round 1 (what a checkpoint holds after each round)."""
    return {"global": method.init_global(model), "matrix": [], "rows": [], "failures": [],
            "uplink": 0, "downlink": 0, "elapsed_s": 0.0}


def play_round(grid: Grid, cfg: DictConfig, exp: Experiment, model: torch.nn.Module, nodes: dict[int, int], run: dict,
               task: int, rnd: int, phase: str, global_round: int) -> tuple[dict, list[float]]:
    """One communication round: sample, send, collect, screen, aggregate, evaluate ``model``.

    Updates ``run`` in place (global arrays, byte counters, failures) and returns the round's
    metrics row and the per-task accuracies after it.
    """
    method = exp.method
    t0 = time.monotonic()
    sampled = (list(range(int(cfg.num_clients))) if method.samples_everyone(task, phase)
               else sample_clients(cfg, task, rnd))
    ledger = ledger_of(run, cfg)  # privacy (issue 6): per-client accountants
    sampled = ledger.admit(sampled, task, rnd, phase)  # exhausted clients stop
    plan = fault_plan(cfg, task, rnd, sampled)
    exchange_started = time.monotonic()  # the federation's share: encode, send, train, reply, decode
    msgs = [Message(RecordDict({"arrays": to_record(method.downlink(run["global"], task, phase, c)),
                                "config": ConfigRecord({"task": task, "round": rnd, "phase": phase,
                                                        "global-round": global_round,
                                                        "fault": plan.get(c, "")})}),
                    message_type="train", dst_node_id=nodes[c]) for c in sampled]
    down = sum(content_bytes(m.content) for m in msgs)
    deadline = float(cfg.faults.deadline_s) if cfg.faults.deadline_s else math.inf
    replies = list(grid.send_and_receive(msgs))

    client_of = {nodes[c]: c for c in sampled}
    failures, candidates, answered, up = [], [], set(), 0
    for reply in replies:
        client = client_of.get(reply.metadata.src_node_id, -1)
        answered.add(client)
        if reply.has_error():
            failures.append((client, "crash", error_message(str(reply.error.reason))))
            continue
        arrival = float(reply.content["metrics"].get("arrival-s", 0.0))  # simulated, see faults.py
        if math.isinf(arrival):
            failures.append((client, "timeout", "no reply (the client dropped out)"))
            continue
        up += content_bytes(reply.content)
        ledger.observe(task, reply.content)
        if arrival > deadline:
            failures.append((client, "timeout", f"reply arrived after {arrival:.1f}s > faults.deadline_s={deadline:g}"))
            continue
        n = int(reply.content["metrics"]["num-examples"])
        if n > 0 and "arrays" in reply.content:
            candidates.append((client, from_record(reply.content["arrays"]), n))
    exchange_s = time.monotonic() - exchange_started
    failures += [(c, "timeout", "no reply") for c in sampled if c not in answered]
    ratio = cfg.strategy.max_norm_ratio
    accepted, rejected = screen(sorted(candidates, key=lambda r: r[0]), run["global"],
                                float(ratio) if ratio is not None else float("inf"),
                                method.varies_across_clients, small_rounds=not ledger.noisy_updates)
    failures = sorted(failures + rejected, key=lambda f: f[0])
    if accepted:  # in client order: the float sum does not depend on which worker finished first
        with robust_aggregation(str(cfg.strategy.robust), float(cfg.strategy.trim_fraction)):
            run["global"] = method.aggregate(run["global"], [(a, n) for _, a, n in accepted], task, phase)
    method.load_payload(model, run["global"])
    per_task, acc_seen = evaluate_tasks(exp, model, task)
    run["uplink"] += up
    run["downlink"] += down
    run["failures"] += [{"round": global_round, "task": task, "client": c, "kind": kind, "reason": reason}
                        for c, kind, reason in failures]
    row = {"global_round": global_round, "task": task, "round": rnd, "phase": phase,
           "clients_sampled": len(sampled), "clients_ok": len(accepted), "clients_failed": len(failures),
           "failures": ";".join(f"{c}:{kind}" for c, kind, _ in failures), "accuracy_seen": acc_seen,
           **{f"acc_task_{j}": a for j, a in enumerate(per_task)},
           "uplink_bytes": up, "downlink_bytes": down, "exchange_s": exchange_s,
           "round_time_s": time.monotonic() - t0,
           **ledger.end_round(task)}  # privacy (issue 6): eps_max, eps_mean, clients_exhausted
    return row, per_task


def run_server(grid: Grid, cfg: DictConfig, run_dir: str, resume: bool = False) -> dict:
    """The whole federated continual-learning run; writes and returns results.json's content.

    After every round the server state is checkpointed; ``resume=True`` continues from the last
    checkpoint in ``run_dir`` (same config, same seed: the same final metrics as an uninterrupted run).
    """
    started = time.monotonic()
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp = get_experiment(cfg)
    method = exp.method
    # one copy of the plain model (backbone + head) as FedAvg would send it
    full_model_bytes = content_bytes(RecordDict({"m": to_record(exp.new_model(prepared=False).state_dict())}))
    model = exp.new_model()  # the server's model: initial state here, then rebuilt from the global arrays
    run = checkpoint.load(out) if resume else None
    if run is None:
        for folder in ("client_state", "shared"):  # a new run starts from fresh clients
            shutil.rmtree(out / folder, ignore_errors=True)
        run = fresh_run(method, model)
        checkpoint.save_config(out, cfg)
    elif cfg.progress:
        print(f"resuming {out} after global round {len(run['rows'])}", flush=True)
    nodes = register_clients(grid, int(cfg.num_clients))

    T, R = int(cfg.num_tasks), int(cfg.rounds_per_task)
    global_round = 0
    for task in range(T):
        phases = method.phases(task, R)
        for rnd, phase in enumerate(phases):
            global_round += 1
            if global_round <= len(run["rows"]):  # done before the interruption
                continue
            t0 = time.monotonic()
            row, per_task = play_round(grid, cfg, exp, model, nodes, run, task, rnd, phase, global_round)
            run["rows"].append(row)
            if rnd == len(phases) - 1:
                run["matrix"].append(per_task + [None] * (T - task - 1))
            report.write_metrics_csv(out / "metrics.csv", run["rows"])
            checkpoint.save(out, {**run, "elapsed_s": run["elapsed_s"] + time.monotonic() - started})
            if cfg.progress:
                failed = f" ({row['clients_failed']} failed)" if row["clients_failed"] else ""
                print(f"[task {task + 1}/{T} round {rnd + 1}/{len(phases)} {phase}] clients "
                      f"{row['clients_ok']}/{row['clients_sampled']}{failed} | acc seen {100 * row['accuracy_seen']:5.1f}%"
                      f" | up {row['uplink_bytes'] / 1e6:.2f} MB down {row['downlink_bytes'] / 1e6:.2f} MB"
                      f" | {time.monotonic() - t0:.1f}s", flush=True)

    method.load_payload(model, run["global"])  # also when resumed after the last round
    rows, matrix = run["rows"], run["matrix"]
    after_base = [r["uplink_bytes"] / r["clients_ok"] for r in rows
                  if r["task"] >= method.base_session_tasks and r["clients_ok"]]
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "accuracy_matrix": matrix,
        **metrics.summarize(matrix),
        "final_accuracy_seen": rows[-1]["accuracy_seen"],
        "communication": {
            "uplink_bytes": run["uplink"], "downlink_bytes": run["downlink"], "full_model_bytes": full_model_bytes,
            "uplink_bytes_per_client_round": float(np.mean(after_base)) if after_base else 0.0,
            "per_round": [{k: r[k] for k in ("global_round", "task", "round", "phase", "clients_ok",
                                              "uplink_bytes", "downlink_bytes", "exchange_s")} for r in rows],
        },
        "failures": run["failures"],
        "num_clients": int(cfg.num_clients),
        "wall_time_s": run["elapsed_s"] + time.monotonic() - started,
    }
    if (cluster := ray_cluster()) is not None:
        results["ray"] = cluster
    if (counts := method.parameter_counts(model)) is not None:
        results["parameters"] = counts
    if (privacy := ledger_of(run, cfg).results(exp, run["global"])) is not None:  # privacy (issue 6), with the audit
        results["privacy"] = privacy
    if hasattr(method, "export"):  # LoRA methods: the final global adapters in PEFT's format
        method.export(model, out / "adapters")
    report.write_json(out / "results.json", results)
    report.plot_accuracy_matrix(out / "accuracy_matrix.png", matrix, title=method.name)
    report.plot_accuracy_curve(out / "accuracy_curve.png", rows)
    return results


def make_server_app(cfg: DictConfig, run_dir: str, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a config (``run_simulation`` leaves ``run_config`` empty)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir, resume)

    return app


# `flwr run .`: the config comes from the run config (see fedcl.federation.run_config).
app = ServerApp()


@app.main()
def _main_from_run_config(grid: Grid, context: Context) -> None:
    run_dir = run_dir_from_context(context)
    print(f"fedcl: writing results to {run_dir}", flush=True)
    run_server(grid, config_from_context(context), run_dir)
