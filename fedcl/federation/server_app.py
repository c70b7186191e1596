"""The Flower ``ServerApp``: drives tasks x rounds, samples clients, aggregates, evaluates.

Sampling is by partition id with a generator derived from (seed, task, round), never from Flower's
random node ids, so one seed gives one run. Replies are aggregated in partition order, so the
floating-point sum does not depend on which Ray worker finished first.
"""
from __future__ import annotations

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
from fedcl.federation.codec import content_bytes, from_record, to_record
from fedcl.federation.run_config import config_from_context, run_dir_from_context

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


def run_server(grid: Grid, cfg: DictConfig, run_dir: str) -> dict:
    """The whole federated continual-learning run; writes and returns results.json's content."""
    started = time.monotonic()
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "client_state", ignore_errors=True)  # a new run starts from fresh clients
    exp = get_experiment(cfg)
    method = exp.method
    model = exp.new_model()
    global_arrays = method.init_global(model)
    # one copy of the plain model (backbone + head) as FedAvg would send it
    full_model_bytes = content_bytes(RecordDict({"m": to_record(exp.new_model(prepared=False).state_dict())}))
    nodes = register_clients(grid, int(cfg.num_clients))

    matrix: list[list[float | None]] = []
    rows: list[dict] = []
    uplink = downlink = 0
    T, R = int(cfg.num_tasks), int(cfg.rounds_per_task)
    for task in range(T):
        phases = method.phases(task, R)
        for rnd, phase in enumerate(phases):
            t0 = time.monotonic()
            sampled = (list(range(int(cfg.num_clients))) if method.samples_everyone(task, phase)
                       else sample_clients(cfg, task, rnd))
            config = ConfigRecord({"task": task, "round": rnd, "phase": phase})
            msgs = [Message(RecordDict({"arrays": to_record(method.downlink(global_arrays, task, phase, c)),
                                        "config": config}),
                            message_type="train", dst_node_id=nodes[c]) for c in sampled]
            down = sum(content_bytes(m.content) for m in msgs)
            replies = list(grid.send_and_receive(msgs))
            valid, failures = [], []
            up = 0
            for reply in replies:
                if reply.has_error():
                    failures.append(str(reply.error.reason))
                    continue
                up += content_bytes(reply.content)
                m = reply.content["metrics"]
                if int(m["num-examples"]) > 0:
                    valid.append((int(m["client"]), from_record(reply.content["arrays"]),
                                  int(m["num-examples"])))
            if failures:
                print(f"  warning: {len(failures)} client(s) failed: {failures[0][:300]}", flush=True)
            valid.sort(key=lambda v: v[0])
            if valid:
                global_arrays = method.aggregate(global_arrays, [(arrays, n) for _, arrays, n in valid],
                                                 task, phase)
            method.load_payload(model, global_arrays)
            per_task, acc_seen = evaluate_tasks(exp, model, task)
            uplink += up
            downlink += down
            rows.append({"global_round": len(rows) + 1, "task": task, "round": rnd, "phase": phase,
                         "clients_sampled": len(sampled), "clients_ok": len(valid),
                         "clients_failed": len(failures), "accuracy_seen": acc_seen,
                         **{f"acc_task_{j}": a for j, a in enumerate(per_task)},
                         "uplink_bytes": up, "downlink_bytes": down,
                         "round_time_s": time.monotonic() - t0})
            report.write_metrics_csv(out / "metrics.csv", rows)
            if cfg.progress:
                print(f"[task {task + 1}/{T} round {rnd + 1}/{len(phases)} {phase}] clients {len(valid)}/{len(sampled)}"
                      f" | acc seen {100 * acc_seen:5.1f}% | up {up / 1e6:.2f} MB down {down / 1e6:.2f} MB"
                      f" | {time.monotonic() - t0:.1f}s", flush=True)
        matrix.append(per_task + [None] * (T - task - 1))

    after_base = [r["uplink_bytes"] / r["clients_ok"] for r in rows
                  if r["task"] >= method.base_session_tasks and r["clients_ok"]]
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "accuracy_matrix": matrix,
        **metrics.summarize(matrix),
        "final_accuracy_seen": rows[-1]["accuracy_seen"],
        "communication": {
            "uplink_bytes": uplink, "downlink_bytes": downlink, "full_model_bytes": full_model_bytes,
            "uplink_bytes_per_client_round": float(np.mean(after_base)) if after_base else 0.0,
            "per_round": [{k: r[k] for k in ("global_round", "task", "round", "phase", "clients_ok",
                                              "uplink_bytes", "downlink_bytes")} for r in rows],
        },
        "num_clients": int(cfg.num_clients),
        "wall_time_s": time.monotonic() - started,
    }
    if (counts := method.parameter_counts(model)) is not None:
        results["parameters"] = counts
    if hasattr(method, "export"):  # LoRA methods: the final global adapters in PEFT's format
        method.export(model, out / "adapters")
    report.write_json(out / "results.json", results)
    report.plot_accuracy_matrix(out / "accuracy_matrix.png", matrix, title=method.name)
    report.plot_accuracy_curve(out / "accuracy_curve.png", rows)
    return results


def make_server_app(cfg: DictConfig, run_dir: str) -> ServerApp:
    """A ServerApp bound to a config (``run_simulation`` leaves ``run_config`` empty)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir)

    return app


# `flwr run .`: the config comes from the run config (see fedcl.federation.run_config).
app = ServerApp()


@app.main()
def _main_from_run_config(grid: Grid, context: Context) -> None:
    run_dir = run_dir_from_context(context)
    print(f"fedcl: writing results to {run_dir}", flush=True)
    run_server(grid, config_from_context(context), run_dir)
