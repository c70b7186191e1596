"""Privacy sweep: noise multipliers x per-client budgets -> accuracy vs epsilon, and the MIA audit.

    python simulations/privacy_sweep.py --quiet
    python simulations/privacy_sweep.py --sigmas 0,1 --budgets 4 -- num_clients=4 rounds_per_task=1

Every run has two groups of clients: group A (the first half of the ids) uses noise multiplier
sigma_A; group B (the rest) has a per-client budget epsilon_B and gets the noise that spends it
over its planned messages (calibrated with Opacus' accountant). Each (sigma_A, epsilon_B) pair is
one `fedcl` run (one Ray session each) into <out>/sA<sigma>_eB<eps>/, plus a reference run
without privacy. The table goes to <out>/privacy_sweep.md, every number to <out>/sweep.json,
the plot (accuracy and MIA AUC vs epsilon) to <out>/privacy_sweep.png.

sigma_A = 0 means clipping only: no guarantee (epsilon = inf), but the audit still runs.
"basis AUC" is the basis-residual attack on the clients' task-key bases (all clients); with
privacy.bases=raw (the default here) epsilon does not cover those bases.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from fedcl_runs import run_fedcl

from fedcl.report import plt, text_table

# the sweep's default setting: the DualLoRA headline on a ViT small enough for CPU sweeps; the
# base session (task 0) stands for public pre-training, so DP covers tasks 1.. (adapters, head rows)
DEFAULTS = ["method=duallora", "model.depth=2", "model.embed_dim=32", "num_clients=6", "rounds_per_task=2",
            "local_epochs=3", "ray.num_cpus=2"]
PRIVACY_DEFAULTS = ["privacy.start_task=1", "privacy.clip_norm=0.5"]


def merged(*lists: list[str]) -> list[str]:
    """Overrides with one value per key, later lists winning."""
    out: dict[str, str] = {}
    for item in (o for lst in lists for o in lst):
        out[item.split("=", 1)[0]] = item
    return list(out.values())


def run(out: Path, name: str, overrides: list[str], quiet: bool) -> dict:
    """One run of the sweep into <out>/<name>/ (kept if it already finished)."""
    return run_fedcl(overrides, out / name, quiet, reuse=True)


def group_stats(privacy: dict, ids: list[int]) -> dict:
    clients = [privacy["clients"][str(c)] for c in ids]
    auc = [c["mia_auc"] for c in clients if c.get("mia_auc") is not None and not math.isnan(c["mia_auc"])]
    cal = [c["mia_calibrated_auc"] for c in clients
           if c.get("mia_calibrated_auc") is not None and not math.isnan(c["mia_calibrated_auc"])]
    return {"epsilon": max(c["epsilon"] for c in clients),
            "sigma": float(np.mean([c["noise_multiplier"] for c in clients])),
            "steps": float(np.mean([c["steps"] for c in clients])),
            "exhausted": sum(c["exhausted"] for c in clients),
            "mia_auc": float(np.mean(auc)) if auc else float("nan"),
            "mia_calibrated_auc": float(np.mean(cal)) if cal else float("nan")}


def fmt(x: float, digits: int = 2) -> str:
    return "inf" if math.isinf(x) else ("-" if math.isnan(x) else f"{x:.{digits}f}")


def plot(path: Path, rows: list[dict], reference: float) -> None:
    finite = [r[g]["epsilon"] for r in rows for g in ("A", "B") if math.isfinite(r[g]["epsilon"])]
    inf_x = 10 ** math.ceil(math.log10(max(finite) * 3)) if finite else 1e3
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for budget in sorted({r["eps_B"] for r in rows}):
        sub = sorted((r for r in rows if r["eps_B"] == budget), key=lambda r: r["epsilon_max"])
        xs = [r["epsilon_max"] if math.isfinite(r["epsilon_max"]) else inf_x for r in sub]
        ax1.plot(xs, [100 * r["final_acc"] for r in sub], marker="o", label=f"group B budget eps={budget:g}")
    ax1.axhline(100 * reference, color="grey", linestyle="--", linewidth=1, label="no privacy")
    for g, marker in (("A", "o"), ("B", "s")):
        pts = [(r[g]["epsilon"] if math.isfinite(r[g]["epsilon"]) else inf_x, r[g]["mia_auc"]) for r in rows]
        ax2.scatter(*zip(*pts), marker=marker, label=f"group {g} (loss attack)")
        pts = [(r[g]["epsilon"] if math.isfinite(r[g]["epsilon"]) else inf_x, r[g]["mia_calibrated_auc"]) for r in rows]
        ax2.scatter(*zip(*pts), marker=marker, facecolors="none", edgecolors="k", label=f"group {g} (calibrated)")
    ax2.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    basis = [r["basis_mia_auc"] for r in rows if r.get("basis_mia_auc") is not None]
    if basis:  # the task-key bases: same for every noise level when they are sent raw
        ax2.axhline(float(np.mean(basis)), color="red", linewidth=1, label="basis-residual attack (bases)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel(f"epsilon (delta={rows[0]['delta']:g}); rightmost = inf (clip only)")
    ax1.set_ylabel("final average accuracy (%)")
    ax1.set_title("accuracy vs worst client's epsilon")
    ax2.set_ylabel("membership-inference AUC")
    ax2.set_title("audit per group vs its epsilon")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", default="0,0.3,1,3", help="group A noise multipliers")
    parser.add_argument("--budgets", default="2,16", help="group B per-client target epsilons")
    parser.add_argument("--out", default="outputs/privacy_sweep")
    parser.add_argument("--quiet", action="store_true", help="hide each run's progress and summary")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run (after the defaults)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    user = [o for o in args.overrides if not o.startswith("privacy.")]
    user_privacy = [o for o in args.overrides if o.startswith("privacy.")]
    base = merged(DEFAULTS, user)
    n = int(next(o.split("=", 1)[1] for o in base if o.startswith("num_clients=")))
    group_a, group_b = list(range(n // 2)), list(range(n // 2, n))
    reference = run(out, "no_privacy", [*base, "privacy=none"], args.quiet)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for sigma in [float(s) for s in args.sigmas.split(",")]:
            groups = (f"privacy.groups=[{{clients:[{','.join(map(str, group_b))}],"
                      f"noise_multiplier:null,target_epsilon:{budget}}}]")
            r = run(out, f"sA{sigma:g}_eB{budget:g}",
                    merged(base, ["privacy=client_dp"], PRIVACY_DEFAULTS, user_privacy,
                           [f"privacy.noise_multiplier={sigma}", groups]), args.quiet)
            p = r["privacy"]
            rows.append({"sigma_A": sigma, "eps_B": budget, "final_acc": r["final_average_accuracy"],
                         "avg_inc_acc": r["average_incremental_accuracy"], "epsilon_max": p["epsilon_max"],
                         "delta": p["delta"], "basis_mia_auc": p.get("basis_mia_auc_mean"),
                         "A": group_stats(p, group_a), "B": group_stats(p, group_b)})
    header = ["sigma_A", "eps_B budget", "eps_A", "eps_B", "sigma_B (calibrated)", "B exhausted",
              "final acc %", "avg inc acc %", "MIA AUC A", "MIA AUC B", "calib. AUC A", "calib. AUC B",
              "basis AUC"]
    table = text_table(header, [
        [fmt(r["sigma_A"]), fmt(r["eps_B"], 0), fmt(r["A"]["epsilon"]), fmt(r["B"]["epsilon"]), fmt(r["B"]["sigma"], 3),
         f"{r['B']['exhausted']}/{len(group_b)}", f"{100 * r['final_acc']:.1f}", f"{100 * r['avg_inc_acc']:.1f}",
         fmt(r["A"]["mia_auc"]), fmt(r["B"]["mia_auc"]), fmt(r["A"]["mia_calibrated_auc"]),
         fmt(r["B"]["mia_calibrated_auc"]),
         fmt(r["basis_mia_auc"] if r["basis_mia_auc"] is not None else float("nan"))] for r in rows])
    ref = (f"no privacy: final acc {100 * reference['final_average_accuracy']:.1f}%, "
           f"avg inc acc {100 * reference['average_incremental_accuracy']:.1f}%")
    print("\n" + table + "\n" + ref)
    settings = " ".join(merged(base, PRIVACY_DEFAULTS, user_privacy))
    (out / "privacy_sweep.md").write_text(f"`{settings}`\n\n```\n{table}\n{ref}\n```\n")
    summary = {"overrides": merged(base, PRIVACY_DEFAULTS, user_privacy), "rows": rows,
               "reference": {"final_acc": reference["final_average_accuracy"],
                             "avg_inc_acc": reference["average_incremental_accuracy"]}}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    plot(out / "privacy_sweep.png", rows, reference["final_average_accuracy"])
    print(f"table: {out / 'privacy_sweep.md'}  plot: {out / 'privacy_sweep.png'}")


if __name__ == "__main__":
    main()
