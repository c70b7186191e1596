"""Run the same experiment with several methods and print one comparison table.

    python simulations/compare_methods.py --quiet               # default: digits, 10 clients, 5 tasks
    python simulations/compare_methods.py --methods finetune,replay -- dataset=synthetic num_tasks=4

Each run goes through the `fedcl` entry point (one Ray session per run) into
<out>/<method>/; the table is also written to <out>/comparison.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedcl.report import format_comparison_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="finetune,lwf,replay,joint")
    parser.add_argument("--out", default="outputs/compare_methods")
    parser.add_argument("--quiet", action="store_true", help="hide each run's progress and summary")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    results = []
    for method in args.methods.split(","):
        run_dir = Path(args.out) / method
        cmd = [sys.executable, "-m", "fedcl.cli", f"method={method}", f"hydra.run.dir={run_dir}",
               *args.overrides, *(["progress=false"] if args.quiet else [])]
        print("$ fedcl " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
        results.append(json.loads((run_dir / "results.json").read_text()))
    table = format_comparison_table(results)
    print("\n" + table)
    (Path(args.out) / "comparison.md").write_text("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
