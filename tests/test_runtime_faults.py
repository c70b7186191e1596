"""Faults of the Ray runtime, injected for real: a SIGKILLed Ray worker, a dead raylet, and
resources Ray does not have. Nothing may hang, and no fault may silently change the results."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedcl.cli import run_experiment
from fedcl.config import compose_config
from fedcl.errors import ConfigError, RuntimeLost
from fedcl.runtime import backend as runtime
from fedcl.runtime.simulation import as_runtime_lost, check_resources

TINY = ("dataset=digits", "method=finetune", "num_clients=4", "num_tasks=2", "rounds_per_task=2",
        "local_epochs=1", "ray.num_cpus=2", "progress=false")
ROUNDS = 4


def test_ray_restarts_a_dead_client_actor_and_runs_its_message_again():
    # Flower creates its actors with ClientAppActor.options(**client_resources): Ray's own options
    resources = runtime.backend_config(compose_config(list(TINY)))["client_resources"]
    assert resources["max_restarts"] == -1 and resources["max_task_retries"] == runtime.MAX_WORKER_RETRIES
    assert all(isinstance(v, (int, float)) for v in resources.values())  # what Flower's backend accepts


def test_a_simulation_has_as_many_nodes_as_a_round_has_messages_capped():
    assert runtime.num_slots(10) == 10 and runtime.num_slots(100) == 100
    assert runtime.num_slots(10**6) == runtime.MAX_SLOTS and runtime.num_slots(0) == 1


def test_runtime_lost_crosses_the_process_boundary_and_ray_errors_become_it(tmp_path):
    import ray.exceptions

    lost = pickle.loads(pickle.dumps(RuntimeLost(str(tmp_path), "the raylet died")))
    assert isinstance(lost, RuntimeLost) and f"fedcl resume={tmp_path}" in str(lost)
    try:
        try:
            raise ray.exceptions.RaySystemError("raylet gone")
        except ray.exceptions.RaySystemError as err:
            raise RuntimeError("Simulation Runtime crashed.") from err
    except RuntimeError as crashed:
        mapped = as_runtime_lost(crashed, str(tmp_path))
    assert isinstance(mapped, RuntimeLost) and "RaySystemError" in str(mapped)
    plain = ValueError("a bug")
    assert as_runtime_lost(plain, str(tmp_path)) is plain


@pytest.mark.parametrize("override, names", [
    ("ray.client_gpus=1", "ray.client_gpus=1"),
    ("ray.client_cpus=3", "ray.client_cpus=3"),
])
def test_resources_ray_does_not_have_are_a_config_error(override, names):
    nodes = [{"CPU": 2.0, "memory": 1e9}]  # what ray.nodes() says of a Ray started with ray.num_cpus=2
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        check_resources(compose_config([*TINY, override]), nodes, "the local Ray")  # 3 CPUs per client do not fit
    check_resources(compose_config(list(TINY)), nodes, "the local Ray")


def test_fedcl_with_a_gpu_per_client_on_a_cpu_machine_exits_2_quickly(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedcl.cli", *TINY, "ray.client_gpus=1",
                           f"hydra.run.dir={tmp_path}"], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ray.client_gpus=1" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The reference: the same run without faults."""
    return run_experiment(compose_config(list(TINY)), str(tmp_path_factory.mktemp("clean")))


def fedcl(tmp_path, run_dir, *args):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    with open(tmp_path / "stderr.txt", "w") as log:  # a file, not a pipe: Ray's logs must never block the run
        return subprocess.Popen([sys.executable, "-m", "fedcl.cli", *args, f"hydra.run.dir={run_dir}"],
                                stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)


def kill_after_first_round(proc, run_dir, is_target) -> psutil.Process:
    """SIGKILL one process of the run's Ray (picked by ``is_target``) once round 1 is done."""
    metrics, deadline = run_dir / "metrics.csv", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().strip().splitlines()) >= 2:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if is_target(child):
                        child.send_signal(signal.SIGKILL)
                        return child
                except psutil.Error:
                    continue
        time.sleep(0.02)
    pytest.fail(f"the run ended before its Ray process could be killed (exit {proc.poll()})")


def busy_actor(process: psutil.Process) -> bool:
    # Ray names an actor's process after the method it runs: a client is training in this one
    return process.cmdline()[:1] == ["ray::ClientAppActor.run"]


def finish(proc, timeout=300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run hung")


def test_a_killed_ray_worker_is_replaced_and_its_clients_asked_again(tmp_path, clean):
    run_dir = tmp_path / "run"
    proc = fedcl(tmp_path, run_dir, *TINY)
    kill_after_first_round(proc, run_dir, busy_actor)  # as the OOM killer would
    assert finish(proc) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["accuracy_matrix"] == clean["accuracy_matrix"]  # the retry is the same computation
    lost = [f for f in results["failures"] if f["kind"] == "worker_lost"]
    assert lost and len(lost) == len(results["failures"]), results["failures"]
    assert len(results["communication"]["per_round"]) == ROUNDS
    assert [r["clients_ok"] for r in results["communication"]["per_round"]] == [4] * ROUNDS


def test_a_dead_raylet_ends_the_run_with_a_message_and_resume_finishes_it(tmp_path, clean):
    run_dir = tmp_path / "run"
    proc = fedcl(tmp_path, run_dir, *TINY)
    kill_after_first_round(proc, run_dir, lambda p: p.name() == "raylet")
    code = finish(proc)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 3, stderr[-3000:]
    assert f"fedcl resume={run_dir}" in stderr and "runtime lost" in stderr
    assert "Traceback" not in stderr.split("fedcl: runtime lost")[-1]
    assert not (run_dir / "results.json").exists()
    resumed = fedcl(tmp_path, tmp_path / "resume_log", f"resume={run_dir}")
    assert finish(resumed) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["accuracy_matrix"] == clean["accuracy_matrix"]
    assert len(results["communication"]["per_round"]) == ROUNDS
