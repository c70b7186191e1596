"""How much does the federation cost on top of the learning? Same work, two ways.

    python simulations/benchmark.py --clients 100
    python simulations/benchmark.py --clients 10,100,1000 -- method=replay

For each client count N (synthetic data, the small CNN, ``min(N, 100)`` clients sampled per
round, about ``--samples`` training samples per client per task, one local epoch):

(a) compute: the same client rounds (same sampling, same downlink, same aggregation) called one
    after another in this process, with no Flower and no Ray, on one thread; timed: the client
    rounds only.
(b) simulation: the full Flower simulation on Ray (``fedcl``'s own path); timed: from building a
    round's messages to having decoded all its replies, summed over rounds (Ray start-up, server
    evaluation and aggregation excluded from both, reported apart).

It prints both, the ratio (b)/(a), the framework overhead per client-round
((b) - (a)) / client-rounds in ms (negative when Ray's parallel workers win), the peak resident
memory of the whole process tree (driver, Ray's processes and workers) during (b), and bytes per
round; the last line is ``ratio=<(b)/(a)> overhead_ms=<per client-round> peak_mb=<peak RSS>``
for the last N.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

from fedcl.cli import run_experiment
from fedcl.experiment import get_experiment
from fedcl.federation.client_app import client_step
from fedcl.federation.run_config import compose_config
from fedcl.federation.server_app import sample_clients
from fedcl.report import text_table


def workload(clients: int, samples: int, extra: list[str]) -> list[str]:
    classes, tasks = 10, 2
    per_class = max(30, samples * clients * tasks // classes)
    return ["dataset=synthetic", f"dataset.train_per_class={per_class}", "dataset.test_per_class=50",
            "model=small_cnn", "method=finetune", "optimizer=sgd", "lr=0.02", f"num_clients={clients}",
            f"num_tasks={tasks}", "rounds_per_task=2", "local_epochs=1", "batch_size=32",
            f"fraction_train={min(1.0, 100 / clients)}", "partition=iid", "progress=false", *extra]


def compute_only(cfg) -> tuple[float, int]:
    """(a): seconds spent in client rounds run in-process, and how many client-rounds ran."""
    exp = get_experiment(cfg)
    method = exp.method
    global_arrays = method.init_global(exp.new_model())
    spent, count = 0.0, 0
    with tempfile.TemporaryDirectory() as run_dir:
        global_round = 0
        for task in range(int(cfg.num_tasks)):
            for rnd, phase in enumerate(method.phases(task, int(cfg.rounds_per_task))):
                global_round += 1
                sampled = (list(range(int(cfg.num_clients))) if method.samples_everyone(task, phase)
                           else sample_clients(cfg, task, rnd))
                replies = []
                for client in sampled:
                    conf = {"task": task, "round": rnd, "phase": phase, "global-round": global_round, "fault": ""}
                    down = {k: np.array(v) for k, v in method.downlink(global_arrays, task, phase, client).items()}
                    t0 = time.perf_counter()
                    payload, metrics = client_step(cfg, run_dir, client, conf, down)
                    spent += time.perf_counter() - t0
                    count += 1
                    if payload is not None and metrics["num-examples"] > 0:
                        replies.append(({k: v.detach().cpu().numpy() for k, v in payload.items()},
                                        int(metrics["num-examples"])))
                if replies:
                    global_arrays = method.aggregate(global_arrays, replies, task, phase)
    return spent, count


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    parser.add_argument("--samples", type=int, default=200, help="training samples per client per task")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both (a) and (b)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fedcl_bench_")
    rows, last = [], ""
    for n in [int(c) for c in args.clients.split(",")]:
        cfg = compose_config(workload(n, args.samples, args.overrides))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # (a) is one client after another on one core
        compute_s, client_rounds = compute_only(cfg)
        torch.set_num_threads(threads)
        with PeakMemory() as mem:
            started = time.perf_counter()
            results = run_experiment(cfg, os.path.join(out, f"clients_{n}"))
            total_s = time.perf_counter() - started
        per_round = results["communication"]["per_round"]
        sim_s = sum(r["exchange_s"] for r in per_round)
        ratio = sim_s / compute_s
        overhead_ms = 1000 * (sim_s - compute_s) / client_rounds
        peak_mb = mem.peak / 2**20
        comm = results["communication"]
        bytes_per_round = (comm["uplink_bytes"] + comm["downlink_bytes"]) / len(per_round)
        rows.append([n, client_rounds, f"{compute_s:.1f}", f"{sim_s:.1f}", f"{ratio:.2f}", f"{overhead_ms:.1f}",
                     f"{total_s:.1f}", f"{peak_mb:.0f}", f"{bytes_per_round / 1e6:.2f}"])
        print(text_table(["clients", "client-rounds", "(a) compute s", "(b) simulation s", "ratio b/a",
                          "overhead ms/client-round", "end-to-end s", "peak MB", "MB/round"], rows), flush=True)
        last = f"ratio={ratio:.3f} overhead_ms={overhead_ms:.2f} peak_mb={peak_mb:.0f}"
    print(last)


if __name__ == "__main__":
    main()
