"""`flwr run .` from the repository runs the same apps, and a federation smaller than num_clients
fails in seconds with the command that fixes it (docs/flwr_run.md)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from fedcl.errors import ConfigError
from fedcl.federation.registration import wait_for_nodes

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment running the tests has flwr and flower-superlink


class Grid:
    """The part of flwr's Grid that registration uses: node ids appear as ``counts`` says, poll by poll."""

    def __init__(self, counts):
        self.counts, self.polls = list(counts), 0

    def get_node_ids(self):
        n = self.counts[min(self.polls, len(self.counts) - 1)]
        self.polls += 1
        return list(range(100, 100 + n))


def test_a_federation_that_stops_growing_short_of_num_clients_fails_fast_with_the_fix():
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        wait_for_nodes(Grid([2]), 3, timeout_s=60, stall_s=0.5, poll_s=0.01)
    assert time.monotonic() - started < 5  # the stall, not the overall bound
    message = str(err.value)
    assert "only 2 SuperNodes registered for num_clients=3" in message
    assert '--federation-config "num-supernodes=3"' in message
    assert "flwr federation simulation-config @none/default local --num-supernodes 3" in message


def test_a_slow_but_growing_registration_is_waited_for():
    grid = Grid([0] * 20 + [1] * 30 + [2] * 30 + [3])  # 0.8 s of polls, each step shorter than the stall
    assert wait_for_nodes(grid, 3, timeout_s=60, stall_s=0.5, poll_s=0.01) == [100, 101, 102]


def test_no_node_at_all_waits_for_the_overall_bound():
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"only 0 SuperNodes registered .*within 1s"):
        wait_for_nodes(Grid([0]), 2, timeout_s=1, stall_s=0.1, poll_s=0.01)
    assert time.monotonic() - started >= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flwr(tmp_path_factory):
    """`flwr` against a local SuperLink of this test's own: own FLWR_HOME and ports, no telemetry, and the
    app run in this environment (no `uv sync` of a fresh one per run). Stops that SuperLink afterwards."""
    home = tmp_path_factory.mktemp("flwr-home")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           # a Ray of the run's own: plain ray.init() would attach to any Ray this machine runs (another
           # test's, even one whose GCS another test killed) and wait for it
           "RAY_ADDRESS": "local",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*args, timeout=120):
        proc = subprocess.run([str(BIN / "flwr"), *args], check=False, cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    try:
        yield run
    finally:
        stop_superlinks_under(home)


def stop_superlinks_under(flwr_home: Path) -> None:
    """`flwr run` leaves its local SuperLink running: stop the one started with our FLWR_HOME, by pid."""
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], check=False, capture_output=True,
                         text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass


def run_to_the_end(flwr, overrides: str, run_dir: Path, *extra: str) -> tuple[int, str, dict]:
    """Run id, log and final record of one run: `--stream` keeps `flwr run` (which otherwise returns
    once the run is submitted) until the run ends, one process instead of a polling loop."""
    out = flwr("run", ".", "--stream", "--run-config", f'overrides="{overrides}" run-dir="{run_dir}"', *extra,
               timeout=300)
    run_id = int(re.search(r"Successfully started run (\d+)", out)[1])
    listed = flwr("list", "--run-id", str(run_id), "--format", "json")
    return run_id, out, json.loads(listed[listed.index("{"):])["runs"][0]


def seconds(record: dict, since: str, until: str) -> float:
    """Seconds between two of the run's own timestamps (the SuperLink's clock, not the CLI's start-up)."""
    def at(key):
        return datetime.strptime(record[key], "%Y-%m-%d %H:%M:%SZ").timestamp()
    return at(until) - at(since)


TINY = "method=finetune num_tasks=2 rounds_per_task=1 local_epochs=1 progress=false"


def test_flwr_run_from_the_repository_with_the_federation_sized_to_num_clients(flwr, tmp_path):
    flwr("federation", "simulation-config", "@none/default", "local", "--num-supernodes", "3")  # default: 2
    _, log, record = run_to_the_end(flwr, f"{TINY} num_clients=3", tmp_path / "run")
    assert record["status"] == "finished:completed", log
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2 and results["num_clients"] == 3
    assert results["config"]["method"]["name"] == "finetune"
    (a00, none), (a10, a11) = results["accuracy_matrix"]
    assert none is None and all(0.0 <= a <= 1.0 for a in (a00, a10, a11))


def test_a_federation_smaller_than_num_clients_fails_within_seconds_with_the_command(flwr, tmp_path):
    _, log, record = run_to_the_end(flwr, f"{TINY} num_clients=2", tmp_path / "run",
                                    "--federation-config", "num-supernodes=1")
    assert record["status"] == "finished:failed", log
    took = seconds(record, "pending-at", "finished-at")  # process and Ray start-up included
    assert took < 90, took  # 55 s at a load of 25 on 2 cores; the overall bound alone is 300 s
    # the per-run override took effect, and the stall (not the overall bound) ended the wait
    assert "only 1 SuperNodes registered for num_clients=2 (no new one for 5s)" in log
    assert '--federation-config "num-supernodes=2"' in log
    assert "flwr federation simulation-config @none/default local --num-supernodes 2" in log
    assert not (tmp_path / "run" / "results.json").exists()
