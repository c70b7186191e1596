"""Inject faults into the same experiment and tabulate what the server survived.

    python simulations/fault_table.py                      # replay on digits, 10 clients, 5 tasks
    python simulations/fault_table.py -- method=duallora   # any method, any overrides

Each scenario runs through the `fedcl` entry point into <out>/<scenario>/; the table (faults
injected, rounds completed and those in which no update passed, failures recorded by kind, final
accuracy and its change from the clean run) is printed and written to <out>/faults.md.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from fedcl_runs import run_fedcl

from fedcl.report import text_table

SCENARIOS = {
    "clean": [],
    "crash 20% + nan 10%": ["faults.crash=0.2", "faults.corrupt=0.1", "faults.corrupt_kinds=[nan]"],
    "corrupt 30% (nan/inf/shape/norm)": ["faults.corrupt=0.3"],
    "crash 50%": ["faults.crash=0.5"],
    "dropout 10% + straggle 10%": ["faults.dropout=0.1", "faults.straggle=0.1", "faults.deadline_s=20"],
    "norm 20% (no norm check)": ["faults.corrupt=0.2", "faults.corrupt_kinds=[norm]", "strategy.max_norm_ratio=null"],
    "norm 20% + median (no norm check)": ["faults.corrupt=0.2", "faults.corrupt_kinds=[norm]",
                                        "strategy.max_norm_ratio=null", "aggregator=median"],
    "norm 20% + krum (no norm check)": ["faults.corrupt=0.2", "faults.corrupt_kinds=[norm]",
                                      "strategy.max_norm_ratio=null", "aggregator=krum", "aggregator.byzantine=2"],
    "norm 20% + multi-krum (no norm check)": ["faults.corrupt=0.2", "faults.corrupt_kinds=[norm]",
                                            "strategy.max_norm_ratio=null", "aggregator=krum",
                                            "aggregator.byzantine=2", "aggregator.multi=6"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/fault_table")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated names from SCENARIOS")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already have a results.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    rows, clean = [], None
    for name in args.scenarios.split(","):
        run_dir = Path(args.out) / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        r = run_fedcl(["method=replay", *args.overrides, *SCENARIOS[name]], run_dir, reuse=args.reuse)
        acc = 100 * r["final_average_accuracy"]
        clean = acc if name == "clean" else clean
        kinds = Counter(f["kind"] for f in r["failures"])
        per_round = r["communication"]["per_round"]
        rows.append([name, str(len(per_round)), str(sum(1 for p in per_round if p["clients_ok"] == 0)),
                     " ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "-",
                     f"{acc:.1f}", "-" if clean is None or name == "clean" else f"{acc - clean:+.1f}",
                     f"{r['wall_time_s']:.0f}"])
    table = text_table(["faults injected", "rounds completed", "rounds w/o update", "failures recorded",
                        "final acc %", "change pts", "time s"], rows)
    print("\n" + table)
    (Path(args.out) / "faults.md").write_text("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
