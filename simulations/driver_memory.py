"""Does the driver's memory grow with the number of clients it sends the model to? It should not.

    python simulations/driver_memory.py                 # ResNet-18 FedAvg, 10 and 100 sampled clients
    python simulations/driver_memory.py strategy.reply_memory_mb=0   # every update waits on disk

Runs ``fedcl`` (FedAvg, ResNet-18 with the CIFAR stem: 45 MB of arrays per message, tiny synthetic
data, one task of two rounds: the second round sends every client the aggregated model) with 10 and
with 100 sampled clients, and samples the resident memory of the driver (the process running the
ServerApp, i.e. fedcl's simulation process; Ray's workers excluded) every 0.1 s. Clients that receive
the same arrays share one serialised record, replies are decoded as they arrive, and updates beyond
``strategy.reply_memory_mb`` (512 MB) wait on disk, so the peak should differ by far less than
90 x 45 MB. Last line: ``peak_mb_10=<MB> peak_mb_100=<MB> growth_mb=<difference>``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import psutil

from fedcl.report import text_table


def driver_peak(clients: int, out: str, extra: list[str]) -> tuple[float, float]:
    """(peak RSS of the simulation process in MB, wall seconds) of one run."""
    cmd = [sys.executable, "-m", "fedcl.cli", "dataset=synthetic", "dataset.image_size=8", "dataset.channels=3",
           f"dataset.train_per_class={max(10, clients // 5)}", "dataset.test_per_class=2", "model=resnet18",
           "method=finetune", "num_tasks=1", "rounds_per_task=2", "local_epochs=1", "batch_size=8",
           f"num_clients={clients}", "partition=iid", "progress=false", f"hydra.run.dir={out}/clients_{clients}",
           *extra]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    me, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            for child in me.children(recursive=True):
                line = " ".join(child.cmdline())
                if "multiprocessing" in line and "ray" not in line and child.ppid() == proc.pid:
                    peak = max(peak, child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"fedcl with {clients} clients failed (exit {proc.returncode})")
    return peak / 2**20, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fedcl_driver_memory_")
    rows, peaks = [], {}
    for n in (10, 100):
        peaks[n], wall = driver_peak(n, out, args.overrides)
        rows.append([n, f"{peaks[n]:.0f}", f"{wall:.0f}"])
    print(text_table(["sampled ResNet-18 clients", "driver peak RSS MB", "wall s"], rows))
    print(f"peak_mb_10={peaks[10]:.0f} peak_mb_100={peaks[100]:.0f} growth_mb={peaks[100] - peaks[10]:.0f}")


if __name__ == "__main__":
    main()
