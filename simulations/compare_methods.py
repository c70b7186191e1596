"""Run the same experiment with several methods and print one comparison table.

    python simulations/compare_methods.py --quiet               # default: digits, 10 clients, 5 tasks
    python simulations/compare_methods.py --methods finetune,replay -- dataset=synthetic num_tasks=4

Each run goes through the `fedcl` entry point (one Ray session per run) into
<out>/<method>/; the table is also written to <out>/comparison.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fedcl_runs import run_fedcl

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
        results.append(run_fedcl([f"method={method}", *args.overrides], Path(args.out) / method, args.quiet))
    table = format_comparison_table(results)
    print("\n" + table)
    (Path(args.out) / "comparison.md").write_text("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
