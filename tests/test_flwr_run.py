"""`flwr run .` from the repository runs the same apps with any federation size: Flower's default
of 2 SuperNodes serves more clients than that (docs/flwr_run.md)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment running the tests has flwr and flower-superlink


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


TINY = "method=finetune num_tasks=2 rounds_per_task=1 local_epochs=1 progress=false"


def test_flwr_run_with_flowers_default_federation_runs_more_clients_than_supernodes(flwr, tmp_path):
    _, log, record = run_to_the_end(flwr, f"{TINY} num_clients=3", tmp_path / "run")  # 2 SuperNodes
    assert record["status"] == "finished:completed", log
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2 and results["num_clients"] == 3
    assert results["config"]["method"]["name"] == "finetune"
    assert [r["clients_ok"] for r in results["communication"]["per_round"]] == [3, 3]
    (a00, none), (a10, a11) = results["accuracy_matrix"]
    assert none is None and all(0.0 <= a <= 1.0 for a in (a00, a10, a11))


def test_the_components_in_pyproject_and_their_old_names_resolve_to_the_apps():
    """pyproject.toml names the apps `flwr run` loads; a Flower app of a user's own may still name
    them by their old module names."""
    import importlib

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    components = re.findall(r'^(serverapp|clientapp) = "([\w.]+):(\w+)"', (REPO / "pyproject.toml").read_text(), re.M)
    apps = {role: getattr(importlib.import_module(module), name) for role, module, name in components}
    assert isinstance(apps["serverapp"], ServerApp) and isinstance(apps["clientapp"], ClientApp)
    assert importlib.import_module("fedcl.federation.server_app").app is apps["serverapp"]
    assert importlib.import_module("fedcl.federation.client_app").app is apps["clientapp"]
