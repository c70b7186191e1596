"""DLC against its own base: run `fedcl method=dlc` variants and split each final accuracy into
where it comes from (``DLC.diagnostics`` on the run's final global model, all test samples).

The base is the base method's own backbone + head inside the same run (the plugin path never trains
it), so one DLC run gives both numbers. ``plugins_off`` is DLC's head on the base feature alone
(every plugin's scale set to 0 at evaluation): what the head is worth without the plugins.

    python simulations/dlc_study.py --out runs/dlc_study                          # every variant, 32 px
    python simulations/dlc_study.py --out runs/dlc_study --setting 16px default   # one variant
    python simulations/dlc_study.py --diagnose <run dir>             # an existing run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fedcl_runs import run_fedcl

COMMON = ["method=dlc", "model=resnet18", "dataset=synthetic", "dataset.channels=3", "dataset.num_classes=20",
          "dataset.train_per_class=50", "num_tasks=5", "num_clients=10", "local_epochs=2"]
SETTINGS = {  # what the shared 2-core machine (load ~20) ran: 32px took ~1000 s of wall time per task
    "32px": [*COMMON, "dataset.image_size=32", "rounds_per_task=2"],
    "16px": [*COMMON, "dataset.image_size=16", "rounds_per_task=1"],
}
VARIANTS = {
    "default": [],
    "layer3+4": ["method.stages=[layer3,layer4]"],
    "freeze1": ["method.freeze_base_after=1"],   # plugins of tasks 2-4 on a base frozen after task 1
}


def simulate(overrides: list[str], run_dir: Path) -> dict:
    """The server loop of ``fedcl`` in one process, without Flower and Ray: every client in every
    round (``fraction_train=1``), the same method hooks (downlink, client_update, payload, aggregate),
    the same seeds, a fresh client model per message as a Ray worker builds it. On a loaded 2-core
    machine it spares the transport of the whole base (45 MB per client and direction) each round.
    Writes ``results.json`` (accuracy matrix, summary, parameters, wall time) and ``server.pt``."""
    from omegaconf import OmegaConf

    from fedcl import metrics
    from fedcl.experiment import derive_seed, get_experiment
    from fedcl.federation.client_app import client_round
    from fedcl.federation.evaluation import evaluate_tasks
    from fedcl.federation.run_config import compose_config

    started = time.monotonic()
    cfg = compose_config(overrides)
    exp = get_experiment(cfg)
    method, seed = exp.method, int(cfg.seed)
    server = exp.new_model()
    g = method.init_global(server)
    states = [{} for _ in range(int(cfg.num_clients))]
    matrix = []
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
            if replies:
                g = method.aggregate(g, replies, task, phase)
        method.load_payload(server, g)
        per_task, _ = evaluate_tasks(exp, server, task)
        matrix.append(per_task + [None] * (T - task - 1))
        print(f"  task {task}: {' '.join(f'{100 * a:.1f}' for a in per_task)}  ({time.monotonic() - started:.0f} s)",
              flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"config": OmegaConf.to_container(cfg, resolve=True), "accuracy_matrix": matrix,
               **metrics.summarize(matrix), "num_clients": int(cfg.num_clients),
               "parameters": method.parameter_counts(server), "wall_time_s": time.monotonic() - started}
    if (diagnostics := method.report(server, exp, g)) is not None:
        results["diagnostics"] = diagnostics
    torch.save({"global": g, "overrides": overrides}, run_dir / "server.pt")
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


@torch.no_grad()
def diagnose(run_dir: Path) -> dict:
    """``DLC.diagnostics`` of a finished run (this script's or a ``fedcl`` run directory) on the
    test samples of all tasks, shuffled together, plus ``plugins_off``."""
    from fedcl.experiment import get_experiment
    from fedcl.federation import checkpoint
    from fedcl.federation.run_config import compose_config

    if (run_dir / "server.pt").exists():
        saved = torch.load(run_dir / "server.pt", weights_only=False)
        cfg = compose_config(saved["overrides"])
    else:
        cfg = checkpoint.load_config(run_dir)
        saved = torch.load(run_dir / checkpoint.FOLDER / "server.pt", weights_only=False)
    exp = get_experiment(cfg)
    model = exp.new_model()
    exp.method.load_payload(model, saved["global"])
    tasks = int(cfg.num_tasks)
    rows = np.concatenate(exp.scenario.test_indices[:tasks])
    rows = rows[np.random.default_rng([int(cfg.seed), 3, tasks]).permutation(len(rows))]
    x, y = exp.test_images(rows), torch.from_numpy(exp.scenario.y_test[rows])
    task = exp.method.task_of(y)
    out = exp.method.diagnostics(model, x, y, tasks)
    out["per_task"] = [exp.method.diagnostics(model, x[task == j], y[task == j], tasks) for j in range(tasks)]
    for layer in model.layers():  # every f_t becomes the base's feature
        layer.scaling = 0.0
    out["plugins_off"] = exp.method.diagnostics(model, x, y, tasks)["dlc"]
    for j, d in enumerate(out["per_task"]):
        d["plugins_off"] = exp.method.diagnostics(model, x[task == j], y[task == j], tasks)["dlc"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("runs/dlc_study"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", choices=list(SETTINGS), default="32px")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (run variants side by side)")
    ap.add_argument("--fedcl", action="store_true", help="run the real `fedcl` (Flower + Ray) instead")
    ap.add_argument("--diagnose", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.diagnose is not None:
        print(json.dumps(diagnose(args.diagnose), indent=1))
        return
    for name in args.variants:
        run_dir = args.out / f"{args.setting}_{name}_s{args.seed}"
        overrides = [*SETTINGS[args.setting], *VARIANTS[name], f"seed={args.seed}"]
        res = run_fedcl(overrides, run_dir, reuse=True) if args.fedcl else simulate(overrides, run_dir)
        d = diagnose(run_dir)
        p = res["parameters"]
        row = {"variant": name, **d, "final_average_accuracy":
               res["final_average_accuracy"], "added_fraction": p["added_fraction"], "wall_time_s": res["wall_time_s"]}
        (run_dir / "diagnostics.json").write_text(json.dumps(row, indent=1))
        print(f"| {name} | {100 * d['base']:.1f} | {100 * d['dlc']:.1f} | {100 * d['plugins_off']:.1f} | "
              f"{100 * d['task_id']:.1f} | {100 * d['oracle_plugin']:.1f} | {100 * p['added_fraction']:.2f}% | "
              f"{res['wall_time_s']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
