import csv
import json

import numpy as np
import pytest

from fedcl import report

PNG = b"\x89PNG\r\n\x1a\n"


def _results(**overrides):
    results = {"config": {"method": {"name": "replay"}, "num_clients": 10, "num_tasks": 2},
               "accuracy_matrix": [[0.9, None], [0.5, 0.8]], "final_average_accuracy": 0.65,
               "average_incremental_accuracy": 0.775, "forgetting": 0.4, "backward_transfer": -0.4,
               "communication": {"uplink_bytes": 2_000_000, "downlink_bytes": 3_000_000}, "wall_time_s": 12.3}
    return {**results, **overrides}


def test_json_round_trip_with_numpy(tmp_path):
    path = tmp_path / "sub" / "r.json"
    report.write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": None, "d": np.int64(7)})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": 7}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left


def test_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        report.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_csv_header_is_union_of_keys(tmp_path):
    path = tmp_path / "m.csv"
    rows = [{"round": 1, "acc_task_0": 0.5}, {"round": 2, "acc_task_0": 0.4, "acc_task_1": 0.9}]
    report.write_metrics_csv(path, rows)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["round", "acc_task_0", "acc_task_1"]
    assert rows[1]["acc_task_1"] == "0.9" and rows[0]["acc_task_1"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]


def test_plots_are_pngs(tmp_path):
    report.plot_accuracy_matrix(tmp_path / "m.png", [[0.9, None], [0.5, 0.8]], title="replay")
    report.plot_accuracy_matrix(tmp_path / "partial.png", [[0.9], [0.5, 0.8], [0.4, 0.6, 0.7]])  # ragged rows
    rows = [{"global_round": i + 1, "task": i // 2, "accuracy_seen": 0.5} for i in range(4)]
    report.plot_accuracy_curve(tmp_path / "c.png", rows)
    report.plot_accuracy_curve(tmp_path / "labelled.png", rows, label="replay")
    for name in ("m.png", "partial.png", "c.png", "labelled.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000


def test_summary_table_shows_the_numbers():
    text = report.format_summary_table(_results())
    for s in ("replay", "10", "65.0", "77.5", "40.0", "-40.0", "2.00", "3.00", "12.3", "after task 1", "80.0", "90.0"):
        assert s in text
    # the unseen cell (task 1 after task 0) is blank, not "None" or "nan"
    assert "None" not in text and "nan" not in text


def test_summary_table_finds_settings_inside_the_method_dict():
    results = _results(config={"method": {"name": "lwf", "num_clients": 7, "num_tasks": 2}})
    first_line = report.format_summary_table(results).splitlines()[2].split()
    assert first_line[:3] == ["lwf", "7", "2"]


def test_comparison_table_has_one_line_per_run():
    runs = [_results(), _results(config={"method": {"name": "finetune"}, "num_clients": 10, "num_tasks": 2},
                                 final_average_accuracy=0.4)]
    lines = report.format_comparison_table(runs).splitlines()
    assert len(lines) == 4  # header, rule, two runs
    assert lines[2].split()[0] == "replay" and lines[3].split()[0] == "finetune"
    assert "40.0" in lines[3]
