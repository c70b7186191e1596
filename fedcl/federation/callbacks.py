"""The server callbacks every run has: progress lines, metrics.csv, the checkpoint, results.json."""
from __future__ import annotations

import time
from pathlib import Path

from fedcl import report
from fedcl.federation import checkpoint
from fedcl.federation.hooks import ServerCallback
from fedcl.federation.server_state import pack


class Progress(ServerCallback):
    """One line per round on stdout (``progress=true``)."""

    def on_round_end(self, strategy, plan, row):
        failed = f" ({row['clients_failed']} failed)" if row["clients_failed"] else ""
        phases = sum(1 for p in strategy.plans if p.task == plan.task)
        print(f"[task {plan.task + 1}/{strategy.num_tasks} round {plan.round + 1}/{phases} {plan.phase}] clients "
              f"{row['clients_ok']}/{row['clients_sampled']}{failed} | acc seen {100 * row['accuracy_seen']:5.1f}%"
              f" | up {row['uplink_bytes'] / 1e6:.2f} MB down {row['downlink_bytes'] / 1e6:.2f} MB"
              f" | {row['round_time_s']:.1f}s", flush=True)
        return {}


class MetricsFile(ServerCallback):
    """``metrics.csv``: one row per round, rewritten after each round."""

    def on_checkpoint(self, strategy):
        report.write_metrics_csv(Path(strategy.run_dir) / "metrics.csv", strategy.state.rows)


class Checkpointer(ServerCallback):
    """``checkpoint/server.pt`` after every round: the server state and every callback's state."""

    def on_checkpoint(self, strategy):
        elapsed = strategy.state.elapsed_s + time.monotonic() - strategy.started
        server = strategy.state.state_dict()
        server["elapsed_s"] = elapsed
        checkpoint.save(strategy.run_dir, {"server": server,
                                           "callbacks": [pack(cb.state_dict()) for cb in strategy.callbacks]})


class ResultsWriter(ServerCallback):
    """results.json, the plots, and the method's export (LoRA methods: PEFT adapters). Runs last."""

    def on_run_end(self, strategy, results):
        out = Path(strategy.run_dir)
        strategy.method.export(strategy.model, out / "adapters")
        report.write_json(out / "results.json", results)
        report.plot_accuracy_matrix(out / "accuracy_matrix.png", results["accuracy_matrix"], title=strategy.method.name)
        report.plot_accuracy_curve(out / "accuracy_curve.png", strategy.state.rows)
