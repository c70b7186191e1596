"""Writing a run's results: results.json and metrics.csv (atomically), plots, terminal tables."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # runs write PNGs on headless machines (Ray workers, CI): never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write a temp file beside ``path`` then rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _default(obj):
    """JSON encoder fallback: numpy scalars and arrays become plain Python values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path, obj) -> None:
    """results.json: indented, numpy-aware, atomic (serialised before the file is touched)."""
    atomic_write(path, json.dumps(obj, indent=2, default=_default) + "\n")


def write_metrics_csv(path, rows: list[dict]) -> None:
    """metrics.csv, one row per round; header = union of keys in first-seen order (later tasks
    add per-task columns), missing cells left empty."""
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _grid(matrix) -> np.ndarray:
    """The matrix in percent as a float array, None (and missing cells of ragged rows) as NaN."""
    width = max((len(row) for row in matrix), default=0)
    return np.array([[np.nan if v is None else 100 * float(v) for v in row] + [np.nan] * (width - len(row))
                     for row in matrix], float).reshape(len(matrix), width)


def plot_accuracy_matrix(path, matrix: list[list[float | None]], title: str = "") -> None:
    """Heatmap PNG of the accuracy matrix in percent; unseen tasks (None) stay blank."""
    values = _grid(matrix)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * values.shape[1], 1 + 0.6 * values.shape[0]))
    ax.imshow(values, vmin=0, vmax=100, cmap="viridis")  # NaN draws transparent
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
    """PNG of accuracy on all seen tasks vs global round; dashed lines where the task changes."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["global_round"] for r in rows], [100 * r["accuracy_seen"] for r in rows], marker=".", label=label)
    for prev, cur in zip(rows, rows[1:]):
        if cur["task"] != prev["task"]:
            ax.axvline((prev["global_round"] + cur["global_round"]) / 2, color="grey", linestyle="--", linewidth=0.8)
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


def _setting(cfg: dict, key: str):
    """A config value at the top level (Hydra's layout) or inside ``cfg["method"]``; "?" if absent."""
    method = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    return cfg.get(key, method.get(key, "?"))


def _summary_cells(r: dict) -> list[str]:
    cfg, comm = r["config"], r["communication"]
    return [str(cfg["method"]["name"]), str(_setting(cfg, "num_clients")), str(_setting(cfg, "num_tasks")),
            f"{100 * r['final_average_accuracy']:.1f}", f"{100 * r['average_incremental_accuracy']:.1f}",
            f"{100 * r['forgetting']:.1f}", f"{100 * r['backward_transfer']:.1f}",
            f"{comm['uplink_bytes'] / 1e6:.2f}", f"{comm['downlink_bytes'] / 1e6:.2f}",
            f"{r['wall_time_s']:.1f}"]


def text_table(header, rows) -> str:
    """Right-aligned columns separated by two spaces, with a dashed rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_comparison_table(results_list: list[dict]) -> str:
    """One line per run (results.json content), for comparing methods on the same setting."""
    return text_table(COLUMNS, [_summary_cells(r) for r in results_list])


def format_summary_table(results: dict) -> str:
    """A run's metrics line followed by its accuracy matrix in percent (blank = not yet seen)."""
    values = _grid(results["accuracy_matrix"])
    grid = [[f"after task {t}"] + ["" if np.isnan(v) else f"{v:.1f}" for v in row] for t, row in enumerate(values)]
    header = ["accuracy %"] + [f"task {j}" for j in range(values.shape[1])]
    return format_comparison_table([results]) + "\n\n" + text_table(header, grid)


SWEEP_COLUMNS = ("clients", "sampled/round", "final acc %", "forgetting pts", "up MB", "down MB",
                 "up kB/client-round", "time s")


def format_sweep_table(results_list: list[dict]) -> str:
    """One line per job of a client-count sweep, sorted by the number of clients."""
    rows = []
    for r in sorted(results_list, key=lambda r: r["num_clients"]):
        cfg, comm = r["config"], r["communication"]
        sampled = max(1, round(float(cfg.get("fraction_train", 1.0)) * r["num_clients"]))
        rows.append([str(r["num_clients"]), str(sampled), f"{100 * r['final_average_accuracy']:.1f}",
                     f"{100 * r['forgetting']:.1f}", f"{comm['uplink_bytes'] / 1e6:.2f}",
                     f"{comm['downlink_bytes'] / 1e6:.2f}", f"{comm['uplink_bytes_per_client_round'] / 1e3:.1f}",
                     f"{r['wall_time_s']:.1f}"])
    return text_table(SWEEP_COLUMNS, rows)


def plot_sweep(path, results_list: list[dict]) -> None:
    """PNG with accuracy, forgetting, bytes and wall time against the number of clients (log x)."""
    runs = sorted(results_list, key=lambda r: r["num_clients"])
    x = [r["num_clients"] for r in runs]
    panels = [("final average accuracy (%)", [100 * r["final_average_accuracy"] for r in runs]),
              ("forgetting (points)", [100 * r["forgetting"] for r in runs]),
              ("uplink + downlink (MB)", [(r["communication"]["uplink_bytes"]
                                           + r["communication"]["downlink_bytes"]) / 1e6 for r in runs]),
              ("wall time (s)", [r["wall_time_s"] for r in runs])]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (label, y) in zip(axes, panels):
        ax.plot(x, y, marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
