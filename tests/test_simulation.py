"""Real Flower simulations on Ray, end to end, through the same path `fedcl` uses."""
import json
import subprocess
import sys

import pytest

from fedcl.cli import run_experiment

TINY = ("num_clients=3", "num_tasks=2", "rounds_per_task=2", "local_epochs=1",
        "dataset=digits", "ray.num_cpus=2", "progress=false")


def test_replay_simulation_end_to_end(tmp_path, make_cfg):
    cfg = make_cfg(*TINY, "method=replay", "method.memory_total=200", "num_tasks=5",
                   "rounds_per_task=3", "local_epochs=2")
    results = run_experiment(cfg, str(tmp_path))
    m = results["accuracy_matrix"]
    assert len(m) == 5 and all(len(r) == 5 for r in m)
    assert m[0][1] is None and m[4][4] is not None
    # learning, not just running: replay keeps a clearly-above-chance accuracy on all seen tasks
    assert results["final_average_accuracy"] > 0.5
    comm = results["communication"]
    assert comm["uplink_bytes"] > 0 and comm["downlink_bytes"] >= comm["uplink_bytes"] * 0.9
    assert len(comm["per_round"]) == 15
    for name in ("results.json", "metrics.csv", "accuracy_matrix.png", "accuracy_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "metrics.csv").read_text().strip().splitlines()) == 16
    # stateful clients: each client's memory persisted in the store
    assert len([p for p in (tmp_path / "client_state").glob("client_*.pt") if ".prev" not in p.name]) == 3


class RecordingGrid:
    """A Grid that records the array names of every Flower message sent and received; ``rounds``
    holds each push of messages with the replies pulled for them."""

    def __init__(self, grid):
        self.grid, self.log, self.rounds, self._round_of = grid, [], [], {}

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        self.rounds.append((messages, []))
        self._round_of.update(dict.fromkeys(ids, len(self.rounds) - 1))
        self._record("down", messages)
        return ids

    def pull_messages(self, ids):
        replies = list(self.grid.pull_messages(ids))
        for r in replies:
            self.rounds[self._round_of[r.metadata.reply_to_message_id]][1].append(r)
        self._record("up", replies)
        return replies

    def send_and_receive(self, messages, **kw):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, **kw))
        self.rounds.append((messages, replies))
        self._record("down", messages)
        self._record("up", replies)
        return replies

    def _record(self, direction, batch):
        for m in batch:
            if m.has_content() and "arrays" in m.content:
                down = direction == "down"
                client = int(m.content["config" if down else "metrics"]["client"])
                task = int(m.content["config"]["task"]) if down else None
                self.log.append((direction, client, task, set(m.content["arrays"].keys())))


def recorded_simulation(cfg, run_dir, recorder: bool = False) -> tuple[dict, list]:
    """Run a real Flower simulation of ``cfg`` through a RecordingGrid: (results.json, message log),
    or (results.json, the RecordingGrid) with ``recorder=True``."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedcl.client.app import make_client_app
    from fedcl.runtime.backend import backend_config
    from fedcl.server.app import run_server

    app, grids = ServerApp(), []

    @app.main()
    def _main(grid, context):
        grids.append(RecordingGrid(grid))
        run_server(grids[0], cfg, str(run_dir))

    run_simulation(app, make_client_app(cfg, str(run_dir)), num_supernodes=2,  # nodes are slots, not clients
                   backend_config=backend_config(cfg))
    return json.loads((run_dir / "results.json").read_text()), grids[0] if recorder else grids[0].log


def test_duallora_sends_only_lora_bases_and_head_rows_after_the_base_session(tmp_path, make_cfg):
    from fedcl.experiment import get_experiment

    cfg = make_cfg(*TINY, "method=duallora", "local_epochs=3", "model.depth=2", "model.embed_dim=32")
    exp = get_experiment(cfg)
    backbone = {k for k in exp.new_model().state_dict() if exp.method.is_backbone(k)}
    results, log = recorded_simulation(cfg, tmp_path)
    assert [r["phase"] for r in results["communication"]["per_round"]] == \
        ["train", "train", "basis_end", "basis_start", "train", "train", "basis_end"]
    assert results["accuracy_matrix"][0][0] > 0.5  # the base session learned task 0 (chance: 0.2)
    task_of_reply = {}
    for direction, client, task, keys in log:
        if direction == "down":
            task_of_reply[client] = task
        task = task_of_reply[client]
        if task >= 1:  # after the base session, in both directions
            assert not keys & backbone, f"backbone arrays crossed the wire ({direction}, task {task})"
        if task >= 1 and direction == "up":
            for k in keys:
                assert k.startswith(("U.", "s.", "head_rows.")) or k.endswith(
                    (".orth_A.1", ".orth_B.1", ".res_C.1", ".res_B.1")), f"{k} crossed the wire"
    # the base session's last round reached every client with the full model
    last_base = [keys for d, client, task, keys in log if d == "down" and task == 0][-3:]
    assert all(backbone <= keys for keys in last_base)
    comm = results["communication"]
    assert comm["uplink_bytes_per_client_round"] < comm["full_model_bytes"] / 5
    assert (tmp_path / "adapters" / "adapter_model.safetensors").exists()
    # every client holds the same frozen backbone: the simulator stores it once for the run
    assert len(list((tmp_path / "shared").glob("*.pt"))) == 1


def test_same_seed_same_accuracy_matrix_with_sampling_and_faults(tmp_path, make_cfg):
    cfg = make_cfg(*TINY, "method=lwf", "num_clients=4", "fraction_train=0.75", "seed=3",
                   "faults.crash=0.34", "faults.corrupt=0.34")
    a = run_experiment(cfg, str(tmp_path / "a"))
    b = run_experiment(cfg, str(tmp_path / "b"))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["failures"] == b["failures"] and len(a["failures"]) == 2 * 4


@pytest.mark.parametrize("override, message", [
    ("method=nosuch", "method"),
    ("num_tasks=3", "num_tasks=3"),
    ("fraction_train=1.5", "fraction_train=1.5"),
    ("num_tasks=20", "num_tasks=20"),
    ("dataset=cifar10", "dataset.download=true"),
    ("resume=/nonexistent/run", "resume=/nonexistent/run"),
])
def test_cli_rejects_bad_input_with_a_clear_message(tmp_path, override, message):
    proc = subprocess.run([sys.executable, "-m", "fedcl.cli", override, f"dataset.root={tmp_path}/none"
                           if override.startswith("dataset") else "progress=false",
                           f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_codec_keeps_zero_dimensional_arrays():
    import numpy as np

    from fedcl.client.codec import from_record, to_record

    out = from_record(to_record({"num_batches_tracked": np.array(7), "w": np.zeros((3, 2)).T}))
    assert out["num_batches_tracked"].shape == () and out["w"].shape == (2, 3)
