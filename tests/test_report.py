import csv
import json

import numpy as np

from fedcl import report

PNG = b"\x89PNG\r\n\x1a\n"


def test_json_round_trip_with_numpy(tmp_path):
    path = tmp_path / "sub" / "r.json"
    report.write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": None})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left


def test_csv_header_is_union_of_keys(tmp_path):
    path = tmp_path / "m.csv"
    report.write_metrics_csv(path, [{"round": 1, "acc_task_0": 0.5}, {"round": 2, "acc_task_0": 0.4, "acc_task_1": 0.9}])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["round", "acc_task_0", "acc_task_1"]
    assert rows[1]["acc_task_1"] == "0.9" and rows[0]["acc_task_1"] == ""


def test_plots_are_pngs(tmp_path):
    report.plot_accuracy_matrix(tmp_path / "m.png", [[0.9, None], [0.5, 0.8]])
    rows = [{"global_round": i + 1, "task": i // 2, "accuracy_seen": 0.5} for i in range(4)]
    report.plot_accuracy_curve(tmp_path / "c.png", rows)
    for name in ("m.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_summary_table_shows_the_numbers():
    results = {"config": {"method": {"name": "replay"}, "num_clients": 10, "num_tasks": 2},
               "accuracy_matrix": [[0.9, None], [0.5, 0.8]], "final_average_accuracy": 0.65,
               "average_incremental_accuracy": 0.775, "forgetting": 0.4, "backward_transfer": -0.4,
               "communication": {"uplink_bytes": 2_000_000, "downlink_bytes": 3_000_000}, "wall_time_s": 12.3}
    text = report.format_summary_table(results)
    for s in ("replay", "65.0", "77.5", "40.0", "-40.0", "2.00", "3.00", "12.3", "after task 1", "80.0"):
        assert s in text
