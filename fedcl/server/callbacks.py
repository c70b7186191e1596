"""The server callbacks every run has: the run directory, progress lines, metrics.csv, the
checkpoint, results.json. Each sees only the read-only reports of ``fedcl.server.reports``."""
from __future__ import annotations

import shutil
from pathlib import Path

from fedcl import report
from fedcl.hooks import ServerCallback
from fedcl.server import checkpoint


class RunDirectory(ServerCallback):
    """A new run starts from fresh clients and records its config (what ``fedcl resume`` reads)."""

    def on_run_start(self, run):
        out = Path(run.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not run.resumed_after:
            for folder in ("client_state", "shared"):
                shutil.rmtree(out / folder, ignore_errors=True)
            checkpoint.save_config(out, run.cfg)


class Progress(ServerCallback):
    """One line per round on stdout (``progress=true``)."""

    def on_run_start(self, run):
        if run.resumed_after:
            print(f"resuming {run.run_dir} after global round {run.resumed_after}", flush=True)

    def on_round_end(self, r):
        row, plan = r.row, r.plan
        failed = f" ({row['clients_failed']} failed)" if row["clients_failed"] else ""
        print(f"[task {plan.task + 1}/{r.run.cfg.num_tasks} round {plan.round + 1}/{r.rounds_in_task} {plan.phase}] "
              f"clients {row['clients_ok']}/{row['clients_sampled']}{failed} | acc seen "
              f"{100 * row['accuracy_seen']:5.1f}% | up {row['uplink_bytes'] / 1e6:.2f} MB down "
              f"{row['downlink_bytes'] / 1e6:.2f} MB | {row['round_time_s']:.1f}s", flush=True)
        return {}


class MetricsFile(ServerCallback):
    """``metrics.csv``: one row per round, rewritten after each round."""

    def on_checkpoint(self, r):
        report.write_metrics_csv(Path(r.run.run_dir) / "metrics.csv", [*map(dict, r.rows), dict(r.row)])


class Checkpointer(ServerCallback):
    """``checkpoint/server.pt`` after every round: the server state and every callback's state."""

    def on_checkpoint(self, r):
        checkpoint.save(r.run.run_dir, r.checkpoint())


class ResultsWriter(ServerCallback):
    """results.json, the plots, and the method's export (LoRA methods: PEFT adapters). Runs last."""

    def on_run_end(self, end, results):
        out = Path(end.run.run_dir)
        end.experiment.method.export(end.model, out / "adapters")
        report.write_json(out / "results.json", results)
        report.plot_accuracy_matrix(out / "accuracy_matrix.png", results["accuracy_matrix"],
                                    title=end.experiment.method.name)
        report.plot_accuracy_curve(out / "accuracy_curve.png", [dict(row) for row in end.rows])
