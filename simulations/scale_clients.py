"""How start-up and rounds grow with the number of clients (100 sampled per round, tiny work each).

    python simulations/scale_clients.py --clients 1000,10000          # end to end, one fedcl run per N
    python simulations/scale_clients.py --clients 1000,10000 --pieces # the per-client pieces, in this process

End to end: ``fedcl`` on synthetic 8 px data, the small CNN at width 8, ``method=finetune``, 2 tasks x 2 rounds,
one training sample per client per task, ``fraction_train=100/N``; one row per N with wall time, start-up
(everything outside registration and rounds: validation, data, Ray start, results), registration, the first
round (it also waits for the Ray workers to start and load the data), the mean of the later rounds, and the
peak RSS of the whole process tree (fedcl, its simulation process, Ray). ``--pieces`` times, without
Ray, what costs time per client: the scenario's partition, Flower's node registration and per-node contexts,
fedcl's registration, and one pass of the simulation engine's message pump with a round's 100 messages pending
(CPU seconds of this process: on a shared machine wall time says more about the neighbours).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from benchmark import PeakMemory

from fedcl.report import text_table


def workload(n: int) -> list[str]:
    return ["dataset=synthetic", "dataset.num_classes=10", f"dataset.train_per_class={max(100, n // 5)}",
            "dataset.test_per_class=30", "dataset.image_size=8", "model=small_cnn", "model.width=8",
            "method=finetune", f"num_clients={n}", f"fraction_train={min(1.0, 100 / n)}", "num_tasks=2",
            "rounds_per_task=2", "local_epochs=1", "partition=iid", "ray.client_cpus=1", "progress=true"]


def end_to_end(n: int, out: Path) -> list:
    run_dir = out / f"clients_{n}"
    cmd = [sys.executable, "-m", "fedcl.cli", *workload(n), f"hydra.run.dir={run_dir}"]
    print("$ fedcl " + " ".join(cmd[3:]), flush=True)
    with PeakMemory() as mem:
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - started
    results = json.loads((run_dir / "results.json").read_text())
    t = results["timing"]
    with open(run_dir / "metrics.csv", newline="") as f:
        rounds = [float(row["round_time_s"]) for row in csv.DictReader(f)]
    startup = wall - t["registration_s"] - t["rounds_s"]
    return [n, f"{wall:.1f}", f"{startup:.1f}", f"{t['registration_s']:.2f}", f"{rounds[0]:.1f}",
            f"{np.mean(rounds[1:]):.2f}", f"{mem.peak / 2**30:.2f}"]


def cpu_seconds(fn):
    started = time.process_time()
    out = fn()
    return out, time.process_time() - started


def in_memory_engine() -> SimpleNamespace:
    """An in-memory link state and grid as ``run_simulation`` sets them up (flwr 1.42), with fedcl's
    engine patches installed: factory, state, run, grid."""
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedcl.federation import registration

    registration.install()
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 3, NOOP_FEDERATION_ID
    state.run_ids[7], state.task_store[3] = RunRecord(run=run), Task(task_id=3, run_id=7)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return SimpleNamespace(factory=factory, state=state, run=run, grid=grid)


def pieces(n: int) -> list:
    """CPU seconds of the per-client pieces at ``n`` clients (run_simulation's own engine, no Ray)."""
    from flwr.app import Message, RecordDict
    from flwr.server.superlink.fleet.vce import vce_api

    from fedcl.data.scenario import build_scenario
    from fedcl.federation import registration

    per_class = max(100, n // 5)
    y = np.repeat(np.arange(10), per_class)
    _, scenario_s = cpu_seconds(lambda: build_scenario(y, y[:300], 10, 2, n, SimpleNamespace(name="iid"), 0))
    engine = in_memory_engine()
    factory, state, run, grid = engine.factory, engine.state, engine.run, engine.grid
    nodes, nodes_s = cpu_seconds(lambda: vce_api._register_nodes(n, factory))
    _, contexts_s = cpu_seconds(lambda: vce_api._register_node_info_stores(nodes, run))
    mapping, registration_s = cpu_seconds(lambda: registration.register_clients(grid, n))
    assert sorted(mapping) == list(range(n))
    grid.push_messages([Message(RecordDict(), message_type="train", dst_node_id=mapping[c]) for c in range(100)])
    pending = [msg for msg in state.message_ins_store.values()]
    queue = SimpleNamespace(put=lambda msg: None)
    stop = SimpleNamespace(is_set=iter([False, True]).__next__, wait=lambda s: None)
    _, pump_s = cpu_seconds(lambda: vce_api.add_messages_to_queue(state, queue, nodes, stop))
    assert all(m.metadata.delivered_at for m in pending)  # the pass delivered every pending message
    return [n, f"{scenario_s:.3f}", f"{nodes_s:.3f}", f"{contexts_s:.3f}", f"{registration_s:.3f}", f"{pump_s:.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000,10000", help="comma-separated client counts")
    parser.add_argument("--out", default="outputs/scale_clients")
    parser.add_argument("--pieces", action="store_true", help="time the per-client pieces in this process")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if args.pieces:
        print(text_table(["clients", "partition s", "Flower nodes s", "node contexts s", "fedcl registration s",
                          "pump pass s"], [pieces(n) for n in counts]))
        return
    rows = []
    for n in counts:
        rows.append(end_to_end(n, Path(args.out)))
        print(text_table(["clients", "wall s", "start-up s", "registration s", "round 1 s", "later rounds s/round",
                          "peak GiB"], rows), flush=True)


if __name__ == "__main__":
    main()
