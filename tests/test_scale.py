"""Scale features: Hydra multirun sweeps over client counts, attaching to a running Ray cluster."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ("method=finetune", "dataset=digits", "num_tasks=2", "rounds_per_task=1", "local_epochs=1",
        "progress=false", "ray.num_cpus=2")


def test_two_job_multirun_sweep_writes_one_combined_table_and_plot(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "simulations" / "sweep_clients.py"), "--clients", "2,3",
                           "--out", str(out), "--", *TINY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("clients_*")) == ["clients_2", "clients_3"]
    lines = (out / "sweep.md").read_text().strip("`\n").splitlines()
    assert lines[0].split()[0] == "clients" and len(lines) == 4  # header, rule, two jobs
    assert [line.split()[0] for line in lines[2:]] == ["2", "3"]
    assert (out / "sweep.png").stat().st_size > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node(*args):
    ray = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray), "start", *args, "--num-cpus=1", "--disable-usage-stats", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_nodes(address: str, count: int, timeout: float = 120) -> None:
    probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().endswith(str(count)):
            return
        time.sleep(2)
    pytest.fail(f"the Ray cluster at {address} did not reach {count} nodes")


def test_fedcl_attaches_to_a_running_two_node_ray_cluster(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    head = ray_node("--head", f"--port={address.split(':')[1]}", "--include-dashboard=false")
    worker = None
    try:
        wait_for_nodes(address, 1)
        worker = ray_node(f"--address={address}")
        wait_for_nodes(address, 2)
        run = tmp_path / "run"
        proc = subprocess.run([sys.executable, "-m", "fedcl.cli", *TINY, "num_clients=3", f"ray.address={address}",
                               f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((run / "results.json").read_text())
        assert results["ray"]["nodes"] == 2 and results["ray"]["cpus"] == 2.0
        assert len(results["accuracy_matrix"]) == 2
    finally:
        for node in (worker, head):
            if node is not None:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=60)


def test_shared_store_keeps_one_copy_of_identical_tensors(tmp_path):
    import torch

    from fedcl.client.store import SharedBlobStore

    store = SharedBlobStore(tmp_path)
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    name = store.put(a)
    assert store.put({k: v.clone() for k, v in a.items()}) == name  # same content, same name
    assert store.put({"w": a["w"] + 1, "b": a["b"]}) != name
    assert len(list(tmp_path.glob("*.pt"))) == 2
    assert all(torch.equal(store.get(name)[k], a[k]) for k in a)
