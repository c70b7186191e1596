"""Methods x seeds through `fedcl`, summarised as mean ± std over the seeds.

    python simulations/results_table.py --methods finetune,replay,joint --seeds 0,1,2 \
        --out outputs/fashion -- dataset=fashion_mnist dataset.root=/usr/share/datasets/fashion-mnist \
        dataset.train_per_class=1000

Each run goes through the `fedcl` entry point into <out>/<label>/seed<S>/ (a run that already has
its results.json is reused, so an interrupted grid resumes). A method may carry its own overrides
after a colon, e.g. ``--methods "replay,replay8:method=replay rounds_per_task=8"`` (label replay8).
Writes <out>/table.md (Markdown) and <out>/table.json (every run's figures and the summary).
Statistics: std is the sample standard deviation over seeds (n - 1); accuracies are
``final_average_accuracy`` (mean over tasks after the last one, Mammoth style),
``average_incremental_accuracy``, ``forgetting`` (Chaudhry), ``final_accuracy_seen`` (over all test
samples, PyCIL style), uplink MB over the run, and wall time.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedcl_runs import run_fedcl

COLUMNS = [  # (key in the summary, header, scale, digits)
    ("final_average_accuracy", "final acc %", 100, 1),
    ("average_incremental_accuracy", "avg inc acc %", 100, 1),
    ("forgetting", "forgetting pts", 100, 1),
    ("final_accuracy_seen", "acc all seen %", 100, 1),
    ("uplink_mb", "uplink MB", 1, 2),
    ("wall_time_s", "wall s", 1, 0),
]


def parse_methods(spec: str) -> list[tuple[str, list[str]]]:
    """'a,b:x=1 y=2' -> [(a, [method=a]), (b, [x=1, y=2])]: a label and the overrides that make it."""
    out = []
    for item in spec.split(","):
        label, _, extra = item.partition(":")
        out.append((label.strip(), extra.split() if extra else [f"method={label.strip()}"]))
    return out


def figures(results: dict) -> dict:
    return {"final_average_accuracy": results["final_average_accuracy"],
            "average_incremental_accuracy": results["average_incremental_accuracy"],
            "forgetting": results["forgetting"], "final_accuracy_seen": results["final_accuracy_seen"],
            "uplink_mb": results["communication"]["uplink_bytes"] / 1e6, "wall_time_s": results["wall_time_s"],
            "accuracy_matrix": results["accuracy_matrix"],
            **({"diagnostics": results["diagnostics"]} if "diagnostics" in results else {})}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(summary: dict) -> str:
    head = "| method | " + " | ".join(h for _, h, _, _ in COLUMNS) + " | seeds |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for label, cols in summary.items():
        cells = [f"{scale * m:.{d}f} ± {scale * s:.{d}f}" for (key, _, scale, d) in COLUMNS
                 for m, s in [cols[key]]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(map(str, cols['seeds']))} |")
    lines.append("\nmean ± std over the seeds of each row (sample std; 0 with one seed)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="finetune,replay,joint")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="outputs/results_table")
    parser.add_argument("--existing", action="store_true",
                        help="summarise the runs already in --out, start none (a row names the seeds it has)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    runs, summary = {}, {}
    for label, extra in parse_methods(args.methods):
        runs[label] = {}
        for seed in seeds:
            run_dir = out / label / f"seed{seed}"
            if args.existing and not (run_dir / "results.json").exists():
                continue
            res = run_fedcl([*args.overrides, *extra, f"seed={seed}"], run_dir, reuse=True)
            runs[label][seed] = figures(res)
            print(f"{label} seed {seed}: final {100 * res['final_average_accuracy']:.1f}%  "
                  f"({res['wall_time_s']:.0f} s)", flush=True)
        if runs[label]:
            summary[label] = {key: mean_std([r[key] for r in runs[label].values()]) for key, _, _, _ in COLUMNS}
            summary[label]["seeds"] = sorted(runs[label])
    table = markdown(summary)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps({"overrides": args.overrides, "seeds": seeds, "runs": runs,
                                                "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
