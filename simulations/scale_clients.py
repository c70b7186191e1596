"""How start-up and rounds grow with the number of clients (100 sampled per round, tiny work each).

    python simulations/scale_clients.py --clients 1000,10000          # end to end, one fedcl run per N
    python simulations/scale_clients.py --clients 1000,10000 --pieces # the per-client pieces, in this process
    python simulations/scale_clients.py --clients 10000 --flwr-run    # the same under `flwr run .`, 2 SuperNodes

End to end: ``fedcl`` on synthetic 8 px data, the small CNN at width 8, ``method=finetune``, 2 tasks x 2 rounds,
one training sample per client per task, ``fraction_train=100/N``; one row per N with wall time, start-up
(everything outside the wait for SuperNodes and rounds: validation, data, Ray start, results), the wait for
the SuperNodes, the first round (it also waits for the Ray workers to start and load the data), the mean of
the later rounds, and the peak RSS of the whole process tree (fedcl, its simulation process, Ray). Clients
are data, not nodes: the simulation has as many SuperNodes as a round has messages (100 here), whatever N is.
``--pieces`` times, without Ray, what costs time per client: the scenario's partition and a round's
sampling (CPU seconds of this process: on a shared machine wall time says more about the
neighbours). ``--flwr-run`` runs the same workload with ``flwr run .`` on Flower's default federation
(2 SuperNodes) against a local SuperLink of its own (stopped afterwards) and reads results.json.
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


def pieces(n: int) -> list:
    """CPU seconds of the per-client pieces at ``n`` clients: the scenario's partition, and one
    round's sampling."""
    from fedcl.config import compose_config
    from fedcl.data.scenario import build_scenario
    from fedcl.server.schedule import sample_clients

    per_class = max(100, n // 5)
    y = np.repeat(np.arange(10), per_class)
    _, scenario_s = cpu_seconds(lambda: build_scenario(y, y[:300], 10, 2, n, SimpleNamespace(name="iid"), 0))
    cfg = compose_config(workload(n))
    sampled, sample_s = cpu_seconds(lambda: sample_clients(cfg, 0, 0))
    assert len(sampled) == min(n, 100)
    return [n, f"{scenario_s:.3f}", f"{sample_s:.4f}"]


def flwr_run(n: int, out: Path) -> list:
    """The workload under ``flwr run .`` with Flower's default federation (2 SuperNodes)."""
    import os
    import shutil
    import signal
    import tempfile

    repo = Path(__file__).resolve().parent.parent
    bindir = Path(sys.executable).parent
    home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
    run_dir = (out / f"flwr_run_{n}").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ADDRESS": "local",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    overrides = " ".join(w for w in workload(n) if not w.startswith("progress"))
    cmd = [str(bindir / "flwr"), "run", ".", "--stream", "--run-config", f'overrides="{overrides}" run-dir="{run_dir}"']
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, cwd=repo, env=env, timeout=1800)
    finally:
        found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True)
        for pid in found.stdout.split():  # the local SuperLink `flwr run` started for this FLWR_HOME
            os.kill(int(pid), signal.SIGTERM)
    wall = time.perf_counter() - started
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_clients"] == n and len(results["communication"]["per_round"]) == 4
    return [n, f"{wall:.1f}", f"{results['wall_time_s']:.1f}", f"{results['final_average_accuracy']:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000,10000", help="comma-separated client counts")
    parser.add_argument("--out", default="outputs/scale_clients")
    parser.add_argument("--pieces", action="store_true", help="time the per-client pieces in this process")
    parser.add_argument("--flwr-run", action="store_true", help="run under `flwr run .` (2 SuperNodes)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if args.pieces:
        print(text_table(["clients", "partition s", "sampling s"], [pieces(n) for n in counts]))
        return
    if args.flwr_run:
        print(text_table(["clients", "flwr run wall s", "run wall s (results.json)", "final acc"],
                         [flwr_run(n, Path(args.out)) for n in counts]))
        return
    rows = []
    for n in counts:
        rows.append(end_to_end(n, Path(args.out)))
        print(text_table(["clients", "wall s", "start-up s", "wait for nodes s", "round 1 s", "later rounds s/round",
                          "peak GiB"], rows), flush=True)


if __name__ == "__main__":
    main()
