"""What does fedcl cost on top of the learning? The same work three ways, in one run.

    python simulations/benchmark.py --clients 100
    python simulations/benchmark.py --clients 10,100,1000
    python simulations/benchmark.py --clients 100 --repeat 3   # medians of 3 interleaved runs

Work (per client count N): synthetic 16 px data, the small CNN, ``method=finetune`` (FedAvg),
2 tasks x 2 rounds, ``min(N, 100)`` clients sampled per round, ``--samples`` training samples per
client per task, one local epoch.

(a) limit: the sampled clients' training loops alone, spread over every core (a pool of one-thread
    worker processes, models built before the clock starts): no model building, no I/O, no messages.
(b) stock Flower: what a user would write instead: Flower's own ``FedAvg`` strategy, a plain
    ``ClientApp`` that builds the model, loads the arrays, trains the same rows with the same loop and
    sends the model back, and central evaluation after every round; end to end under ``run_simulation``.
(b0) Flower alone: (b) with clients that send the arrays back untrained: what Flower and Ray
    cost on their own (start-up, messages, evaluation). ``(a + b0) / a`` is the least ``c / a`` a
    simulation under Flower on Ray could reach.
(c) fedcl: ``fedcl`` end to end (validation, Ray start, registration, every round, results files)
    until ``run_experiment`` returns, with the split of its time from results.json's ``timing``.
    fedcl returns once results.json is written; Flower and Ray then shut down (about 2 s, shown in
    the split) while the caller goes on.

The last line is ``limit_ratio=<c/a> peer_ratio=<c/b> overhead_ms=<(c - a) per client-round>
peak_mb=<peak RSS of (c)'s process tree>`` for the last N. ``--repeat K`` runs (a), (b), (b0) and (c)
K times, interleaved, and reports medians: on a shared or virtual machine one run of each varies by
10-30 %.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time

import psutil

# light at load, as the ``fedcl`` command is: fedcl's simulation process re-imports the main module
# (multiprocessing's spawn), and torch or matplotlib here would be start-up time the CLI does not pay
# (fedcl.config, which composes configs, loads the data and model modules: imported where it is used)
from fedcl.cli import run_experiment
from fedcl.runtime.simulation import reap_finishing


def workload(clients: int, samples: int, extra: list[str]) -> list[str]:
    classes, tasks = 10, 2
    per_class = max(30, samples * clients * tasks // classes)
    return ["dataset=synthetic", f"dataset.train_per_class={per_class}", "dataset.test_per_class=50",
            "model=small_cnn", "method=finetune", "optimizer=sgd", "lr=0.02", f"num_clients={clients}",
            f"num_tasks={tasks}", "rounds_per_task=2", "local_epochs=1", "batch_size=32",
            f"fraction_train={min(1.0, 100 / clients)}", "partition=iid", "progress=false", "ray.client_cpus=1",
            *extra]


def client_rounds(cfg) -> list[tuple[int, int, int]]:
    """(client, task, round) of every client-round fedcl's schedule runs."""
    from fedcl.experiment import get_experiment
    from fedcl.server.schedule import asked, schedule

    method = get_experiment(cfg).method
    return [(c, p.task, p.round) for p in schedule(cfg, method) for c in asked(cfg, method, p)]


# ---- (a) the limit -------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(overrides: list[str]) -> None:
    import torch

    from fedcl.config import compose_config
    from fedcl.experiment import get_experiment

    torch.set_num_threads(1)
    cfg = compose_config(overrides)
    exp = get_experiment(cfg)
    _WORKER.update(cfg=cfg, exp=exp, model=exp.new_model(), init={k: v.clone() for k, v in
                                                                   exp.new_model().state_dict().items()})


def _train_one(job: tuple[int, int, int]) -> int:
    from fedcl.client.app import client_round
    from fedcl.methods.base import fit

    client, task, rnd = job
    cfg, model = _WORKER["cfg"], _WORKER["model"]
    model.load_state_dict(_WORKER["init"])  # training cost does not depend on the weights
    ctx = client_round(cfg, client, task, rnd)
    rows = ctx.task_rows(task)
    if len(rows):
        fit(model, rows, ctx, lambda x, logits: None)
    return len(rows)


def limit(overrides: list[str], jobs: list[tuple[int, int, int]]) -> float:
    workers = os.cpu_count() or 1
    with mp.get_context("spawn").Pool(workers, _init_worker, (overrides,)) as pool:
        pool.map(_train_one, jobs[:workers])  # warm: data loaded, first batches run
        started = time.perf_counter()
        pool.map(_train_one, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
        return time.perf_counter() - started


# ---- (b) a stock Flower app ----------------------------------------------------------------------------
def stock_flower(cfg, train_clients: bool = True) -> float:
    """End-to-end seconds of the same training in a plain Flower app with Flower's own FedAvg.
    ``train_clients=False``: the same app, messages and evaluation with clients that send the arrays
    back untrained, which is what Flower and Ray cost alone (the floor of any Flower simulation)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment
    from fedcl.methods.base import fit
    from fedcl.runtime.backend import backend_config
    from fedcl.server.evaluation import evaluate_tasks

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        exp = get_experiment(cfg)
        model = exp.new_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        task, rnd = int(msg.content["config"]["task"]), int(msg.content["config"]["server-round"])
        ctx = client_round(cfg, int(context.node_config["partition-id"]), task, rnd)
        rows = ctx.task_rows(task)
        if len(rows) and train_clients:
            fit(model, rows, ctx, lambda x, logits: None)
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": max(1, len(rows))})}), reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        exp = get_experiment(cfg)
        model = exp.new_model()
        n = int(cfg.num_clients)
        k = max(1, round(float(cfg.fraction_train) * n))
        strategy = FedAvg(fraction_train=k / n, fraction_evaluate=0.0, min_train_nodes=k, min_evaluate_nodes=0,
                          min_available_nodes=n)
        arrays = ArrayRecord(model.state_dict())
        for task in range(int(cfg.num_tasks)):
            def central(server_round: int, arrays: ArrayRecord, task=task) -> MetricRecord:
                model.load_state_dict(arrays.to_torch_state_dict())
                return MetricRecord({"accuracy": evaluate_tasks(exp, model, task)[1]})

            result = strategy.start(grid, arrays, num_rounds=int(cfg.rounds_per_task),
                                    train_config=ConfigRecord({"task": task}), evaluate_fn=central)
            arrays = result.arrays

    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every round at INFO
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=int(cfg.num_clients),
                   backend_config=backend_config(cfg))
    return time.perf_counter() - started


# ---- (c) fedcl, and the process tree's memory ----------------------------------------------------------
class PeakMemory:
    """Peak total RSS of this process and all its descendants, sampled every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def split(results: dict, total_s: float) -> dict[str, float]:
    """fedcl's end-to-end seconds by part; the clients' parts are summed over clients (they run
    side by side on the Ray workers, so they add up to more than their share of the wall time)."""
    t = results["timing"]
    parts = {"start-up + finish (validate, data, Ray, results)": total_s - t["rounds_s"] - t["registration_s"]
             - t["checkpoint_s"],
             "registration": t["registration_s"], "configure (downlink)": t["configure_s"],
             "exchange (messages + client rounds)": t["exchange_s"], "aggregation": t["aggregate_s"],
             "evaluation": t["evaluate_s"], "checkpoint + metrics.csv": t["checkpoint_s"]}
    parts.update({f"  clients: {p}": t[f"client_{p}_s"] for p in ("load", "build", "train", "payload", "save")})
    return parts


def main() -> None:
    from fedcl.report import text_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="100", help="comma-separated client counts")
    parser.add_argument("--samples", type=int, default=200, help="training samples per client per task")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary one)")
    parser.add_argument("--no-stock", action="store_true", help="skip (b), the stock Flower app")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each of (a), (b), (c), interleaved; "
                        "the table shows medians")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for all three")
    args = parser.parse_args()
    from fedcl.config import compose_config

    out = args.out or tempfile.mkdtemp(prefix="fedcl_bench_")
    rows, last = [], ""
    for n in [int(c) for c in args.clients.split(",")]:
        overrides = workload(n, args.samples, args.overrides)
        cfg = compose_config(overrides)
        jobs = client_rounds(cfg)
        times: dict[str, list[float]] = {"limit": [], "stock": [], "floor": [], "fedcl": []}
        for _ in range(args.repeat):  # interleaved: a slow spell of the machine hits every column
            times["limit"].append(limit(overrides, jobs))
            times["stock"].append(float("nan") if args.no_stock else stock_flower(cfg))
            times["floor"].append(float("nan") if args.no_stock else stock_flower(cfg, train_clients=False))
            with PeakMemory() as mem:
                started = time.perf_counter()
                results = run_experiment(cfg, os.path.join(out, f"clients_{n}"))
                times["fedcl"].append(time.perf_counter() - started)
                reap_finishing()  # Flower's engine and Ray shutting down after results.json was written
                teardown_s = time.perf_counter() - started - times["fedcl"][-1]
        if args.repeat > 1:
            ratios = sorted(f / a for f, a in zip(times["fedcl"], times["limit"]))
            print(f"N={n}: c/a of the {args.repeat} runs: {', '.join(f'{r:.2f}' for r in ratios)}; "
                  f"c/b: {', '.join(f'{f / b:.2f}' for f, b in zip(times['fedcl'], times['stock']))}")
        limit_s, stock_s, floor_s, fedcl_s = (statistics.median(times[k]) for k in ("limit", "stock", "floor", "fedcl"))
        parts = split(results, times["fedcl"][-1])  # the last run's
        parts["after the results: Flower and Ray shut down"] = teardown_s
        print(text_table(["fedcl's time, N=" + str(n), "s"], [[k, f"{v:.1f}"] for k, v in parts.items()]))
        overhead_ms = 1000 * (fedcl_s - limit_s) / len(jobs)
        peak_mb = mem.peak / 2**20
        rows.append([n, len(jobs), f"{limit_s:.1f}", f"{stock_s:.1f}", f"{floor_s:.1f}", f"{fedcl_s:.1f}",
                     f"{fedcl_s / limit_s:.2f}", f"{fedcl_s / stock_s:.2f}", f"{(limit_s + floor_s) / limit_s:.2f}",
                     f"{overhead_ms:.1f}", f"{peak_mb:.0f}"])
        print(text_table(["clients", "client-rounds", "(a) limit s", "(b) stock Flower s", "(b0) Flower alone s",
                          "(c) fedcl s", "c/a", "c/b", "(a+b0)/a", "overhead ms/client-round", "peak MB"], rows),
              flush=True)
        last = (f"limit_ratio={fedcl_s / limit_s:.3f} peer_ratio={fedcl_s / stock_s:.3f} "
                f"overhead_ms={overhead_ms:.2f} peak_mb={peak_mb:.0f}")
    print(last)


if __name__ == "__main__":
    main()
