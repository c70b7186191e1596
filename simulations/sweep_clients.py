"""Sweep the number of clients with Hydra's multirun and combine the jobs' results.

    python simulations/sweep_clients.py --clients 10,100,1000 -- method=replay dataset=synthetic

Runs ``fedcl -m num_clients=<list> ...`` (one job, and one Ray session, per client count, one
after another) into <out>/clients_<N>/, then writes <out>/sweep.md (accuracy, forgetting, bytes
and wall time per client count) and <out>/sweep.png. ``--collect-only`` rebuilds both from the
jobs already in <out>.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedcl.report import format_sweep_table, plot_sweep


def collect(out: Path) -> list[dict]:
    """The results.json of every finished job under a sweep directory."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    parser.add_argument("--out", default="outputs/sweep_clients")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every job")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.collect_only:
        cmd = [sys.executable, "-m", "fedcl.cli", "-m", f"num_clients={args.clients}", *args.overrides,
               f"hydra.sweep.dir={out}", "hydra.sweep.subdir=clients_${num_clients}"]
        print("$ fedcl " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
    results = collect(out)
    if not results:
        sys.exit(f"no results.json under {out}/*/: did the jobs fail?")
    table = format_sweep_table(results)
    print("\n" + table)
    (out / "sweep.md").write_text("```\n" + table + "\n```\n")
    plot_sweep(out / "sweep.png", results)
    print(f"\nwrote {out / 'sweep.md'} and {out / 'sweep.png'}")


if __name__ == "__main__":
    main()
