"""Writing a run's results: results.json and metrics.csv (atomically), plots, terminal tables."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file beside ``path`` then rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path, obj) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, default=_default))


def write_metrics_csv(path, rows: list[dict]) -> None:
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path, buf.getvalue())


def plot_accuracy_matrix(path, matrix: list[list[float | None]], title: str = "") -> None:
    values = np.array([[np.nan if v is None else 100 * v for v in row] for row in matrix], float)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * values.shape[1], 1 + 0.6 * values.shape[0]))
    ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for (t, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, t, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.set_title(f"accuracy (%) {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy_curve(path, rows: list[dict], label: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["global_round"] for r in rows]
    ax.plot(x, [100 * r["accuracy_seen"] for r in rows], marker=".", label=label)
    for prev, cur in zip(rows, rows[1:]):
        if cur["task"] != prev["task"]:
            ax.axvline(prev["global_round"] + 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("global round")
    ax.set_ylabel("accuracy on seen tasks (%)")
    ax.set_ylim(0, 100)
    if label:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLUMNS = ("method", "clients", "tasks", "final acc %", "avg inc acc %", "forgetting pts",
           "BWT pts", "up MB", "down MB", "time s")


def _summary_cells(r: dict) -> list[str]:
    cfg, comm = r["config"], r["communication"]
    return [str(cfg["method"]["name"]), str(cfg["num_clients"]), str(cfg["num_tasks"]),
            f"{100 * r['final_average_accuracy']:.1f}", f"{100 * r['average_incremental_accuracy']:.1f}",
            f"{100 * r['forgetting']:.1f}", f"{100 * r['backward_transfer']:.1f}",
            f"{comm['uplink_bytes'] / 1e6:.2f}", f"{comm['downlink_bytes'] / 1e6:.2f}",
            f"{r['wall_time_s']:.1f}"]


def _table(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_comparison_table(results_list: list[dict]) -> str:
    return _table(COLUMNS, [_summary_cells(r) for r in results_list])


def format_summary_table(results: dict) -> str:
    matrix = results["accuracy_matrix"]
    grid = [[f"after task {t}"] + ["" if v is None else f"{100 * v:.1f}" for v in row]
            for t, row in enumerate(matrix)]
    header = ["accuracy %"] + [f"task {j}" for j in range(len(matrix[0]))]
    return format_comparison_table([results]) + "\n\n" + _table(header, grid)
