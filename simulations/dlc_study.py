"""DLC against its base and against its base given the same number of rounds (round-matched), with
the diagnostics that say where DLC's accuracy comes from.

For each setting and seed: DLC on a replay base and on an iCaRL base, and each base alone given
DLC's number of rounds (round-matched), so that a gain is not just more training: with
``method.rounds=shared`` (the default) DLC trains beside the base in the base's own rounds, so the
round-matched base is the base; with ``method.rounds=extra`` the base gets ``rounds_per_task`` raised
by DLC's 3 extra rounds per task (plugin + weighting + calibrate). DLC's own run also reports its
base at the same rounds (the base is untouched by DLC: ``base`` in the diagnostics), the plugin path
alone, the plugin path's head on the base feature (``plugins_off``) and on each sample's own plugin
(``oracle_plugin``), the weighting unit's task identification, the mix chosen after each task and
each plugin's ||B A|| / ||W||.

    python simulations/dlc_study.py --setting synthetic16 --seeds 0,1,2 --out outputs/dlc_study
    python simulations/dlc_study.py --setting fashion_cnn --seeds 0 --fedcl   # through Flower + Ray

Runs go through an in-process copy of the server loop (``simulate``: the same method hooks and
seeds as ``fedcl``, every client every round, no Flower or Ray) unless ``--fedcl``: on a 2-core CPU
it spares shipping a whole ResNet-18 per client and round. Writes <out>/<setting>/table.md + json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fedcl_runs import run_fedcl

FASHION = ["dataset=fashion_mnist", "dataset.root=/usr/share/datasets/fashion-mnist"]
SETTINGS = {
    # ResNet-18 (CIFAR stem) on generated 16 px images: 20 classes, 5 tasks, 10 clients
    "synthetic16": ["model=resnet18", "dataset=synthetic", "dataset.channels=3", "dataset.num_classes=20",
                    "dataset.train_per_class=50", "dataset.image_size=16", "num_tasks=5", "num_clients=10",
                    "local_epochs=2", "rounds_per_task=2", "method.memory_total=200"],
    # the small CNN on Split Fashion-MNIST, 1,000 per class, the default schedule
    "fashion_cnn": [*FASHION, "dataset.train_per_class=1000"],
    # ResNet-18 (CIFAR stem) on Split Fashion-MNIST at 16 px, 300 per class (CPU-sized; at 100 per class and
    # 28 px the base stayed at chance on the first task)
    "fashion_resnet18": [*FASHION, "model=resnet18", "dataset.image_size=16", "dataset.train_per_class=300",
                         "dataset.test_per_class=200", "local_epochs=2", "rounds_per_task=3",
                         "method.memory_total=500"],
}


def extra_rounds(overrides: list[str]) -> int:
    """DLC's rounds per task beyond the base's: none when it shares them, else plugin + weighting +
    calibrate (the defaults)."""
    return 3 if "method.rounds=extra" in overrides else 0


def simulate(overrides: list[str], run_dir: Path) -> dict:
    """The server loop of ``fedcl`` in one process, without Flower and Ray: every client in every
    round (``fraction_train=1``), the same method hooks (downlink, client_update, payload, aggregate),
    the same seeds, a fresh client model per message as a Ray worker builds it. On a loaded 2-core
    machine it spares the transport of the whole base (45 MB per client and direction) each round.
    Writes ``results.json`` (accuracy matrix, summary, parameters, wall time) and ``server.pt``."""
    from omegaconf import OmegaConf

    from fedcl import metrics
    from fedcl.client.app import client_round
    from fedcl.config import compose_config
    from fedcl.experiment import derive_seed, get_experiment
    from fedcl.server.evaluation import evaluate_tasks

    started = time.monotonic()
    cfg = compose_config(overrides)
    exp = get_experiment(cfg)
    method, seed = exp.method, int(cfg.seed)
    server = exp.new_model()
    g = method.init_global(server)
    states = [{} for _ in range(int(cfg.num_clients))]
    matrix, uplink = [], 0
    T = int(cfg.num_tasks)
    for task in range(T):
        for rnd, phase in enumerate(method.phases(task, int(cfg.rounds_per_task))):
            replies = []
            for c in range(int(cfg.num_clients)):
                model = exp.new_model()
                method.load_payload(model, method.downlink(g, task, phase, c))
                ctx = client_round(cfg, c, task, rnd, phase)
                torch.manual_seed(derive_seed(seed, task, rnd, c, 1))
                n = method.client_update(model, ctx, states[c])
                if n > 0:
                    up = method.payload(model, ctx)
                    replies.append(({k: v.detach().cpu().numpy().copy() for k, v in up.items()}, n))
                    uplink += sum(v.numel() * v.element_size() for v in up.values())
            if replies:
                g = method.aggregate(g, replies, task, phase)
        method.load_payload(server, g)
        per_task, seen_accuracy = evaluate_tasks(exp, server, task)
        matrix.append(per_task + [None] * (T - task - 1))
        print(f"  task {task}: {' '.join(f'{100 * a:.1f}' for a in per_task)}  ({time.monotonic() - started:.0f} s)",
              flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"config": OmegaConf.to_container(cfg, resolve=True), "accuracy_matrix": matrix,
               **metrics.summarize(matrix), "final_accuracy_seen": seen_accuracy,
               "num_clients": int(cfg.num_clients),
               "parameters": method.parameter_counts(server), "wall_time_s": time.monotonic() - started,
               "communication": {"uplink_bytes": uplink}}
    if (diagnostics := method.report(server, exp, g)) is not None:
        results["diagnostics"] = diagnostics
    torch.save({"global": g, "overrides": overrides}, run_dir / "server.pt")
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def rounds(overrides: list[str]) -> int:
    return int(next((o.split("=")[1] for o in reversed(overrides) if o.startswith("rounds_per_task=")), 5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="synthetic16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bases", default="replay,icarl")
    ap.add_argument("--out", type=Path, default=Path("outputs/dlc_study"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--fedcl", action="store_true", help="run the real `fedcl` (Flower + Ray) instead")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to the setting's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    common = [*SETTINGS[args.setting], *args.overrides]
    matched = f"rounds_per_task={rounds(common) + extra_rounds(common)}"
    out = args.out / args.setting
    rows = {}
    for base in args.bases.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            runs = {}
            for label, extra in (("dlc", ["method=dlc", f"method.base={base}"]),
                                 ("matched", [f"method={base}", matched])):
                run_dir = out / f"{label}_{base}_s{seed}"
                overrides = [*common, *extra, f"seed={seed}"]
                if args.fedcl:
                    runs[label] = run_fedcl(overrides, run_dir, reuse=True)
                elif (run_dir / "results.json").exists():
                    runs[label] = json.loads((run_dir / "results.json").read_text())
                else:
                    runs[label] = simulate(overrides, run_dir)
            d, p = runs["dlc"]["diagnostics"], runs["dlc"]["parameters"]
            rows.setdefault(base, []).append({
                "seed": seed, "base": d["base"], "matched": runs["matched"]["final_accuracy_seen"],
                "matched_final_average": runs["matched"]["final_average_accuracy"],
                "dlc_final_average": runs["dlc"]["final_average_accuracy"], **{k: d[k] for k in (
                    "dlc", "plugin_path", "plugins_off", "oracle_plugin", "task_id")},
                "mix_by_task": d["mix_by_task"], "temperature_by_task": d.get("temperature_by_task"),
                "plugin_relative_norm": d["plugin_relative_norm"],
                "added_fraction": p["added_fraction"],
                "uplink_mb": runs["dlc"]["communication"]["uplink_bytes"] / 1e6,
                "matched_uplink_mb": runs["matched"]["communication"]["uplink_bytes"] / 1e6})
            r = rows[base][-1]
            print(f"{base} seed {seed}: base {100 * r['base']:.1f}  matched {100 * r['matched']:.1f}  "
                  f"DLC {100 * r['dlc']:.1f}  (plugin path {100 * r['plugin_path']:.1f}, plugins off "
                  f"{100 * r['plugins_off']:.1f}, oracle {100 * r['oracle_plugin']:.1f}, task id "
                  f"{100 * r['task_id']:.1f}; mix {r['mix_by_task']}, temperature {r['temperature_by_task']})",
                  flush=True)
    table = markdown(rows)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps({"setting": common, "rows": rows}, indent=1))


def markdown(rows: dict) -> str:
    """Accuracy over all test samples after the last task (PyCIL style), mean ± std over seeds."""
    cols = [("base", "base"), ("matched", "round-matched base"), ("dlc", "DLC"), ("plugin_path", "plugin path"),
            ("plugins_off", "plugins off"), ("oracle_plugin", "oracle plugin"), ("task_id", "task id")]
    lines = ["| base method | " + " | ".join(h for _, h in cols) + " | added params | uplink MB (DLC / matched) |",
             "|" + " --- |" * (len(cols) + 3)]
    for base, runs in rows.items():
        lines.append(f"| {base} | " + " | ".join("{:.1f} ± {:.1f}".format(*ms([100 * r[k] for r in runs]))
                                                 for k, _ in cols) +
                     f" | {100 * runs[0]['added_fraction']:.2f}% | "
                     f"{ms([r['uplink_mb'] for r in runs])[0]:.1f} / "
                     f"{ms([r['matched_uplink_mb'] for r in runs])[0]:.1f} |")
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs})
    lines.append(f"\nmean ± std over seeds {', '.join(map(str, seeds))}")
    return "\n".join(lines)


def ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


if __name__ == "__main__":
    main()
